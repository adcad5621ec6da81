"""The M2 long-convolution block in plain JAX: the XLA path and the kernels' reference.

The block is steps 4-7 of the sequence mixer (spec section 3.1), channels-first:

    w = v * x1
    y = (LongConv_f(w) + D_f * w) * x2 + LongConv_g(u) + D_g * u

with the bidirectional long convolution of spec 3.3. Everything is computed in float32 (spec
section 8) and returned in v's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2jax.long_conv import bidirectional_long_conv

Array = jax.Array


class ConvFilter(NamedTuple):
    """One filter set of the block: kernels (H, L) and the skip weight D (H,).

    Attributes:
        k_fwd_HxL: causal kernel, float.
        k_rev_HxL: anti-causal kernel, or None for a causal-only convolution.
        d_H: per-channel skip weight D.
    """

    k_fwd_HxL: Array
    k_rev_HxL: Array | None
    d_H: Array


def long_conv_with_skip(x_BxHxL: Array, filt: ConvFilter, implementation: str = "fft") -> Array:
    """``LongConv(x) + D * x`` in float32, shape (B, H, L)."""
    x32 = x_BxHxL.astype(jnp.float32)
    y = bidirectional_long_conv(x32, filt.k_fwd_HxL, filt.k_rev_HxL, implementation=implementation)
    return y + filt.d_H.astype(jnp.float32)[None, :, None] * x32


def m2_block_reference(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate_filter: ConvFilter,
                       u_BxHxL: Array | None = None, residual_filter: ConvFilter | None = None,
                       *, conv_implementation: str = "fft") -> Array:
    """The gated long-conv block of the M2 sequence mixer, pure JAX (XLA FFTs by default).

    Args:
        x1_BxHxL, x2_BxHxL, v_BxHxL: the three branches of the short convolution, (B, H, L).
        gate_filter: the filter set f applied to ``v * x1``.
        u_BxHxL: the mixer's input (channels-first) for the residual long convolution, or None.
        residual_filter: the filter set g for u (required when u is given).
        conv_implementation: `m2jax.long_conv.IMPLEMENTATIONS` entry for the convolutions.

    Returns:
        y, (B, H, L), dtype of v; computed in float32.
    """
    f32 = jnp.float32
    w = v_BxHxL.astype(f32) * x1_BxHxL.astype(f32)
    y = long_conv_with_skip(w, gate_filter, conv_implementation) * x2_BxHxL.astype(f32)
    if u_BxHxL is not None:
        if residual_filter is None:
            raise ValueError("u_BxHxL was given without residual_filter: both or neither.")
        y = y + long_conv_with_skip(u_BxHxL, residual_filter, conv_implementation)
    return y.astype(v_BxHxL.dtype)
