"""The data shipped in m2jax/data/assets: sizes, checksums recorded in DATA_LICENSES.md, content."""

import gzip
import hashlib
import json
import pathlib

import pytest

import numpy as np

from m2jax.data import embedded_source, get_task, glue_dataset, read_glue_tsv
from m2jax.data.glue import EMBEDDED_GLUE_DIR
from m2jax.data.text_sources import EMBEDDED_CORPUS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = EMBEDDED_CORPUS.parent


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["bert-base-uncased-vocab.txt", "python_docs_corpus.jsonl.gz",
                                  "WNSENSE/train.tsv", "WNSENSE/dev.tsv",
                                  "WNPOS/train.tsv", "WNPOS/dev.tsv"])
def test_checksums_are_recorded_in_data_licenses(name):
    licenses = (ROOT / "DATA_LICENSES.md").read_text()
    assert f"`{name}`" in licenses and _md5(ASSETS / name) in licenses


def test_corpus_size_and_content():
    size = EMBEDDED_CORPUS.stat().st_size
    assert 1_000_000 <= size <= 5_000_000
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 2101
    assert all(d["source"].startswith("python-3.11-doc/") for d in docs)
    assert sum(len(d["text"]) for d in docs) == 7_526_101
    assert min(len(d["text"]) for d in docs) >= 200
    train, val = embedded_source("train"), embedded_source("validation")
    assert (len(train), len(val)) == (2058, 43)
    assert val[0] == docs[0]["text"] and train[0] == docs[1]["text"]
    for licence in ("LICENSE-python-docs.txt", "LICENSE-wordnet.txt"):
        assert (ASSETS / licence).stat().st_size > 1000


def test_sense_task_splits_share_no_example():
    task = get_task("wnsense")
    train = read_glue_tsv(task, "train", EMBEDDED_GLUE_DIR)
    dev = read_glue_tsv(task, "validation", EMBEDDED_GLUE_DIR)
    assert (len(train.texts), len(dev.texts)) == (4014, 1002)
    assert not {t[0] for t in train.texts} & {t[0] for t in dev.texts}
    assert train.labels.sum() == len(train.texts) // 2 and dev.labels.sum() == len(dev.texts) // 2


def test_package_data_ships_the_assets():
    setup = (ROOT / "setup.py").read_text()
    assert '"data/assets/*"' in setup and '"data/assets/WNSENSE/*"' in setup and '"data/assets/WNPOS/*"' in setup


def test_embedded_pos_task_is_balanced_and_split_by_word():
    train = glue_dataset("wnpos", "train", "embedded", max_seq_len=64)
    dev = glue_dataset("wnpos", "validation", "embedded", max_seq_len=64)
    assert (len(train), len(dev)) == (4000, 1000)
    assert np.bincount(train.labels).tolist() == [2000, 2000]
    assert np.bincount(dev.labels).tolist() == [500, 500]
    assert np.all(train.token_type_ids == 0)  # single-sentence task
    with pytest.raises(ValueError, match="embedded"):
        glue_dataset("rte", "train", "embedded")
