"""The long-convolution block with the DFT as matmuls: an order-2 Monarch product (spec section 7).

For N = 2L = N1 * N2, a signal viewed row-major as X (N1, N2) has the spectrum
``xhat[k1 + N1 * k2] = ((F_N1 @ X) * T @ F_N2)[k1, k2]`` (T the twiddles). The convolution
multiplies the signal's spectrum by the kernel's in that transposed layout and runs the steps
backwards with conjugated factors (1/N folded into the kernel's spectrum), so the permutations
cancel and no FFT op is used: all dense matmuls, for backends whose FFT is slow (TPU) or cannot
be partitioned (XLA:CPU under fsdp/tensor sharding).

The zero half of the padded input and the discarded half of the output are never computed: N1 is
even, so the input fills the first N1 / 2 rows, the first stage reads only those, and the last
inverse stage produces only them. The stages are complex64 einsums: on the 2-core CPU a version on
real float32 planes with every stage a plain 2-D matmul ran its forward 10-25% faster but its
forward+backward 1.6-2.3x slower (autodiff of the reordered layouts), so the plain form stays.

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


def conv_factors(n: int) -> tuple[int, int]:
    """(n1, n2) for a size-n (even) convolution: `factor_fft_size`, with the factors swapped if
    needed so that n1 is even. Then the zero-padded input of length n / 2 fills exactly the first
    n1 / 2 rows of its (n1, n2) view."""
    n1, n2 = factor_fft_size(n)
    return (n1, n2) if n1 % 2 == 0 else (n2, n1)


def _complex64(a: np.ndarray) -> Array:
    """A float64 NumPy constant rounded once to a complex64 device array."""
    return jnp.asarray(a.astype(np.complex64))


def spectrum_transposed(x_NxR2: Array, n1: int, n2: int) -> Array:
    """DFT of length n1 * n2 of a signal given by its first R * n2 samples (the rest zero).

    Args:
        x_NxR2: real or complex (..., R * n2), R <= n1: the signal's non-zero rows.

    Returns:
        complex64 (..., n1, n2) with ``[..., k1, k2]`` = frequency k1 + n1 * k2 (the transposed
        layout of spec section 7). The first stage reads only the R given rows.
    """
    f1, f2, tw = (_complex64(a) for a in np_dft_factors(n1, n2))
    rows = x_NxR2.shape[-1] // n2
    x = x_NxR2.astype(jnp.complex64).reshape(*x_NxR2.shape[:-1], rows, n2)
    a = jnp.einsum("km,...mj->...kj", f1[:, :rows], x, precision=DFT_PRECISION) * tw
    return jnp.einsum("...kj,jl->...kl", a, f2, precision=DFT_PRECISION)


def first_rows_of_inverse(b_NxN1xN2: Array, rows: int) -> Array:
    """Real part of the first `rows` * n2 samples of the inverse DFT (without the 1/N) of a
    transposed-layout spectrum: conj(F_N2) along k2, conj(twiddles), then only the kept rows of
    conj(F_N1). Returns float32 (..., rows * n2)."""
    n1, n2 = b_NxN1xN2.shape[-2:]
    f1, f2, tw = (_complex64(np.conj(a)) for a in np_dft_factors(n1, n2))
    c = jnp.einsum("...kl,lj->...kj", b_NxN1xN2, f2, precision=DFT_PRECISION) * tw
    y = jnp.einsum("mk,...kj->...mj", f1[:rows], c, precision=DFT_PRECISION).real
    return y.reshape(*y.shape[:-2], rows * n2)


def _conv(x_BxHxL: Array, filt: ConvFilter) -> Array:
    k_HxN = base.doubled_kernel(filt)
    l = x_BxHxL.shape[-1]
    n1, n2 = conv_factors(2 * l)
    # The input fills the first n1 / 2 rows (no padding is materialised) and only those rows of
    # the output are kept; the 1/N of the inverse is folded into the kernel's spectrum.
    xhat = spectrum_transposed(x_BxHxL, n1, n2)
    khat = spectrum_transposed(k_HxN / (2 * l), n1, n2)
    return first_rows_of_inverse(xhat * khat, n1 // 2)


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate: ConvFilter,
                    u_BxHxL: Array | None = None, residual: ConvFilter | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` with the DFT as matmuls; shapes as there."""
    return base.gated_block(_conv, x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual)
