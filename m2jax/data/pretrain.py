"""Masked-LM pretraining batches as a checkpointable grain pipeline.

Pipeline (per host):
  documents (tfds / files / embedded)  -> this host's contiguous shard
  -> shuffle (seeded, reshuffled each epoch) -> repeat(num_epochs)
  -> drop bad documents (counted warnings)
  -> one row per document, [CLS] doc[:L-2] [SEP] [PAD]... (the reference; batched, then
     tokenised), or with packing: documents joined by [SEP] and cut into rows of [CLS] + L-1
     tokens, then batched
  -> MLM masking (seeded per batch).
grain keeps the position of every stage in `iterator.get_state()`, so a restored iterator
continues with exactly the batches the uninterrupted one would have produced.
"""

from __future__ import annotations

import numpy as np

from m2jax.data.masking import mask_tokens
from m2jax.data.text_sources import open_text_source
from m2jax.data.tokenizer import BertWordPiece, load_tokenizer

# Abort (instead of spinning) when over 90% of a window of 1000 documents is unusable.
_MAX_SKIP_RATIO = 0.9


def host_shard(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this host's contiguous share; shares differ in size by at most one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return (process_index * num_records // process_count,
            (process_index + 1) * num_records // process_count)


def pretrain_batches(
    source: str = "tfds:c4/en",
    split: str = "train",
    *,
    max_seq_len: int = 128,
    global_batch_size: int = 4096,
    mlm_probability: float = 0.30,
    seed: int = 0,
    shuffle: bool = True,
    packing: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    data_dir: str | None = None,
    text_field: str = "text",
    num_epochs: int | None = None,
    tokenizer: BertWordPiece | None = None,
    num_threads: int | None = None,
    prefetch_batches: int = 0,
):
    """A checkpointable iterator of MLM batches (a `grain.DatasetIterator`).

    Args:
      source: 'tfds:c4/en' (default; needs a prepared ArrayRecord copy under `data_dir`),
        'tfds:<name>', 'files:<glob>[,<glob>]' (.txt one document per line, .jsonl with
        `text_field`, optionally .gz), or 'embedded' (shipped corpus, no download).
      split: dataset split ('train', 'validation', ...); 'files:' sources only take 'train'.
      max_seq_len: L; every row is padded to exactly L (the encoder has no padding mask).
      global_batch_size: rows per step over all hosts; each host yields
        global_batch_size // process_count rows.
      mlm_probability: 0.30 for training, 0.15 for evaluation in the M2 recipe.
      seed: drives shuffling (same on all hosts) and masking (mixed with process_index).
      packing: join documents with [SEP] and fill rows instead of one document per row.
      process_index, process_count: this host and the number of hosts (default: jax's).
      num_epochs: None repeats forever; epochs are reshuffled with new permutations.
      num_threads: grain threads that read documents (None: 16 for tfds, 0 = the consuming
        thread for local files and the embedded corpus); tokenisation is parallel in Rust.
      prefetch_batches: batches prepared ahead in a background thread (0: none).

    Yields:
      dicts of int32 numpy arrays, each (global_batch_size // process_count, max_seq_len):
      `input_ids` (masked), `token_type_ids` (zeros), `attention_mask` (1 except [PAD]),
      `labels` (original id where predicted, -100 elsewhere).
      The iterator has `get_state()` / `set_state(state)` (JSON-able dict; orbax saves it with
      `grain.checkpoint.CheckpointSave`) and `skip_log` (counts of skipped documents).
    """
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    docs = open_text_source(source, split, text_field, data_dir)
    start, stop = host_shard(len(docs), process_index, process_count)
    if start == stop:
        raise ValueError(f"{source}[{split}] has {len(docs)} documents, too few for "
                         f"{process_count} hosts")

    ds = grain.MapDataset.source(docs)[start:stop]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_threads is None:
        # Local documents are read faster by the consuming thread than handed over by a pool
        # (measured on 2 cores); tfds records may sit on network storage, where threads pay.
        num_threads = 16 if source.startswith("tfds:") else 0
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(64, 4 * num_threads)
                             if num_threads else 0)
    rows_per_host = global_batch_size // process_count
    if packing:
        ds = _packed_rows(ds, tok, max_seq_len, read).batch(rows_per_host, drop_remainder=True)
    elif docs.may_skip:
        # Batch the texts first: one parallel Rust call per batch tokenises far faster than
        # per-document calls from Python threads.
        ds = _drop_none(ds.to_iter_dataset(read, allow_nones=True))
        ds = ds.batch(rows_per_host, drop_remainder=True, batch_fn=list)
        ds = ds.map(lambda texts: tok.encode_rows(texts, max_seq_len))
    else:
        # Pre-validated local documents: batches are indexable, so read threads can tokenise
        # whole batches concurrently and per-document iterator overhead disappears.
        ds = ds.batch(rows_per_host, drop_remainder=True, batch_fn=list)
        ds = ds.map(lambda texts: tok.encode_rows(texts, max_seq_len)).to_iter_dataset(read)
    mask_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    ds = ds.random_map(_Masker(tok, mlm_probability), seed=mask_seed)
    if prefetch_batches:
        # A background thread prepares the next batches while the trainer consumes this one;
        # tokenisation runs in Rust without the GIL, so it overlaps with the caller's work.
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
    iterator = iter(ds)
    iterator.skip_log = docs.skip_log
    return iterator


def _drop_none(ds):
    import grain

    ds = ds.filter(lambda x: x is not None)
    options = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=_MAX_SKIP_RATIO)
    return grain.experimental.WithOptionsIterDataset(ds, options)


def _packed_rows(ds, tok: BertWordPiece, max_seq_len: int, read):
    """Rows of [CLS] + (L-1) tokens cut from the stream doc1 [SEP] doc2 [SEP] ...; the last row
    of a finite stream is padded."""
    import grain

    def doc_tokens(text):
        if text is None:
            return None
        ids = tok.word_ids([text])[0]
        return {"input_ids": np.asarray(ids + [tok.sep_id], dtype=np.int32)}

    ds = _drop_none(ds.map(doc_tokens).to_iter_dataset(read, allow_nones=True))
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"input_ids": max_seq_len - 1})

    def add_cls(packed):
        body = packed["input_ids"]
        return np.concatenate([np.full((1,), tok.cls_id, np.int32), body.astype(np.int32)])

    return ds.map(add_cls)


class _Masker:
    """grain random-map transform: (B, L) token rows -> the MLM batch dict."""

    def __init__(self, tok: BertWordPiece, mlm_probability: float):
        self.tok, self.p = tok, mlm_probability

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int32)
        input_ids, labels = mask_tokens(
            rows, rng, mlm_probability=self.p, mask_id=self.tok.mask_id,
            vocab_size=self.tok.vocab_size, special_ids=self.tok.special_ids)
        return {
            "input_ids": input_ids,
            "token_type_ids": np.zeros_like(rows),
            "attention_mask": (rows != self.tok.pad_id).astype(np.int32),
            "labels": labels,
        }
