"""The shipped WordPiece tokenizer against HF transformers' BertTokenizer (tokenizers-backed)
and BertTokenizerLegacy (the pure-Python reference implementation)."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from m2jax.data import load_tokenizer
from m2jax.data.tokenizer import VOCAB_FILE

transformers = pytest.importorskip("transformers")

HARD_STRINGS = [
    "",
    "   ",
    "Hello, world!",
    "Crème brûlée à la carte; naïve façade, Ångström, ÉCOLE",
    "北京是中国的首都。日本語のテキスト、한국어 텍스트",
    "Emoji: 🤗🚀👍🏽 and ❤️ inside text",
    "Control\x00chars\x07 and\ttabs\r\nnew\u200blines\x7f\ufeff",
    "punctuation!!! ...?!;:'\"()[]{}<>@#$%^&*-_=+/\\|`~",
    "a" * 150 + " short " + "supercalifragilisticexpialidocious" * 3,
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ligatures ﬁ ﬂ",
    "Numbers 3.14159, 1,000,000 and dates 2026-11-28",
    "[CLS] literal [SEP] and [MASK] tokens [PAD]",
    "mixed CASE WoRdS with unaffable unbelievably tokenization",
    "Ελληνικά και русский текст, עברית, العربية",
]


@pytest.fixture(scope="module")
def hf():
    return transformers.BertTokenizer(str(VOCAB_FILE)), transformers.BertTokenizerLegacy(str(VOCAB_FILE))


def test_vocab_is_bert_base_uncased():
    assert hashlib.md5(VOCAB_FILE.read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    tok = load_tokenizer()
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)


def test_single_texts_match_hf(hf):
    tok = load_tokenizer()
    fast, legacy = hf
    for text in HARD_STRINGS:
        ours = tok.encode(text).ids
        assert ours == fast(text)["input_ids"], text
        assert ours == legacy(text)["input_ids"], text
    batch = [e.ids for e in tok.encode_batch(HARD_STRINGS)]
    assert batch == [fast(t)["input_ids"] for t in HARD_STRINGS]


def test_padded_pairs_match_hf(hf):
    """Pairs padded to 24 (most get truncated) equal the tokenizers-backed HF tokenizer, which the
    reference used (AutoTokenizer -> BertTokenizerFast). The Python BertTokenizerLegacy breaks
    longest-first ties on the other side, so it is compared only where nothing is truncated."""
    fast, legacy = hf
    pairs = list(zip(HARD_STRINGS, reversed(HARD_STRINGS)))
    kwargs = dict(padding="max_length", truncation=True, return_token_type_ids=True)
    for L in (24, 512):
        tok = load_tokenizer(max_seq_len=L)
        for a, b in pairs:
            if L == 24:
                # Batched, as the reference's datasets.map(batched=True) calls it: a single call
                # would drop an empty second text instead of encoding [CLS] a [SEP] [SEP].
                want = {k: v[0] for k, v in fast([a], [b], max_length=L, **kwargs).items()}
            elif b:
                want = legacy(a, b, max_length=L, **kwargs)
            else:
                continue
            enc = tok.encode(a, b)
            assert enc.ids == want["input_ids"], (a, b)
            assert enc.type_ids == want["token_type_ids"], (a, b)
            assert enc.attention_mask == want["attention_mask"], (a, b)
            assert len(enc.ids) == L
    tok = load_tokenizer(max_seq_len=24)
    encs = tok.encode_batch(pairs)
    assert [e.ids for e in encs] == fast([a for a, _ in pairs], [b for _, b in pairs],
                                         max_length=24, **kwargs)["input_ids"]
    assert sum(e.attention_mask[-1] for e in encs) == 8  # 8 pairs fill 24: truncation ran


def test_rows_of_long_documents_match_hf_truncation(hf):
    fast, _ = hf
    tok = load_tokenizer()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta,", "gamma.", "über", "中", "🤗", "x" * 120]
    docs = [" ".join(rng.choice(words, size=n)) for n in (0, 3, 50, 2000, 20000)]
    # A long document whose start is almost all whitespace: the prefix shortcut must fall back.
    docs.append(" " * 5000 + "word " * 300)
    docs.append("".join(["中文"] * 3000))  # no whitespace at all
    docs = [d for d in docs if d.strip()]
    for L in (16, 128):
        rows = tok.encode_rows(docs, L)
        want = np.array([fast(d, padding="max_length", max_length=L, truncation=True)["input_ids"]
                         for d in docs], dtype=np.int32)
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(np.stack([tok.encode_row(d, L) for d in docs]), want)
        assert rows.dtype == np.int32 and rows.shape == (len(docs), L)


def test_bad_vocab_file_is_reported(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\nhello\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt:4: duplicate token 'hello'"):
        load_tokenizer(vocab_file=path)
    path.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special token \[CLS\]"):
        load_tokenizer(vocab_file=path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_tokenizer(vocab_file=tmp_path / "missing.txt")


def test_import_is_light():
    code = ("import sys, m2jax.data; heavy = ['tensorflow', 'tensorflow_datasets', 'grain', "
            "'tokenizers', 'transformers', 'sklearn']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
