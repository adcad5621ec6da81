"""GLUE examples from tfds (`glue/<task>`) or the classic TSV folders, encoded for fine-tuning
as the reference does: `[CLS] a [SEP] (b [SEP])`, token types 0/1, longest-first truncation,
padded to `max_seq_len` (128), training order NOT shuffled unless asked. Batches come from a
grain pipeline (shuffled by seed, epochs, batching) whose iterator state a checkpoint saves, like
the pretraining batches. TSV folders are read through `etils.epath` (local or gs://).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import numpy as np
from etils import epath

from m2jax.data.glue_tasks import GlueTask, get_task
from m2jax.data.skips import SkipLog
from m2jax.data.tokenizer import BertWordPiece, load_tokenizer

EMBEDDED_GLUE_DIR = pathlib.Path(__file__).parent / "assets"
# Tasks shipped under EMBEDDED_GLUE_DIR (not GLUE; for offline fine-tuning).
EMBEDDED_TASKS = ("wnsense", "wnpos")
# Refuse a TSV file when more than this share of its rows is malformed: wrong task or format.
_MAX_BAD_ROW_SHARE = 0.1


@dataclasses.dataclass
class RawExamples:
    """Texts and labels of one split: `texts` is a list of 1- or 2-tuples of str, `labels` an
    int32 (N,) array of class ids (-1 for unlabelled test data) or float32 for regression."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray
    skip_log: SkipLog


def _is_labelled(split: str) -> bool:
    """Training and dev splits carry labels; only test splits may lack them."""
    return not split.startswith("test")


