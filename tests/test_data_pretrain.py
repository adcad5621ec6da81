"""Masked-LM pretraining pipeline: shapes, host sharding, resumption, packing, bad input."""

import json
import logging

import numpy as np
import pytest

from m2jax.data import (
    FileTextSource,
    TfdsTextSource,
    embedded_source,
    host_shard,
    load_tokenizer,
    pretrain_batches,
)
from m2jax.data.masking import IGNORE_INDEX

L = 32


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _originals(batch):
    """Undo the masking: labels hold the original id wherever the input was corrupted."""
    return np.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def _write_corpus(path, n_docs, words_per_doc=12):
    rng = np.random.default_rng(n_docs)
    vocab = ["river", "stone", "light", "quiet", "number", "garden", "winter", "paper", "engine"]
    docs = [f"document {i} " + " ".join(rng.choice(vocab, size=words_per_doc)) for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return docs


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_embedded_batches_shapes_and_fields(tok):
    it = pretrain_batches("embedded", max_seq_len=128, global_batch_size=16, seed=3,
                          process_index=1, process_count=2, tokenizer=tok)
    batches = _take(it, 6)
    for b in batches:
        assert set(b) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        for v in b.values():
            assert v.shape == (8, 128) and v.dtype == np.int32
        orig = _originals(b)
        assert np.all(orig[:, 0] == tok.cls_id)
        np.testing.assert_array_equal(b["attention_mask"], (orig != tok.pad_id).astype(np.int32))
        assert not b["token_type_ids"].any()
        assert np.all(b["labels"][np.isin(orig, tok.special_ids)] == IGNORE_INDEX)
        assert b["input_ids"].max() < tok.vocab_size
    real = sum(int((~np.isin(_originals(b), tok.special_ids)).sum()) for b in batches)
    predicted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert real > 5000 and abs(predicted / real - 0.30) < 0.03
    assert it.skip_log.total == 0


@pytest.mark.parametrize("packing,prefetch,threads", [(False, 0, None), (True, 0, None),
                                                      (False, 3, None), (False, 0, 2), (True, 2, 2)])
def test_restored_iterator_continues_identically(tmp_path, tok, packing, prefetch, threads):
    _write_corpus(tmp_path / "c.jsonl", 37)
    kw = dict(max_seq_len=L, global_batch_size=6, seed=11, packing=packing, shuffle=True,
              process_index=0, process_count=1, tokenizer=tok, prefetch_batches=prefetch,
              num_threads=threads)
    it = pretrain_batches(f"files:{tmp_path}/*.jsonl", **kw)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # what an orbax checkpoint stores
    # 15 more batches cross several epoch boundaries (37 documents, 6 rows a batch).
    expected = _take(it, 15)
    restored = pretrain_batches(f"files:{tmp_path}/*.jsonl", **kw)
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 15)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    fresh = _take(pretrain_batches(f"files:{tmp_path}/*.jsonl", **kw), 19)[4:]
    np.testing.assert_array_equal(fresh[7]["input_ids"], expected[7]["input_ids"])
    other_seed = _take(pretrain_batches(f"files:{tmp_path}/*.jsonl", **{**kw, "seed": 12}), 5)[4]
    assert not np.array_equal(other_seed["labels"], fresh[0]["labels"])


def test_two_hosts_see_disjoint_shards_covering_everything(tmp_path, tok):
    docs = _write_corpus(tmp_path / "c.jsonl", 40)
    everything = {tuple(r) for r in tok.encode_rows(docs, L)}
    assert len(everything) == 40
    seen = []
    for host in range(2):
        it = pretrain_batches(f"files:{tmp_path / 'c.jsonl'}", max_seq_len=L, global_batch_size=8,
                              seed=5, num_epochs=1, process_index=host, process_count=2, tokenizer=tok)
        rows = [tuple(r) for b in it for r in _originals(b)]
        assert len(rows) == 20
        seen.append(set(rows))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == everything
    assert host_shard(40, 0, 2) == (0, 20) and host_shard(41, 1, 2) == (20, 41)


def test_epochs_are_reshuffled_permutations(tmp_path, tok):
    docs = _write_corpus(tmp_path / "c.jsonl", 24)
    rows = tok.encode_rows(docs, L)
    index = {tuple(r): i for i, r in enumerate(rows)}
    it = pretrain_batches(f"files:{tmp_path / 'c.jsonl'}", max_seq_len=L, global_batch_size=4,
                          mlm_probability=0.15, seed=0, num_epochs=2, process_index=0,
                          process_count=1, tokenizer=tok)
    order = [index[tuple(r)] for b in it for r in _originals(b)]
    assert len(order) == 48
    first, second = order[:24], order[24:]
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second and first != list(range(24))
    unshuffled = pretrain_batches(f"files:{tmp_path / 'c.jsonl'}", max_seq_len=L, global_batch_size=4,
                                  shuffle=False, num_epochs=1, process_index=0, process_count=1,
                                  tokenizer=tok)
    assert [index[tuple(r)] for b in unshuffled for r in _originals(b)] == list(range(24))


