"""Embed a corpus with an M2-BERT retrieval checkpoint, and search it.

    python launch/embed.py --checkpoint=/path/to/m2-bert-80M-2k-retrieval \
        --input=docs.jsonl --output=out/docs.npy
    python launch/embed.py --checkpoint=... --input=embedded --max_docs=500 \
        --query="how do I read a file line by line" --query="sort a dictionary by value"

`--input` is a `.txt` file (one document per line), a `.jsonl` file (text in `--text_field`), a
glob of such files (optionally `.gz`), `tfds:<name>` (split `--split`), or `embedded` (the
shipped Python-documentation corpus). Unusable lines (empty, not UTF-8, bad JSON) are skipped
with counted warnings, so `--output` rows are listed with their source line in
`<output stem>.rows.jsonl`. With `--query`, prints the `--top_k` most cosine-similar documents
for each query. Arguments are checked before anything is read; an existing `--output` is kept
unless `--overwrite` is given; files are created with the usual permissions (umask).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from m2jax.data.text_sources import EMBEDDED_CORPUS, FileTextSource, open_text_source

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "retrieval (or sequence-classification) checkpoint", required=True
)
_INPUT = flags.DEFINE_string("input", "embedded", "file, glob, 'tfds:<name>' or 'embedded'")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "text field of JSONL / tfds records")
_SPLIT = flags.DEFINE_string("split", "train", "split of a tfds input")
_MAX_DOCS = flags.DEFINE_integer("max_docs", None, "embed only the first this-many documents")
_OUTPUT = flags.DEFINE_string("output", None, "where to write the (N, H) float32 .npy")
_QUERIES = flags.DEFINE_multi_string("query", [], "search the corpus for this text")
_TOP_K = flags.DEFINE_integer("top_k", 5, "documents shown per query")
_BATCH = flags.DEFINE_integer("batch_size", 16, "texts per forward call")
_NORMALIZE = flags.DEFINE_bool("normalize", False, "L2-normalise the saved embeddings")
_PADDING = flags.DEFINE_enum(
    "padding",
    "max_length",
    ["max_length", "bucket"],
    "max_length: as the reference (full length); bucket: faster on short texts, not identical",
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "replace an existing --output (and its rows file)"
)


def open_corpus(spec: str, text_field: str, split: str):
    """A random-access document source (`len`, `[i]`, `.where(i)`) for `--input`."""
    if spec == "embedded":
        return FileTextSource(str(EMBEDDED_CORPUS))
    if spec.startswith(("tfds:", "files:")):
        return open_text_source(spec, split, text_field)
    return FileTextSource(spec.split(","), text_field)


def read_documents(source, max_docs: int | None) -> tuple[list[str], list[str]]:
    """(texts, where each came from); tfds records unusable as text are left out."""
    n = len(source) if max_docs is None else min(max_docs, len(source))
    texts, where = [], []
    for i in range(n):
        text = source[i]
        if text is not None:
            texts.append(text)
            where.append(source.where(i))
    return texts, where


def save_atomically(path: str, write) -> None:
    """`write(file)` into a temporary file beside `path`, then rename: an interrupted run
    never leaves a half-written file in place of an older complete one. The file gets the mode
    a plain `open` would give it (0666 less the umask; mkstemp's own is 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rows_path(output: str) -> str:
    stem = output[: -len(".npy")] if output.endswith(".npy") else output
    return stem + ".rows.jsonl"


def _snippet(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def check_arguments() -> None:
    """Every argument, before anything is read or computed (UsageError naming the flag)."""
    if not _OUTPUT.value and not _QUERIES.value:
        raise app.UsageError("give --output (save the embeddings) and/or --query (search)")
    for flag, value in (
        ("--top_k", _TOP_K.value),
        ("--batch_size", _BATCH.value),
        ("--max_docs", _MAX_DOCS.value),
    ):
        if value is not None and value < 1:
            raise app.UsageError(f"{flag} must be >= 1, got {value}")
    if _OUTPUT.value:
        if not _OUTPUT.value.endswith(".npy"):
            raise app.UsageError(f"--output must end in .npy, got {_OUTPUT.value!r}")
        existing = [p for p in (_OUTPUT.value, rows_path(_OUTPUT.value)) if os.path.exists(p)]
        if existing and not _OVERWRITE.value:
            raise app.UsageError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
        folder = os.path.dirname(os.path.abspath(_OUTPUT.value))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise app.UsageError(f"--output: {folder} is not a directory")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_arguments()
    # Imported after the checks: a usage error is reported before jax and flax load (seconds).
    from m2jax.embedder import Embedder, cosine_top_k

    source = open_corpus(_INPUT.value, _TEXT_FIELD.value, _SPLIT.value)
    texts, where = read_documents(source, _MAX_DOCS.value)
    if not texts:
        raise app.UsageError(f"no usable document in {_INPUT.value}")
    embedder = Embedder.from_pretrained(
        _CHECKPOINT.value, dtype=_DTYPE.value, batch_size=_BATCH.value, padding=_PADDING.value
    )
    start = time.perf_counter()
    corpus_NxH = embedder.embed(texts, normalize=_NORMALIZE.value)
    seconds = time.perf_counter() - start
    skipped = dict(source.skip_log.counts) if hasattr(source, "skip_log") else {}
    print(
        f"embedded {len(texts)} documents -> {corpus_NxH.shape} float32 in {seconds:.1f} s "
        f"({len(texts) / seconds:.1f} docs/s; padded to {embedder.buckets}); skipped: "
        f"{skipped or 'none'}",
        flush=True,
    )
    if _OUTPUT.value:
        save_atomically(_OUTPUT.value, lambda f: np.save(f, corpus_NxH))
        rows = "".join(json.dumps({"row": i, "source": w}) + "\n" for i, w in enumerate(where))
        save_atomically(rows_path(_OUTPUT.value), lambda f: f.write(rows.encode()))
        print(f"wrote {_OUTPUT.value} and {rows_path(_OUTPUT.value)}")
    if _QUERIES.value:
        scores_QxK, rows_QxK = cosine_top_k(
            embedder.embed(_QUERIES.value), corpus_NxH, _TOP_K.value
        )
        for query, scores, rows in zip(_QUERIES.value, scores_QxK, rows_QxK):
            print(f"\nquery: {query}")
            for rank, (score, row) in enumerate(zip(scores, rows), start=1):
                print(f"  {rank}. {score:.4f}  [{row}] {where[row]}  {_snippet(texts[row])}")


if __name__ == "__main__":
    app.run(main)
