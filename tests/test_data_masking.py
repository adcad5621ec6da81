"""MLM corruption statistics (HF DataCollatorForLanguageModeling semantics)."""

import numpy as np
import pytest

from m2jax.data import IGNORE_INDEX, mask_tokens

PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 30522


def _rows(rng, n_rows, length):
    """Rows of [CLS] tokens [SEP] [PAD]... with random real lengths and ids in [999, 30522)."""
    ids = rng.integers(999, VOCAB, size=(n_rows, length), dtype=np.int32)
    lengths = rng.integers(2, length + 1, size=n_rows)
    for r, n in enumerate(lengths):
        ids[r, 0], ids[r, n - 1], ids[r, n:] = CLS, SEP, PAD
    return ids


@pytest.mark.parametrize("p", [0.30, 0.15])
def test_rate_split_and_specials(p):
    rng = np.random.default_rng(1)
    ids = _rows(rng, 2000, 128)  # 256k positions, ~130k real tokens
    out, labels = mask_tokens(ids, np.random.default_rng(2), mlm_probability=p, mask_id=MASK,
                              vocab_size=VOCAB, special_ids=(PAD, CLS, SEP))
    assert out.dtype == np.int32 and labels.dtype == np.int32 and out.shape == ids.shape
    special = np.isin(ids, (PAD, CLS, SEP))
    real = ~special
    assert real.sum() > 100_000
    selected = labels != IGNORE_INDEX
    assert not np.any(selected & special)  # specials never predicted ...
    np.testing.assert_array_equal(out[special], ids[special])  # ... nor changed
    np.testing.assert_array_equal(labels[selected], ids[selected])
    assert abs(selected.sum() / real.sum() - p) < 0.01
    n_sel = selected.sum()
    as_mask = selected & (out == MASK)
    unchanged = selected & (out == ids)
    replaced = selected & (out != MASK) & (out != ids)
    assert abs(as_mask.sum() / n_sel - 0.8) < 0.01
    # A random draw can hit the original id (p ~ 1/30522), so 'unchanged' is ~10% + tiny.
    assert abs(unchanged.sum() / n_sel - 0.1) < 0.01
    assert abs(replaced.sum() / n_sel - 0.1) < 0.01
    # Unselected positions are untouched.
    np.testing.assert_array_equal(out[~selected], ids[~selected])


def test_random_tokens_come_from_tokenizer_vocab_only():
    """Models pad the embedding to 30528; replacements must stay below the tokenizer's 30522."""
    ids = np.full((400, 512), 5000, np.int32)
    out, labels = mask_tokens(ids, np.random.default_rng(0), mlm_probability=1.0, mask_id=MASK,
                              vocab_size=VOCAB, special_ids=(PAD, CLS, SEP))
    replaced = out[(out != MASK) & (out != 5000)]
    assert len(replaced) > 15_000
    assert replaced.min() >= 0 and replaced.max() < VOCAB
    assert replaced.max() > VOCAB - 100  # the whole range is used, uniformly
    counts = np.bincount(replaced // 3000, minlength=11)[:10]
    assert counts.min() > 0.85 * counts.mean()


def test_deterministic_and_validated():
    ids = _rows(np.random.default_rng(0), 8, 32)
    kw = dict(mlm_probability=0.3, mask_id=MASK, vocab_size=VOCAB, special_ids=(PAD, CLS, SEP))
    a = mask_tokens(ids, np.random.default_rng(7), **kw)
    b = mask_tokens(ids, np.random.default_rng(7), **kw)
    c = mask_tokens(ids, np.random.default_rng(8), **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError, match="mlm_probability must lie in"):
        mask_tokens(ids, np.random.default_rng(0), **{**kw, "mlm_probability": 1.5})