def test_packing_fills_rows_with_the_document_stream(tmp_path, tok):
    docs = _write_corpus(tmp_path / "c.jsonl", 30, words_per_doc=20)
    it = pretrain_batches(f"files:{tmp_path / 'c.jsonl'}", max_seq_len=L, global_batch_size=2,
                          packing=True, shuffle=False, num_epochs=1, process_index=0,
                          process_count=1, tokenizer=tok)
    batches = list(it)
    rows = np.concatenate([_originals(b) for b in batches])
    masks = np.concatenate([b["attention_mask"] for b in batches])
    stream = [t for ids in tok.word_ids(docs) for t in ids + [tok.sep_id]]
    assert np.all(rows[:, 0] == tok.cls_id)
    bodies = rows[:, 1:].reshape(-1)
    assert len(bodies) >= len(stream) - (L - 1) * 2  # at most the last (partial) batch dropped
    n = min(len(bodies), len(stream))
    np.testing.assert_array_equal(bodies[:n], stream[:n])
    assert masks[:-1].all()  # every row but possibly the last is full: no padding is wasted


def test_bad_documents_are_skipped_with_counted_warnings(tmp_path, tok, caplog):
    good = ["first good document", "second good one " + "word " * 5000, "third"]
    path = tmp_path / "mixed.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps({"text": good[0]}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9 latin-1"}\n')           # line 2: not UTF-8
        f.write(b'{"text": "unterminated\n')                  # line 3: invalid JSON
        f.write(json.dumps({"body": "no text field"}).encode() + b"\n")  # line 4
        f.write(json.dumps({"text": "   \t "}).encode() + b"\n")         # line 5: whitespace
        f.write(json.dumps({"text": 42}).encode() + b"\n")                # line 6: not a string
        f.write(json.dumps({"text": good[1]}).encode() + b"\r\n")
        f.write(b"\n")                                                     # line 8: empty
        f.write(json.dumps({"text": good[2]}).encode())                   # no final newline
    with caplog.at_level(logging.WARNING, logger="m2jax.data"):
        source = FileTextSource(str(path))
    assert [source[i] for i in range(len(source))] == good
    assert [source.where(i) for i in range(len(source))] == [f"{path}:{n}" for n in (1, 7, 9)]
    assert source.skip_log.total == 6
    assert source.skip_log.examples["non-UTF-8 bytes"] == [f"{path}:2 (byte 13)"]
    assert source.skip_log.examples["invalid JSON (JSONDecodeError)"] == [f"{path}:3"]
    assert source.skip_log.examples["missing field 'text'"] == [f"{path}:4"]
    assert source.skip_log.examples["empty or whitespace-only document"] == [f"{path}:5", f"{path}:8"]
    assert f"{path}:4" in caplog.text
    it = pretrain_batches(f"files:{path}", max_seq_len=L, global_batch_size=3, shuffle=False,
                          num_epochs=1, process_index=0, process_count=1, tokenizer=tok)
    (batch,) = list(it)
    np.testing.assert_array_equal(_originals(batch), tok.encode_rows(good, L))
    assert it.skip_log.total == 6

    txt = tmp_path / "lines.txt"
    txt.write_bytes(b"one document\n\nanother\xff\xfe bad\nlast one\n")
    source = FileTextSource(str(txt))
    assert [source[i] for i in range(len(source))] == ["one document", "last one"]
    assert [source.where(i) for i in range(len(source))] == [f"{txt}:1", f"{txt}:4"]
    assert dict(source.skip_log.counts) == {"empty or whitespace-only document": 1, "non-UTF-8 bytes": 1}


def test_unusable_inputs_raise_clear_errors(tmp_path, tok):
    kw = dict(max_seq_len=L, global_batch_size=2, process_index=0, process_count=1, tokenizer=tok)
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n\n')
    with pytest.raises(ValueError, match=r"no usable document.*missing field 'text'"):
        pretrain_batches(f"files:{tmp_path / 'bad.jsonl'}", **kw)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        pretrain_batches(f"files:{tmp_path}/nothing*.jsonl", **kw)
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ValueError, match="data.parquet: unsupported file type"):
        pretrain_batches(f"files:{tmp_path / 'data.parquet'}", **kw)
    with pytest.raises(ValueError, match="unknown pretraining source 'hf:c4'"):
        pretrain_batches("hf:c4", **kw)
    with pytest.raises(ValueError, match="have no splits"):
        pretrain_batches(f"files:{tmp_path / 'bad.jsonl'}", split="validation", **kw)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        pretrain_batches("embedded", **{**kw, "process_count": 3})


