"""MLM corruption (HF DataCollatorForLanguageModeling semantics), judged against the reference's
collator through tests/fixtures/masking.npz (made by make_masking_fixture.py)."""

import os

import numpy as np
import pytest

from m2jax.data import IGNORE_INDEX, load_tokenizer, mask_tokens

PAD, UNK, CLS, SEP, MASK, VOCAB = 0, 100, 101, 102, 103, 30522
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "masking.npz"))


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
    out, labels = mask_tokens(
        ids,
        np.random.default_rng(2),
        mlm_probability=p,
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=SPECIAL,
    )
    assert out.dtype == np.int32 and labels.dtype == np.int32 and out.shape == ids.shape
    special = np.isin(ids, SPECIAL)
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
    out, labels = mask_tokens(
        ids,
        np.random.default_rng(0),
        mlm_probability=1.0,
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=SPECIAL,
    )
    replaced = out[(out != MASK) & (out != 5000)]
    assert len(replaced) > 15_000
    assert replaced.min() >= 0 and replaced.max() < VOCAB
    assert replaced.max() > VOCAB - 100  # the whole range is used, uniformly
    counts = np.bincount(replaced // 3000, minlength=11)[:10]
    assert counts.min() > 0.85 * counts.mean()


def test_deterministic_and_validated():
    ids = _rows(np.random.default_rng(0), 8, 32)
    kw = dict(mlm_probability=0.3, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    a = mask_tokens(ids, np.random.default_rng(7), **kw)
    b = mask_tokens(ids, np.random.default_rng(7), **kw)
    c = mask_tokens(ids, np.random.default_rng(8), **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError, match="mlm_probability must lie in"):
        mask_tokens(ids, np.random.default_rng(0), **{**kw, "mlm_probability": 1.5})


def test_tokenizer_special_ids_are_the_reference_collators():
    """HF's collator never selects any of the tokenizer's `all_special_ids`."""
    tok = load_tokenizer()
    assert sorted(tok.special_ids) == [PAD, UNK, CLS, SEP, MASK]


def test_selects_exactly_the_tokens_the_reference_collator_may_select():
    """With p = 1 the reference selected every eligible token; the golden rows hold every special
    id, [UNK] and [MASK] included (from text and sprinkled in)."""
    tok = load_tokenizer()
    ids = GOLDEN["input_ids"]
    assert all(np.any(ids == t) for t in SPECIAL)
    _, labels = mask_tokens(
        ids,
        np.random.default_rng(0),
        mlm_probability=1.0,
        mask_id=tok.mask_id,
        vocab_size=tok.vocab_size,
        special_ids=tok.special_ids,
    )
    np.testing.assert_array_equal(labels != IGNORE_INDEX, GOLDEN["eligible"])


@pytest.mark.parametrize("row", [0, 1])
def test_split_matches_the_reference_collator(row):
    """Selection rate and the 80/10/10 outcome split agree with the collator's on the same rows
    (the collator's figures count ~100k / ~50k selections; ours ~60k / ~30k)."""
    tok = load_tokenizer()
    p = float(GOLDEN["stats_p"][row])
    ids = np.tile(GOLDEN["input_ids"], (120, 1))
    eligible = np.tile(GOLDEN["eligible"], (120, 1))
    out, labels = mask_tokens(
        ids,
        np.random.default_rng(row),
        mlm_probability=p,
        mask_id=tok.mask_id,
        vocab_size=tok.vocab_size,
        special_ids=tok.special_ids,
    )
    sel = labels != IGNORE_INDEX
    assert not np.any(sel & ~eligible)
    n = sel.sum()
    ours = [n / eligible.sum(), (sel & (out == MASK)).sum() / n, (sel & (out == ids)).sum() / n]
    ours.append(1.0 - ours[1] - ours[2])
    theirs = GOLDEN["stats"][row]
    counts = [eligible.sum(), n, n, n]
    golden_counts = [GOLDEN["stats_selected"][row] / theirs[0]] + [
        GOLDEN["stats_selected"][row]
    ] * 3
    for mine, ref, n_mine, n_ref in zip(ours, theirs, counts, golden_counts):
        sigma = np.sqrt(ref * (1 - ref) * (1 / n_mine + 1 / n_ref))
        assert abs(mine - ref) < 5 * sigma, (p, ours, theirs)


def test_mask_id_must_be_special():
    """A [MASK] already in the text must never be selected; a special-id list without it is an
    error rather than a silent difference from the reference."""
    with pytest.raises(ValueError, match="special_ids must include mask_id 103"):
        mask_tokens(
            np.zeros((1, 4), np.int32),
            np.random.default_rng(0),
            mlm_probability=0.5,
            mask_id=MASK,
            vocab_size=VOCAB,
            special_ids=(PAD, CLS, SEP),
        )
