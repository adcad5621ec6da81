"""GLUE readers (tfds through mock_data, classic TSV folders, the embedded task) and encoding."""

import numpy as np
import pytest

from m2jax.data import GLUE_TASKS, glue_dataset, load_tokenizer, read_glue_tsv
from m2jax.data.glue_tasks import get_task

# Minimal files in the layout of the GLUE download (header rows as in the real files).
TSV = {
    "CoLA/train.tsv": "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
    "CoLA/dev.tsv": "gj04\t0\t*\tThe more we study verbs, the crazier they get they.\n",
    "CoLA/test.tsv": "index\tsentence\n0\tBill whistled past the house.\n",
    "SST-2/train.tsv": "sentence\tlabel\nhide new secretions \t0\na gorgeous film \t1\n",
    "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming journey . \t1\n",
    "MRPC/train.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tHe said so .\tSo he said .\n",
    "MRPC/dev.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA cat .\tA dog .\n",
    "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\tHow?\tWhy?\t0\n",
    "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n2\t3\t4\tIs it?\tIs it?\t1\n",
    "STS-B/train.tsv": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
                        "An air plane is taking off.\t5.000\n"),
    "STS-B/dev.tsv": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                      "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man plays.\tA man sings.\t1.6\n"),
    "MNLI/train.tsv": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                       "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
                       "0\t1\t1e\tgov\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tIt rains.\tIt is dry.\t"
                       "contradiction\tcontradiction\n"
                       "1\t2\t2n\tgov\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tHe ran.\tHe moved.\t"
                       "entailment\tentailment\n"),
    "MNLI/dev_matched.tsv": ("index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
                             "0\t1\t1n\tfiction\tA man.\tA tall man.\tneutral\tneutral\n"),
    "MNLI/dev_mismatched.tsv": ("index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
                                "0\t1\t1e\tletters\tA dog.\tAn animal.\tentailment\tentailment\n"),
    "QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n0\tWho?\tNobody.\tnot_entailment\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n",
    "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tB a.\tnot_entailment\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tA.\tentailment\n",
    "WNLI/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tI hid it.\tIt hid.\t0\n",
    "WNLI/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tI saw it.\tI saw.\t1\n",
}
# label the TSV row above means, by its tfds class name (or score for STS-B)
EXPECTED = {
    ("cola", "train"): ["acceptable", "unacceptable"], ("cola", "validation"): ["unacceptable"],
    ("sst2", "train"): ["negative", "positive"], ("sst2", "validation"): ["positive"],
    ("mrpc", "train"): ["equivalent"], ("mrpc", "validation"): ["not_equivalent"],
    ("qqp", "train"): ["not_duplicate"], ("qqp", "validation"): ["duplicate"],
    ("stsb", "train"): [5.0], ("stsb", "validation"): [1.6],
    ("mnli", "train"): ["contradiction", "entailment"], ("mnli", "validation_matched"): ["neutral"],
    ("mnli", "validation_mismatched"): ["entailment"],
    ("qnli", "train"): ["not_entailment"], ("qnli", "validation"): ["entailment"],
    ("rte", "train"): ["not_entailment"], ("rte", "validation"): ["entailment"],
    ("wnli", "train"): ["not_entailment"], ("wnli", "validation"): ["entailment"],
}


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    for name, text in TSV.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(max_seq_len=128)


def test_task_table_matches_tfds_label_names():
    tfds = pytest.importorskip("tensorflow_datasets")
    configs = {c.name: c for c in tfds.builder_cls("glue").BUILDER_CONFIGS}
    assert set(GLUE_TASKS) - {"wnsense", "wnpos"} == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    for name, task in GLUE_TASKS.items():
        if not task.in_tfds:
            continue
        assert task.label_names == (tuple(configs[name].label_classes) if configs[name].label_classes else None)
        assert set(task.text_fields) == set(configs[name].text_features)
        assert task.is_regression == (name == "stsb")


