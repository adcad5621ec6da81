"""The long-convolution filters of a model's current weights, kept between compiled calls.

The Hyena filters (`m2jax.filters`) are a function of the parameters and the sequence length
only, not of the input, yet computing them (an MLP with sines over L positions and a decay, four
per layer) is about a sixth of the 80M model's CPU forward at L = 2048. The compiled call
(`m2jax.model.compiled_forward`) therefore computes them once per model, length and set of
weights and passes them to the forward as arguments. Training never uses this: under a caller's
own `jax.jit`/`jax.grad` the filters are computed inside the traced forward, so their gradients
flow.

When the memo is valid: it holds references to the very arrays it was computed from (jax arrays
are immutable) and is reused only while every one of them is still the one the model holds, so
any update (`nnx.update`, `variable[...] = ...`, loading weights) recomputes it on the next call.
Models holding a numpy array in a filter variable (mutable in place) are never memoised.

What is kept is what the forward takes (`M2BertModel.reusable_filters`): on CPU, where the XLA
paths that take spectra run (the dense DFT at L <= 128, else the FFT), each filter's spectrum,
so the forward also skips those transforms; elsewhere the filters themselves.

Memory: the filters take `filter_bytes(cfg, L)` bytes (about 300 MB for the 80M model at
L = 2048, 19 MB at L = 128); one length is kept per model, and nothing is kept when that exceeds
`MAX_BYTES` (then each call computes its filters, as under a caller's jit). Set `MAX_BYTES = 0`
to turn the memo off.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

# The most memory one model's memoised filters may take; larger ones are computed every call.
MAX_BYTES = 1 << 30


class _Entry(NamedTuple):
    seq_len: int
    platform: str
    sources: tuple[Any, ...]  # the arrays the filters were computed from (identity matters)
    filters: Any


_entries: "weakref.WeakKeyDictionary[Any, _Entry]" = weakref.WeakKeyDictionary()


def filter_bytes(cfg: Any, seq_len: int) -> int:
    """Bytes of one model's memoised filters at length L, the larger of their two forms
    (`M2BertModel.reusable_filters`): per layer and filter set (gate, and the residual one with
    `residual_long_conv`), either the float32 (H, L) forward and (bidirectional) reverse kernels
    and the (H,) skip weight, or the complex64 (H, L + 1) spectrum the XLA paths take."""
    sets = 1 + int(cfg.residual_long_conv)
    kernels = 1 + int(cfg.bidirectional)
    per_set = max((kernels * seq_len + 1) * 4, (seq_len + 1) * 8) * cfg.hidden_size
    return cfg.num_hidden_layers * sets * per_set


def within_limit(cfg: Any, seq_lens: list[int]) -> bool:
    """Whether the filters of a model at all these lengths fit in `MAX_BYTES`."""
    return sum(filter_bytes(cfg, n) for n in seq_lens) <= MAX_BYTES


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _compute(compute: Callable[[Any, int, str], Any], module: Any, seq_len: int,
             platform: str) -> Any:
    return compute(module, seq_len, platform)


def memoised_filters(
    module: Any,
    sources: Any,
    cfg: Any,
    seq_len: int,
    compute: Callable[[Any, int, str], Any],
    platform: str,
) -> Any | None:
    """`compute(module, seq_len, platform)` (compiled), reused while the arrays of `sources` are
    unchanged.

    Args:
      module: what `compute` reads (an NNX module: a pytree of its arrays); the memo is kept per
        module object and dropped with it.
      sources: a pytree holding every array the result depends on (the filter sub-modules).
      cfg: the model config (`filter_bytes` sizes the result from it).
      compute: a module-level function (it keys the compile),
        `compute(module, L, platform) -> pytree`.
      platform: where the forward that takes the result runs (the form of the filters may
        depend on it, `M2BertModel.reusable_filters`).
    Returns:
      The pytree of filters, or None when they are not memoised (over `MAX_BYTES`, or a source
      is not an immutable jax array); the caller then computes them inside its forward.
    """
    if not within_limit(cfg, [seq_len]):
        _entries.pop(module, None)
        return None
    arrays = tuple(jax.tree.leaves(sources))
    if any(isinstance(a, np.ndarray) or not isinstance(a, jax.Array) for a in arrays):
        return None
    entry = _entries.get(module)
    if (
        entry is not None
        and entry.seq_len == seq_len
        and entry.platform == platform
        and len(entry.sources) == len(arrays)
        and all(a is b for a, b in zip(entry.sources, arrays))
    ):
        return entry.filters
    _entries.pop(module, None)  # free the old memo before computing the new one
    filters = _compute(compute, module, seq_len, platform)
    _entries[module] = _Entry(seq_len, platform, arrays, filters)
    return filters


def clear() -> None:
    """Drop every memo (frees their memory; the next calls recompute)."""
    _entries.clear()