def test_tfds_c4_mock_sharded_and_resumable(tok):
    tfds = pytest.importorskip("tensorflow_datasets")
    from m2jax.data import TfdsTextSource

    with tfds.testing.mock_data(num_examples=24):
        source = TfdsTextSource("c4/en", "train")
        texts = [source[i] for i in range(len(source))]
        everything = [tuple(r) for r in tok.encode_rows(texts, L)]
        kw = dict(max_seq_len=L, global_batch_size=4, seed=2, tokenizer=tok, process_count=2)
        seen = []
        for host in range(2):
            it = pretrain_batches("tfds:c4/en", num_epochs=1, process_index=host, **kw)
            seen.append(sorted(tuple(r) for b in it for r in _originals(b)))
        assert len(seen[0]) == len(seen[1]) == 12
        assert sorted(seen[0] + seen[1]) == sorted(everything)
        it = pretrain_batches("tfds:c4/en", process_index=0, **kw)
        _take(it, 3)
        state = it.get_state()
        want = _take(it, 8)
        again = pretrain_batches("tfds:c4/en", process_index=0, **kw)
        again.set_state(state)
        for a, b in zip(want, _take(again, 8)):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
            np.testing.assert_array_equal(a["labels"], b["labels"])
        with pytest.raises(KeyError, match=r"no field 'body'.*'text'"):
            pretrain_batches("tfds:c4/en", text_field="body", process_index=0, **kw)


def test_mostly_unusable_stream_raises_instead_of_spinning():
    """A tfds stream whose documents are nearly all unusable stops with an error, not a hang."""
    import grain

    from m2jax.data.pretrain import _drop_none

    ds = grain.MapDataset.range(5000).map(lambda i: i if i % 50 == 0 else None)
    it = iter(_drop_none(ds.to_iter_dataset(allow_nones=True)))
    assert next(it) == 0
    with pytest.raises(ValueError, match=r"skipped 98.00 % of the last seen 1000 elements"):
        list(it)


def test_iterator_position_lives_in_an_orbax_checkpoint(tmp_path, tok):
    """The trainer saves the iterator beside the model state; a restore resumes the stream."""
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    kw = dict(max_seq_len=L, global_batch_size=4, seed=1, process_index=0, process_count=1, tokenizer=tok)
    it = pretrain_batches("embedded", **kw)
    _take(it, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                            data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    want = _take(it, 4)
    restored = pretrain_batches("embedded", **kw)
    out = manager.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3)}),
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(out["state"]["w"], [0.0, 1.0, 2.0])
    for a, b in zip(want, _take(restored, 4)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    manager.close()


def test_tfds_records_with_bad_text_are_skipped_and_counted(tok):
    tfds = pytest.importorskip("tensorflow_datasets")
    records = [{"text": f"good document {i}".encode()} for i in range(10)]
    records[2] = {"text": b"\xff\xfe broken"}
    records[5] = {"text": b"   "}
    records[7] = {"url": b"no text"}

    def as_data_source(builder, *args, **kwargs):
        return records

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        it = pretrain_batches("tfds:c4/en", max_seq_len=L, global_batch_size=7, shuffle=False,
                              num_epochs=1, process_index=0, process_count=1, tokenizer=tok)
        (batch,) = list(it)
        assert TfdsTextSource("c4/en", "train").where(7) == "tfds:c4/en[train][7]"
    good = [r["text"].decode() for i, r in enumerate(records) if i not in (2, 5, 7)]
    np.testing.assert_array_equal(_originals(batch), tok.encode_rows(good, L))
    assert it.skip_log.examples == {"non-UTF-8 bytes": ["tfds:c4/en[train][2] (byte 0)"],
                                    "empty or whitespace-only document": ["tfds:c4/en[train][5]"],
                                    "missing field 'text'": ["tfds:c4/en[train][7]"]}


def test_embedded_splits_name_the_corpus_line_of_each_document():
    validation = embedded_source("validation")
    # every 50th document is held out: documents 0, 50, 100, ... (corpus lines 1, 51, 101, ...)
    assert validation.where(2).endswith("python_docs_corpus.jsonl.gz:101")
    assert embedded_source("train").where(0).endswith("python_docs_corpus.jsonl.gz:2")
