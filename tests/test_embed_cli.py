"""launch/embed.py: embed a corpus into .npy and search it (the retrieval demo)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import m2jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch import embed as embed_cli  # noqa: E402

N_EMBEDDED_DOCS = 2101


@pytest.fixture(scope="module")
def retrieval_checkpoint(tmp_path_factory):
    """A random-weight checkpoint in the retrieval models' layout: sequence classification."""
    cfg = m2jax.get_model_config(
        "tiny", vocab_size=30528, max_position_embeddings=64, long_conv_l_max=64, num_labels=10
    )
    path = tmp_path_factory.mktemp("retrieval")
    m2jax.save_pretrained(m2jax.M2BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), str(path))
    return str(path)


def _run(*args, umask=None):
    """launch/embed.py in a subprocess (which inherits `umask`)."""
    previous = os.umask(umask) if umask is not None else None
    try:
        return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "embed.py"), *args],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        if previous is not None:
            os.umask(previous)


def test_embeds_the_embedded_corpus_and_finds_a_document_by_its_text(retrieval_checkpoint, tmp_path):
    corpus = embed_cli.open_corpus("embedded", "text", "train")
    query = corpus[100]
    out = tmp_path / "corpus.npy"
    proc = _run(f"--checkpoint={retrieval_checkpoint}", "--input=embedded", f"--output={out}",
                f"--query={query}", "--query=how do I open a file", "--top_k=3", "--batch_size=32",
                umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in (out, tmp_path / "corpus.rows.jsonl"):  # the umask's mode, not mkstemp's 0600
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    vectors = np.load(out)
    assert vectors.shape == (N_EMBEDDED_DOCS, 32) and vectors.dtype == np.float32
    rows = [json.loads(line) for line in open(tmp_path / "corpus.rows.jsonl")]
    assert [r["row"] for r in rows] == list(range(N_EMBEDDED_DOCS))
    assert rows[100]["source"].endswith("python_docs_corpus.jsonl.gz:101")
    # the saved rows are the library's embeddings of those documents
    embedder = m2jax.Embedder.from_pretrained(retrieval_checkpoint)
    np.testing.assert_allclose(vectors[[0, 100, 2100]],
                               embedder.embed([corpus[i] for i in (0, 100, 2100)]),
                               rtol=1e-5, atol=1e-6)
    assert f"embedded {N_EMBEDDED_DOCS} documents -> ({N_EMBEDDED_DOCS}, 32)" in proc.stdout
    hits = re.findall(r"^\s+(\d)\. (-?[\d.]+)\s+\[(\d+)\]", proc.stdout, flags=re.M)
    assert len(hits) == 6 and proc.stdout.count("query: ") == 2
    # a document's own text is its best match (or a document that tokenises identically)
    rank, score, row = hits[0]
    assert rank == "1" and float(score) > 0.9999
    ids, _ = embedder.tokenize([query, corpus[int(row)]])
    np.testing.assert_array_equal(ids[0], ids[1])
    scores = [float(s) for _, s, _ in hits[:3]]
    assert scores == sorted(scores, reverse=True)


def test_text_files_keep_their_line_numbers_and_outputs_are_written_atomically(
        retrieval_checkpoint, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("first document\n\nsecond one\n   \nthird\n")
    source = embed_cli.open_corpus(str(docs), "text", "train")
    texts, where = embed_cli.read_documents(source, max_docs=None)
    assert texts == ["first document", "second one", "third"]
    assert where == [f"{docs}:1", f"{docs}:3", f"{docs}:5"]
    assert embed_cli.read_documents(source, max_docs=2)[0] == texts[:2]
    assert embed_cli.rows_path("out/x.npy") == "out/x.rows.jsonl"

    target = tmp_path / "keep.npy"
    np.save(target, np.ones(3))

    def broken_write(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        embed_cli.save_atomically(str(target), broken_write)
    np.testing.assert_array_equal(np.load(target), np.ones(3))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["docs.txt", "keep.npy"]  # no temporary left


def test_usage_errors_are_named(retrieval_checkpoint, tmp_path):
    proc = _run(f"--checkpoint={retrieval_checkpoint}", "--input=embedded")
    assert proc.returncode != 0 and "give --output" in proc.stderr
    proc = _run(f"--checkpoint={retrieval_checkpoint}", f"--output={tmp_path / 'x.txt'}")
    assert proc.returncode != 0 and "--output must end in .npy" in proc.stderr


def test_cosine_top_k_orders_by_similarity():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((50, 8)).astype(np.float32)
    queries = np.stack([corpus[3] * 5, -corpus[7]])
    scores, rows = m2jax.embedder.cosine_top_k(queries, corpus, 4)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(rows, np.argsort(-sims, axis=1)[:, :4])
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :4], rtol=1e-5)
    assert rows[0, 0] == 3 and scores.dtype == np.float32
    assert m2jax.embedder.cosine_top_k(queries, corpus[:2], 10)[1].shape == (2, 2)
    with pytest.raises(ValueError, match="empty"):
        m2jax.embedder.cosine_top_k(queries, corpus[:0], 3)
