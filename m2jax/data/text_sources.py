"""Random-access document sources for pretraining: tfds datasets, local text/JSONL files, and
the embedded corpus. Each is a grain-compatible `RandomAccessDataSource` (`__len__`,
`__getitem__`) whose items are document strings, or None for a record that must be skipped.
"""

from __future__ import annotations

import glob
import gzip
import json
import mmap
import pathlib

import numpy as np

from m2jax.data.skips import SkipLog

EMBEDDED_CORPUS = pathlib.Path(__file__).parent / "assets" / "python_docs_corpus.jsonl.gz"
# Every this-many-th embedded document is held out as the "validation" split.
EMBEDDED_VALIDATION_EVERY = 50
_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json")


def _check_text(value, where: str, log: SkipLog) -> str | None:
    """Decodes bytes as UTF-8 and rejects empty documents; None (and a counted warning) if bad."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            log.skip("non-UTF-8 bytes", f"{where} (byte {e.start})")
            return None
    if not isinstance(value, str):
        log.skip(f"text is {type(value).__name__}, not a string", where)
        return None
    if not value.strip():
        log.skip("empty or whitespace-only document", where)
        return None
    return value


class TfdsTextSource:
    """Text field of a tfds dataset read through `tfds.data_source` (ArrayRecord files).

    Bad records (non-UTF-8, empty) come back as None and are counted in `skip_log`.
    """

    may_skip = True  # items can be None

    def __init__(self, name: str, split: str, text_field: str = "text", data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split, self.text_field = name, split, text_field
        self.skip_log = SkipLog(f"tfds:{name}[{split}]")
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        features = getattr(getattr(self._source, "dataset_info", None), "features", None)
        if features is not None and text_field not in features:
            raise KeyError(f"tfds dataset {name!r} has no field {text_field!r}; its fields are "
                           f"{sorted(features.keys())} (set text_field)")

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        """Where document `index` comes from, for messages and row indexes."""
        return f"tfds:{self.name}[{self.split}][{index}]"

    def __getitem__(self, index: int) -> str | None:
        record = self._source[index]
        where = f"tfds:{self.name}[{self.split}][{index}]"
        if self.text_field not in record:
            self.skip_log.skip(f"missing field {self.text_field!r}", where)
            return None
        return _check_text(record[self.text_field], where, self.skip_log)


class FileTextSource:
    """Documents of local files: `.txt` (one document per line) or `.jsonl`/`.json` (one JSON
    object per line, text in `text_field`), each optionally `.gz`-compressed.

    All lines are validated once when the source is built; bad ones (non-UTF-8, invalid JSON,
    missing or non-string field, empty text) are skipped with a counted warning naming
    file:line, so reading never fails mid-epoch. Uncompressed files are memory-mapped.
    """

    may_skip = False  # every item is a valid document

    def __init__(self, paths: str | list[str], text_field: str = "text"):
        files = _expand(paths)
        self.text_field = text_field
        self.skip_log = SkipLog(f"files:{paths}")
        self.files = files
        self._buffers = []
        self._json = []
        starts, ends, file_ids, lines = [], [], [], []
        for fid, path in enumerate(files):
            buf, is_json = _open_buffer(path)
            self._buffers.append(buf)
            self._json.append(is_json)
            for line_no, (start, end) in enumerate(_line_spans(buf), start=1):
                if self._parse(buf[start:end], is_json, f"{path}:{line_no}") is not None:
                    starts.append(start)
                    ends.append(end)
                    file_ids.append(fid)
                    lines.append(line_no)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._lines = np.asarray(lines, dtype=np.int64)
        if not len(self._starts):
            raise ValueError(f"no usable document in {files} (skipped: {dict(self.skip_log.counts)})")

    def _parse(self, raw: bytes, is_json: bool, where: str) -> str | None:
        if not is_json:
            return _check_text(raw, where, self.skip_log)
        line = _check_text(bytes(raw), where, self.skip_log)  # UTF-8 and non-blank first
        if line is None:
            return None
        try:
            record = json.loads(line)
        except ValueError as e:
            self.skip_log.skip(f"invalid JSON ({type(e).__name__})", where)
            return None
        if not isinstance(record, dict) or self.text_field not in record:
            self.skip_log.skip(f"missing field {self.text_field!r}", where)
            return None
        return _check_text(record[self.text_field], where, self.skip_log)

    def __len__(self) -> int:
        return len(self._starts)

    def where(self, index: int) -> str:
        """`path:line` of document `index` (bad lines are skipped, so index != line - 1)."""
        return f"{self.files[int(self._file_ids[index])]}:{int(self._lines[index])}"

    def __getitem__(self, index: int) -> str:
        fid = int(self._file_ids[index])
        raw = self._buffers[fid][int(self._starts[index]):int(self._ends[index])]
        if not self._json[fid]:
            return raw.decode("utf-8")
        return json.loads(raw)[self.text_field]


def embedded_source(split: str = "train") -> "SubsetSource":
    """The shipped Python-documentation corpus (2101 documents); 'train' holds all but every
    50th document, 'validation' holds every 50th."""
    full = FileTextSource(str(EMBEDDED_CORPUS))
    held_out = np.arange(len(full)) % EMBEDDED_VALIDATION_EVERY == 0
    if split == "train":
        return SubsetSource(full, np.flatnonzero(~held_out))
    if split in ("validation", "eval"):
        return SubsetSource(full, np.flatnonzero(held_out))
    raise ValueError(f"the embedded corpus has splits 'train' and 'validation', not {split!r}")


class SubsetSource:
    """A fixed subset (index list) of another random-access source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.skip_log, self.may_skip = source.skip_log, source.may_skip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]

    def where(self, index: int) -> str:
        return self.source.where(int(self.indices[index]))


