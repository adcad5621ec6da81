"""The long-convolution block with the DFT as matmuls: an order-2 Monarch product (spec section 7).

For N = 2L = N1 * N2, a signal viewed row-major as X (N1, N2) has the spectrum
``xhat[k1 + N1 * k2] = ((F_N1 @ X) * T @ F_N2)[k1, k2]`` (T the twiddles). The convolution
multiplies the signal's spectrum by the kernel's in that transposed layout and runs the steps
backwards with conjugated factors (1/N in the inverse twiddles), so the permutations cancel and
no FFT op is used: all dense matmuls, for backends whose FFT is slow (TPU) or cannot be
partitioned (XLA:CPU under fsdp/tensor sharding).

DFT matrices and twiddles are built in float64 NumPy from exact integer phases (k * n mod N) and
rounded once to complex64: exp(-2 pi i k n / N) with k n ~ N^2 in float32 would lose digits at
the sizes M2 needs (N up to 65536).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.long_conv_block import base
from kernels.long_conv_block.base import ConvFilter

Array = jax.Array

# The DFT must stay float32-accurate (spec 7); GPUs/TPUs would otherwise run f32 matmuls in
# reduced precision.
DFT_PRECISION = jax.lax.Precision.HIGHEST


def supports(seq_len: int, dtype: jnp.dtype) -> bool:
    """L >= 2 (N = 2L must factor as N1 * N2 with both >= 2); every floating dtype."""
    del dtype
    return seq_len >= 2


def factor_fft_size(n: int) -> tuple[int, int]:
    """Split an FFT size into (n1, n2) with n1 * n2 == n, 2 <= n1 <= n2 and n1 as close to
    sqrt(n) as the divisors allow (balanced factors keep both matmuls small)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise ValueError(f"FFT size must be an int; got {n!r} of type {type(n).__name__}.")
    n = int(n)
    if n < 4:
        raise ValueError(f"FFT size must be >= 4 to factor as n1*n2 with n1, n2 >= 2; got {n}.")
    for n1 in range(math.isqrt(n), 1, -1):
        if n % n1 == 0:
            return n1, n // n1
    raise ValueError(
        f"FFT size {n} is prime: it has no order-2 Monarch factorisation n1*n2 with n1, n2 >= 2.")


def _unit_phase(numerator: np.ndarray, n: int) -> np.ndarray:
    """exp(-2 pi i numerator / n) in float64, the phase reduced mod n in exact integers."""
    return np.exp(-2j * np.pi * (np.mod(numerator, n) / n))


@functools.lru_cache(maxsize=None)
def np_dft_factors(n1: int, n2: int, inverse: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(F_N1, F_N2, T)`` in complex128, ``T[k1, m2] = exp(-2 pi i k1 m2 / N)``.

    For x viewed row-major as X (n1, n2): ``xhat[k1 + n1 k2] = ((F_N1 @ X) * T @ F_N2)[k1, k2]``
    (DFT matrices are symmetric). ``inverse=True`` conjugates every factor and folds the 1/N of
    the inverse DFT into the twiddles.
    """
    i1, i2 = np.arange(n1, dtype=np.int64), np.arange(n2, dtype=np.int64)
    f1, f2 = _unit_phase(np.outer(i1, i1), n1), _unit_phase(np.outer(i2, i2), n2)
    tw = _unit_phase(np.outer(i1, i2), n1 * n2)
    if inverse:
        f1, f2, tw = np.conj(f1), np.conj(f2), np.conj(tw) / (n1 * n2)
    return f1, f2, tw


def dft_factors(n1: int, n2: int, inverse: bool = False) -> tuple[Array, Array, Array]:
    """`np_dft_factors` rounded once to complex64 device arrays."""
    return tuple(jnp.asarray(a.astype(np.complex64)) for a in np_dft_factors(n1, n2, inverse))


def dft_transposed(x_NxM: Array, n1: int, n2: int) -> Array:
    """Forward DFT of the last axis (length M = n1 * n2) without its final permutation.

    Returns complex64 ``b`` (..., n1, n2) with ``b[..., k1, k2] = DFT(x)[..., k1 + n1 * k2]``.
    """
    f1, f2, tw = dft_factors(n1, n2, inverse=False)
    x = x_NxM.astype(jnp.complex64).reshape(*x_NxM.shape[:-1], n1, n2)
    a = jnp.einsum("km,...mj->...kj", f1, x, precision=DFT_PRECISION) * tw
    return jnp.einsum("...kj,jl->...kl", a, f2, precision=DFT_PRECISION)


def idft_transposed(b_NxN1xN2: Array) -> Array:
    """Inverse of `dft_transposed`: complex64 (..., n1 * n2) in natural time order (1/N scaled)."""
    n1, n2 = b_NxN1xN2.shape[-2:]
    f1, f2, tw = dft_factors(n1, n2, inverse=True)
    c = jnp.einsum("...kl,lj->...kj", b_NxN1xN2.astype(jnp.complex64), f2,
                   precision=DFT_PRECISION) * tw
    x = jnp.einsum("mk,...kj->...mj", f1, c, precision=DFT_PRECISION)
    return x.reshape(*b_NxN1xN2.shape[:-2], n1 * n2)


def _conv(x_SxBxHxL: Array, k_SxHxN: Array) -> Array:
    l = x_SxBxHxL.shape[-1]
    n1, n2 = factor_fft_size(2 * l)
    x_SxBxHxN = jnp.pad(x_SxBxHxL, [(0, 0)] * (x_SxBxHxL.ndim - 1) + [(0, l)])
    xhat = dft_transposed(x_SxBxHxN, n1, n2)
    khat = dft_transposed(k_SxHxN, n1, n2)[:, None]
    return idft_transposed(xhat * khat)[..., :l].real


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate: ConvFilter,
                    u_BxHxL: Array | None = None, residual: ConvFilter | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` with the DFT as matmuls; shapes as there."""
    return base.gated_block(_conv, x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual)