def read_glue_tsv(task: GlueTask, split: str, root: str | pathlib.Path) -> RawExamples:
    """Reads `<root>/<TaskFolder>/<file>.tsv` (or `<root>/<file>.tsv` when root is the task folder).

    Malformed rows (wrong field count, non-UTF-8 bytes, unknown label, a score that is not a
    finite number) are skipped with a counted warning naming file:line; a missing header column
    (the label column too, except in test files) or more than 10% bad rows raises.
    """
    root = epath.Path(root)
    folder = root / task.tsv_folder if (root / task.tsv_folder).is_dir() else root
    path = folder / task.tsv_file(split)
    if not path.exists() or path.is_dir():
        raise FileNotFoundError(f"GLUE {task.name} {split}: {path} not found (expected the GLUE "
                                f"layout <dir>/{task.tsv_folder}/{task.tsv_file(split)})")
    log = SkipLog(str(path))
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    headerless = task.tsv_headerless is not None and split in task.tsv_headerless_splits
    if headerless:
        text_cols, label_col = task.tsv_headerless
        n_fields, first_row = None, 0
    else:
        if not lines:
            raise ValueError(f"{path}: empty file, expected a header row")
        header = lines[0].decode("utf-8", errors="replace").rstrip("\r").split("\t")
        missing = [c for c in task.tsv_text_columns if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {missing}; header is {header}")
        text_cols = tuple(header.index(c) for c in task.tsv_text_columns)
        # Test files carry no label column: their labels are -1, as in tfds. A training or dev
        # file without one is the wrong file (or a misnamed column), not unlabelled data.
        if task.tsv_label_column in header:
            label_col = header.index(task.tsv_label_column)
        elif _is_labelled(split):
            raise ValueError(f"{path}:1: no label column {task.tsv_label_column!r} in the "
                             f"header of a {split} file; header is {header}")
        else:
            label_col = None
        n_fields, first_row = len(header), 1
    label_ids = None if task.tsv_label_values is None else {v: i for i, v in enumerate(task.tsv_label_values)}
    needed = max(text_cols + ((label_col,) if label_col is not None else ()))
    texts, labels = [], []
    for line_no in range(first_row, len(lines)):
        where = f"{path}:{line_no + 1}"
        try:
            fields = lines[line_no].decode("utf-8").rstrip("\r").split("\t")
        except UnicodeDecodeError as e:
            log.skip("non-UTF-8 bytes", f"{where} (byte {e.start})")
            continue
        if (n_fields is not None and len(fields) != n_fields) or len(fields) <= needed:
            log.skip(f"{len(fields)} fields, expected {n_fields or needed + 1}", where)
            continue
        if label_col is None:
            label = -1.0 if task.is_regression else -1
        elif task.is_regression:
            try:
                label = float(fields[label_col])
            except ValueError:
                log.skip(f"label {fields[label_col]!r} is not a number", where)
                continue
            if not math.isfinite(label):
                log.skip(f"label {fields[label_col]!r} is not a finite number", where)
                continue
        elif fields[label_col] in label_ids:
            label = label_ids[fields[label_col]]
        else:
            log.skip(f"label {fields[label_col]!r} not in {task.tsv_label_values}", where)
            continue
        texts.append(tuple(fields[c] for c in text_cols))
        labels.append(label)
    n_rows = len(lines) - first_row
    if n_rows and log.total > _MAX_BAD_ROW_SHARE * n_rows:
        raise ValueError(f"{path}: {log.total} of {n_rows} rows malformed ({dict(log.counts)}; first "
                         f"at {next(iter(log.examples.values()))[0]}); is this the {task.name} file?")
    return RawExamples(texts, _label_array(task, labels), log)


def read_glue_tfds(task: GlueTask, split: str, data_dir: str | None = None,
                   download: bool = False) -> RawExamples:
    """Reads `glue/<task>` through `tfds.load` (prepared data under `data_dir`)."""
    import tensorflow_datasets as tfds

    if not task.in_tfds:
        raise ValueError(f"{task.name!r} is not a tfds dataset; use source='embedded'")
    log = SkipLog(f"tfds:glue/{task.name}[{split}]")
    ds = tfds.load(f"glue/{task.name}", split=split, data_dir=data_dir, download=download)
    texts, labels = [], []
    for n, record in enumerate(tfds.as_numpy(ds)):
        row = []
        for field in task.text_fields:
            value = record[field]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    log.skip("non-UTF-8 bytes", f"glue/{task.name}[{split}][{n}].{field}")
                    break
            row.append(str(value))
        else:
            texts.append(tuple(row))
            labels.append(record["label"].item())
    return RawExamples(texts, _label_array(task, labels), log)


def _label_array(task: GlueTask, labels: list) -> np.ndarray:
    return np.asarray(labels, dtype=np.float32 if task.is_regression else np.int32)


@dataclasses.dataclass
class GlueSplit:
    """An encoded GLUE split.

    `input_ids` int32 (N, L); `token_type_ids`, `attention_mask` int8 (N, L) (cast to int32 in
    batches); `labels` int32 (N,) class ids (-1 unlabelled) or float32 for STS-B.
    """

    task: GlueTask
    split: str
    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    skip_log: SkipLog

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                num_epochs: int | None = 1, drop_remainder: bool = False,
                pad_remainder: bool = False, process_index: int = 0, process_count: int = 1):
        """A grain iterator of batches over `num_epochs` epochs (None: endless), each epoch
        `ceil(N / batch_size)` batches: dicts of `input_ids`, `token_type_ids`, `attention_mask`
        (int32 (b, L)) and `labels` ((b,)), b = batch_size // process_count, each host taking
        its slice of every global batch.

        The reference does not shuffle GLUE training data, hence `shuffle=False`; with shuffle
        each epoch is a new permutation drawn from `seed` (grain's shuffle). `pad_remainder`
        fills the last batch of an epoch to full size with [PAD] rows labelled -1 and adds
        `example_mask` (1 real, 0 pad), so training and evaluation keep one static shape.
        The iterator's `get_state()` / `set_state()` (orbax: `grain.checkpoint`) resume it
        exactly.
        """
        import grain

        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} not divisible by process_count {process_count}")
        rows = grain.MapDataset.range(len(self))
        if shuffle:
            rows = rows.shuffle(seed=seed)
        # Batches of row indices, one epoch's worth, repeated (and reshuffled) per epoch.
        ds = rows.batch(batch_size, drop_remainder=drop_remainder).repeat(num_epochs)
        ds = ds.map(functools.partial(self._host_batch, batch_size, pad_remainder,
                                      process_index, process_count))
        return iter(ds.to_iter_dataset())

    def _host_batch(self, batch_size: int, pad_remainder: bool, process_index: int,
                    process_count: int, idx: np.ndarray) -> dict[str, np.ndarray]:
        """This host's rows of the global batch whose example indices are `idx`."""
        idx = np.asarray(idx, np.int64)
        if pad_remainder and len(idx) < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - len(idx), -1)])
        per_host = batch_size // process_count
        host = slice(process_index * per_host, (process_index + 1) * per_host)
        idx = idx[host]
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        batch = {
            "input_ids": np.where(valid[:, None], self.input_ids[safe], 0).astype(np.int32),
            "token_type_ids": np.where(valid[:, None], self.token_type_ids[safe], 0).astype(np.int32),
            "attention_mask": np.where(valid[:, None], self.attention_mask[safe], 0).astype(np.int32),
            "labels": np.where(valid, self.labels[safe], -1).astype(self.labels.dtype),
        }
        if pad_remainder:
            batch["example_mask"] = valid.astype(np.int32)
        return batch