def open_text_source(source: str, split: str = "train", text_field: str = "text",
                     data_dir: str | None = None):
    """Parses a source spec: 'tfds:<name>' (e.g. 'tfds:c4/en'), 'files:<glob>[,<glob>...]',
    or 'embedded'."""
    kind, _, arg = source.partition(":")
    if kind == "tfds" and arg:
        return TfdsTextSource(arg, split, text_field, data_dir)
    if kind == "files" and arg:
        if split not in (None, "train"):
            raise ValueError(f"'files:' sources have no splits (got split={split!r}); point a "
                             "separate glob at the evaluation files instead")
        return FileTextSource(arg.split(","), text_field)
    if source == "embedded":
        return embedded_source(split)
    raise ValueError(f"unknown pretraining source {source!r}; expected 'tfds:<name>', "
                     "'files:<glob>' or 'embedded'")


def _expand(paths: str | list[str]) -> list[str]:
    patterns = [paths] if isinstance(paths, str) else list(paths)
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        files.extend(matched)
    for f in files:
        suffix = f[:-3] if f.endswith(".gz") else f
        if not suffix.endswith(_TEXT_SUFFIXES + _JSON_SUFFIXES):
            raise ValueError(f"{f}: unsupported file type; expected .txt, .jsonl or .json "
                             "(optionally .gz)")
    return files


def _open_buffer(path: str):
    """(bytes-like buffer of the whole file, is JSON lines)."""
    is_json = (path[:-3] if path.endswith(".gz") else path).endswith(_JSON_SUFFIXES)
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read(), is_json
    with open(path, "rb") as f:
        if pathlib.Path(path).stat().st_size == 0:
            return b"", is_json
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), is_json


def _line_spans(buf):
    """(start, end) byte spans of each line without its newline (and a trailing CR)."""
    pos, size = 0, len(buf)
    while pos < size:
        end = buf.find(b"\n", pos)
        nxt = size if end < 0 else end + 1
        end = size if end < 0 else end
        stop = end - 1 if end > pos and buf[end - 1:end] == b"\r" else end
        yield pos, stop
        pos = nxt
