"""The long-convolution block with XLA's real FFTs of length 2L (any L >= 1, any backend).

The convolution theorem with the default "backward" norm: ``irfft(rfft(x, N) * rfft(k, N), N)``
is the plain circular convolution of size N = 2L (spec 3.3). ``jnp.fft`` rejects bf16 inputs,
and the published runs kept this step in float32 anyway (spec section 8).

The filter's half, ``rfft(k, N)``, depends on the weights and L only: `filter_spectrum` computes
it ahead, and the block takes it in place of the `ConvFilter` (`base.FilterSpectrum`), which
saves two of the six FFTs per block and the doubled kernels' passes when one filter serves many
calls (the memoised inference call, `m2jax.filter_cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.long_conv_block import base
from kernels.long_conv_block.base import ConvFilter, FilterSpectrum

Array = jax.Array


def supports(seq_len: int, dtype: jnp.dtype) -> bool:
    """Every L >= 1 and every floating dtype."""
    del dtype
    return seq_len >= 1


def filter_spectrum(filt: ConvFilter) -> FilterSpectrum:
    """``rfft(doubled_kernel(filt), n=2L)``: complex64 (H, L + 1), the skip weight folded in."""
    length = filt.k_fwd_HxL.shape[-1]
    return FilterSpectrum(jnp.fft.rfft(base.doubled_kernel(filt), n=2 * length))


def _conv(x_BxHxL: Array, filt: ConvFilter | FilterSpectrum) -> Array:
    l = x_BxHxL.shape[-1]
    n = 2 * l
    xhat = jnp.fft.rfft(x_BxHxL, n=n)
    if not isinstance(filt, FilterSpectrum):
        filt = filter_spectrum(filt)
    return jnp.fft.irfft(xhat * filt.khat_HxF, n=n)[..., :l]


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array,
                    gate: ConvFilter | FilterSpectrum, u_BxHxL: Array | None = None,
                    residual: ConvFilter | FilterSpectrum | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` with XLA FFTs; shapes and dtypes as there.
    Filters may be `ConvFilter`s or their `filter_spectrum`s."""
    return base.gated_block(_conv, x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual)