def encode_examples(task: GlueTask, split: str, raw: RawExamples, tokenizer: BertWordPiece) -> GlueSplit:
    """Tokenises texts (pairs as `[CLS] a [SEP] b [SEP]`) into arrays padded to the tokenizer's
    max_seq_len."""
    if tokenizer.max_seq_len is None:
        raise ValueError("encode_examples needs a tokenizer built with max_seq_len")
    inputs = [t[0] if len(t) == 1 else (t[0], t[1]) for t in raw.texts]
    L, n = tokenizer.max_seq_len, len(inputs)
    ids = np.zeros((n, L), np.int32)
    types = np.zeros((n, L), np.int8)
    mask = np.zeros((n, L), np.int8)
    chunk = 8192  # bounds the memory of Encoding objects on large tasks
    for start in range(0, n, chunk):
        encs = tokenizer.encode_batch(inputs[start:start + chunk])
        ids[start:start + len(encs)] = [e.ids for e in encs]
        types[start:start + len(encs)] = [e.type_ids for e in encs]
        mask[start:start + len(encs)] = [e.attention_mask for e in encs]
    return GlueSplit(task, split, ids, types, mask, raw.labels, raw.skip_log)


def glue_dataset(task: str, split: str, source: str = "tfds", *, max_seq_len: int = 128,
                 data_dir: str | None = None, download: bool = False,
                 tokenizer: BertWordPiece | None = None) -> GlueSplit:
    """One encoded GLUE split.

    Args:
      task: 'cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte', 'wnli', or the offline
        'wnsense' / 'wnpos'
        (the offline task shipped with m2jax).
      split: 'train', 'validation' (MNLI: 'validation_matched' / 'validation_mismatched'),
        'test' (MNLI: 'test_matched' / 'test_mismatched'; labels -1).
      source: 'tfds' (`glue/<task>`, prepared under `data_dir`; `download=True` lets tfds fetch
        and prepare it), 'tsv:<dir>' (GLUE folder layout, <dir>/CoLA/train.tsv, ...), or
        'embedded' (only for 'wnsense' and 'wnpos').
      max_seq_len: rows are truncated (longest first) and padded to this length.
    """
    spec = get_task(task)
    if source == "tfds":
        raw = read_glue_tfds(spec, split, data_dir, download)
    elif source.startswith("tsv:"):
        raw = read_glue_tsv(spec, split, source[4:])
    elif source == "embedded":
        if spec.name not in EMBEDDED_TASKS:
            raise ValueError(f"only {EMBEDDED_TASKS} are embedded (offline); {task!r} needs "
                             "source='tfds' or 'tsv:<dir>'")
        raw = read_glue_tsv(spec, split, EMBEDDED_GLUE_DIR)
    else:
        raise ValueError(f"unknown GLUE source {source!r}; expected 'tfds', 'tsv:<dir>' or 'embedded'")
    if tokenizer is None or tokenizer.max_seq_len != max_seq_len:
        tokenizer = load_tokenizer(max_seq_len=max_seq_len)
    return encode_examples(spec, split, raw, tokenizer)