def test_tsv_labels_follow_tfds_ids(glue_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizer(str(tok.vocab_file))
    for (task, split), want in EXPECTED.items():
        spec = get_task(task)
        data = glue_dataset(task, split, f"tsv:{glue_dir}", tokenizer=tok)
        if spec.is_regression:
            assert data.labels.dtype == np.float32
            np.testing.assert_allclose(data.labels, want)
        else:
            assert data.labels.dtype == np.int32
            assert [spec.label_names[i] for i in data.labels] == want
        raw = read_glue_tsv(spec, split, glue_dir)
        texts = list(zip(*raw.texts))
        enc = hf(*texts, padding="max_length", max_length=128, truncation=True, return_token_type_ids=True)
        np.testing.assert_array_equal(data.input_ids, enc["input_ids"])
        np.testing.assert_array_equal(data.token_type_ids, enc["token_type_ids"])
        np.testing.assert_array_equal(data.attention_mask, enc["attention_mask"])
        assert data.input_ids.shape == (len(want), 128) and data.input_ids.dtype == np.int32
        assert data.skip_log.total == 0
    # The task folder itself is accepted too, and unlabelled test files give -1.
    test = glue_dataset("cola", "test", f"tsv:{glue_dir / 'CoLA'}", tokenizer=tok)
    assert test.labels.tolist() == [-1]
    pair = glue_dataset("mrpc", "train", f"tsv:{glue_dir}", tokenizer=tok)
    assert pair.token_type_ids[0].sum() == sum(tok.encode("So he said .").attention_mask) - 1  # b + [SEP]


def test_malformed_tsv_rows(tmp_path, tok, caplog):
    (tmp_path / "RTE").mkdir()
    rows = ["index\tsentence1\tsentence2\tlabel"]
    rows += [f"{i}\tPremise {i}.\tHypothesis {i}.\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(30)]
    rows[5] = "4\tonly two fields"
    rows[9] = "8\ta\tb\tmaybe"
    (tmp_path / "RTE/train.tsv").write_bytes(("\n".join(rows) + "\n").encode() + b"30\tcaf\xe9\tb\tentailment\n")
    data = glue_dataset("rte", "train", f"tsv:{tmp_path}", tokenizer=tok)
    path = tmp_path / "RTE/train.tsv"
    assert len(data) == 28
    assert data.skip_log.examples == {"2 fields, expected 4": [f"{path}:6"],
                                      "label 'maybe' not in ('entailment', 'not_entailment')": [f"{path}:10"],
                                      "non-UTF-8 bytes": [f"{path}:32 (byte 6)"]}
    assert f"{path}:10" in caplog.text
    # Mostly malformed: the wrong task's file, refused with an error naming it.
    (tmp_path / "RTE/dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "0\ta\tb\t3\n" * 5)
    with pytest.raises(ValueError, match=r"RTE/dev.tsv: 5 of 5 rows malformed.*dev.tsv:2"):
        glue_dataset("rte", "validation", f"tsv:{tmp_path}", tokenizer=tok)
    (tmp_path / "QNLI").mkdir()
    (tmp_path / "QNLI/dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(ValueError, match=r"QNLI/dev.tsv:1: header lacks column\(s\) \['question', 'sentence'\]"):
        glue_dataset("qnli", "validation", f"tsv:{tmp_path}", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"SST-2/train.tsv"):
        glue_dataset("sst2", "train", f"tsv:{tmp_path}", tokenizer=tok)
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
        glue_dataset("squad", "train", f"tsv:{tmp_path}")
    with pytest.raises(ValueError, match=r"only \('wnsense', 'wnpos'\) are embedded"):
        glue_dataset("rte", "train", "embedded")


def test_all_tasks_through_tfds_mock(tok):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        for name, task in GLUE_TASKS.items():
            if not task.in_tfds:
                continue
            for split in ("train",) + task.eval_splits:
                data = glue_dataset(name, split, "tfds", tokenizer=tok)
                assert len(data) == 10 and data.input_ids.shape == (10, 128)
                assert data.labels.dtype == (np.float32 if task.is_regression else np.int32)
                if not task.is_regression:
                    assert data.labels.min() >= 0 and data.labels.max() < task.num_labels
                assert np.all(data.input_ids[:, 0] == tok.cls_id)
                assert (data.token_type_ids.max(axis=1) == (1 if task.is_pair else 0)).all()
                n_sep = (data.input_ids == tok.sep_id).sum(axis=1)
                assert (n_sep == (2 if task.is_pair else 1)).all()


def test_batches_order_padding_and_hosts(tok):
    data = glue_dataset("wnsense", "validation", "embedded", tokenizer=tok)
    n = len(data)
    assert n == 1002
    batches = list(data.batches(32))
    assert [len(b["labels"]) for b in batches] == [32] * 31 + [10]
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), data.labels)  # no shuffle
    assert all(v.dtype == np.int32 for b in batches for v in b.values())
    assert len(list(data.batches(32, drop_remainder=True))) == 31
    padded = list(data.batches(32, pad_remainder=True))
    last = padded[-1]
    assert last["input_ids"].shape == (32, 128) and last["example_mask"].tolist() == [1] * 10 + [0] * 22
    assert (last["labels"][10:] == -1).all() and not last["input_ids"][10:].any()
    two_epochs = list(data.batches(32, shuffle=True, seed=1, num_epochs=2))
    assert len(two_epochs) == 2 * 32  # epochs stay aligned: each ends with its short batch
    first, second = (np.concatenate([b["labels"] for b in e]) for e in (two_epochs[:32],
                                                                        two_epochs[32:]))
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(data.labels.tolist())
    assert not np.array_equal(first, data.labels) and not np.array_equal(first, second)
    hosts = [list(data.batches(32, process_index=i, process_count=2)) for i in range(2)]
    for b0, b1, full in zip(hosts[0], hosts[1], batches[:-1]):
        np.testing.assert_array_equal(np.concatenate([b0["input_ids"], b1["input_ids"]]), full["input_ids"])


def test_embedded_task_is_balanced_pairs(tok):
    train = glue_dataset("wnsense", "train", "embedded", tokenizer=tok)
    assert len(train) == 4014 and abs(train.labels.mean() - 0.5) < 0.01
    assert (train.token_type_ids.max(axis=1) == 1).all()
    assert train.skip_log.total == 0


def test_training_batches_resume_exactly_from_the_iterator_state(tok):
    """GLUE batches come from grain like pretraining's: the checkpoint stores the iterator's
    state, and a restored iterator continues with the very same batches (no replaying)."""
    data = glue_dataset("wnpos", "validation", "embedded", tokenizer=tok)
    kw = dict(shuffle=True, seed=3, num_epochs=None, pad_remainder=True)
    it = data.batches(48, **kw)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(40)]  # across several epochs
    again = data.batches(48, **kw)
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(40))):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
