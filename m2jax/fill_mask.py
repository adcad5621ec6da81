"""Fill `[MASK]` tokens with an MLM model: the quickest way to see a checkpoint work."""

from __future__ import annotations

from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2jax.model import M2BertForMaskedLM


class Tokenizer(Protocol):
    vocab_size: int
    mask_id: int

    def encode_row(self, text: str, max_seq_len: int) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def fill_mask(
    model: M2BertForMaskedLM, tokenizer: Tokenizer, text: str, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-`top_k` (token, probability) for each `[MASK]` in `text`, in order of appearance.

    The text is padded to the model's full length, as the reference always does. Predictions are
    restricted to the tokenizer's vocabulary (the released tables carry padding rows past it).
    """
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's word-embedding "
            f"table only {model.config.vocab_size} rows, so its ids would not fit. The `tiny` "
            "test config has a 128-token vocabulary; for real text use a released checkpoint or "
            "get_model_config('tiny-real-vocab') (30528 rows)"
        )
    L = model.config.max_position_embeddings
    ids_L = tokenizer.encode_row(text, L)
    positions = np.flatnonzero(ids_L == tokenizer.mask_id)
    if positions.size == 0:
        raise ValueError(f"no [MASK] token in {text!r} (after truncation to {L} tokens)")
    logits_LxV = model(jnp.asarray(ids_L)[None])[0, :, : tokenizer.vocab_size]
    probs_MxV = np.asarray(jax.nn.softmax(logits_LxV[positions], axis=-1))
    out = []
    for probs_V in probs_MxV:
        best = np.argsort(-probs_V)[:top_k]
        out.append([(tokenizer.decode([int(i)]), float(probs_V[i])) for i in best])
    return out
