"""BERT masked-LM corruption, as HF `DataCollatorForLanguageModeling` applies it in the reference.

Each token that is not special ([PAD], [UNK], [CLS], [SEP], [MASK]: the tokenizer's
`all_special_ids`, whose special-tokens mask the collator applies) is selected independently
with probability p; a selected token becomes [MASK] with probability 0.8, a uniformly random
token of the tokenizer's vocab with 0.1, and stays unchanged with 0.1. Labels hold the original
id at selected positions and -100 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mlm_probability: float,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (corrupted input_ids, labels), both int32 with the shape of `input_ids` (B, L).

    `vocab_size` must be the TOKENIZER's size (30522), not a model's padded embedding size:
    random replacements are drawn from [0, vocab_size), as the reference draws from
    `len(tokenizer)`. `special_ids` (the tokenizer's `special_ids`: [PAD], [UNK], [CLS], [SEP],
    [MASK]) are never selected; they must include `mask_id`, so that a [MASK] already in the
    text is never a prediction target.
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must lie in [0, 1], got {mlm_probability}")
    if mask_id not in special_ids:
        raise ValueError(
            f"special_ids must include mask_id {mask_id} (the reference never selects special "
            f"tokens); got {tuple(special_ids)}"
        )
    ids = np.asarray(input_ids, dtype=np.int32)
    selected = (rng.random(ids.shape, dtype=np.float32) < mlm_probability) & ~np.isin(
        ids, special_ids
    )
    labels = np.where(selected, ids, np.int32(IGNORE_INDEX)).astype(np.int32)
    action = rng.random(ids.shape, dtype=np.float32)
    random_ids = rng.integers(0, vocab_size, size=ids.shape, dtype=np.int32)
    corrupted = np.where(selected & (action < 0.8), np.int32(mask_id), ids)
    corrupted = np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted.astype(np.int32), labels
