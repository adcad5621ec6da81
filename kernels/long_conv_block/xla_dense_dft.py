"""The long-convolution block with the real DFT of length 2L as one dense matmul each way.

For short sequences this is the fastest path on CPU: a (rows, L) x (L, 2L) matmul runs at the
matmul rate on every core, while XLA:CPU's FFTs of short rows spread poorly over the cores (an rfft
of (8, 768) rows of 256 used 1.4 cores of 2: 3.6 ms, 4.3 ms on one core; docs/perf.md). The
O(L^2) work per row beats the FFT's O(L log L) up to `MAX_SEQ_LEN` on the 2-core dev machine
(docs/perf.md: the gated block's forward at L = 128 ran 1.3-1.9x faster than with XLA's FFTs; at
L = 256 0.6-1.1x, at L = 512 0.5-0.6x). Forward + backward it ran at 0.6-0.9x, so `auto` runs
it for prepared filter spectra (inference) only.

Real planes, no complex numbers: a signal's spectrum is ``[Re X_0..X_L, Im X_0..X_L]``, float32,
``x (..., L) @ A (L, 2 (L + 1))`` (only the first L samples are non-zero, so only those rows of
the DFT are used); the first L outputs of the inverse are ``P (..., 2 (L + 1)) @ B (2 (L + 1), L)``
with the 1/N and the factor 2 of the paired bins folded into B, and zero rows for the imaginary
parts of the DC and Nyquist bins (an inverse real DFT ignores them). The two planes run as
separate matmuls each way, ``x @ A_re``, ``x @ A_im`` and ``P_re @ B_re + P_im @ B_im``: the
same FLOPs as one matmul on the concatenated planes, without slicing the forward's output or
concatenating the product's planes (a pass over the spectra; the block's forward ran 1.26-1.28x
faster without it at 8 x 128 on the 2-core CPU, docs/perf.md). The filter's spectrum, or its
`xla_fft.FilterSpectrum`, is split into the same planes. Every stage is a plain 2-D matmul or one
elementwise pass, so the path also partitions under any sharding (XLA:CPU cannot partition an
FFT). The backward is written out (a custom VJP): the same matmuls with the transposed constants
and the conjugate product.

DFT matrices are built in float64 NumPy from exact integer phases (k * n mod N) and rounded once
to float32; the matmuls run at HIGHEST precision (spec 7: the DFT stays float32-accurate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.long_conv_block import base
from kernels.long_conv_block.base import ConvFilter, FilterSpectrum

Array = jax.Array

# The longest L this path takes: beyond it the O(L^2) matmuls cost more than the FFTs (measured
# on the 2-core CPU, docs/perf.md: 0.6-0.9x the FFT path's forward at L = 256), and the DFT
# matrices (about 2 L^2 floats each) grow.
MAX_SEQ_LEN = 128

DFT_PRECISION = jax.lax.Precision.HIGHEST


def supports(seq_len: int, dtype: jnp.dtype) -> bool:
    """1 <= L <= MAX_SEQ_LEN, every floating dtype."""
    del dtype
    return 1 <= seq_len <= MAX_SEQ_LEN


def _phases(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """2 pi (row * col mod n) / n in float64, the product reduced in exact integers."""
    return 2 * np.pi * (np.mod(np.outer(rows, cols), n) / n)


@functools.lru_cache(maxsize=None)
def np_forward_planes(samples: int, seq_len: int) -> np.ndarray:
    """A, float64 (samples, 2 (L + 1)): ``x @ A`` is ``[Re X_0..X_L, Im X_0..X_L]`` for the
    size-2L DFT X of a signal whose first `samples` entries are x (the rest zero)."""
    phase = _phases(np.arange(samples), np.arange(seq_len + 1), 2 * seq_len)
    minus_sin = -np.sin(phase)
    minus_sin[:, [0, seq_len]] = 0.0  # exactly: the DC and Nyquist bins of a real signal are real
    return np.concatenate([np.cos(phase), minus_sin], axis=1)


@functools.lru_cache(maxsize=None)
def np_inverse_planes(seq_len: int) -> np.ndarray:
    """B, float64 (2 (L + 1), L): ``P @ B`` is the first L samples of the size-2L inverse real DFT
    of the spectrum with planes P (ordered as `np_forward_planes` gives them), 1/N included."""
    phase = _phases(np.arange(seq_len + 1), np.arange(seq_len), 2 * seq_len)
    # Bins 1..L-1 stand for themselves and their conjugate mirror: weight 2. DC and Nyquist count
    # once, and their imaginary parts not at all.
    weight = np.full((seq_len + 1, 1), 2.0)
    weight[[0, seq_len]] = 1.0
    minus_sin = -weight * np.sin(phase)
    minus_sin[[0, seq_len]] = 0.0
    return np.concatenate([weight * np.cos(phase), minus_sin], axis=0) / (2 * seq_len)


def _f32(a: np.ndarray) -> Array:
    return jnp.asarray(a.astype(np.float32))


def filter_planes(filt: ConvFilter | FilterSpectrum, seq_len: int) -> tuple[Array, Array]:
    """The filter's spectrum (doubled kernel, skip folded in) as float32 (re, im), each (H, L + 1).

    A `FilterSpectrum` (complex (H, L + 1), `xla_fft.filter_spectrum`) is split as it is.
    """
    if isinstance(filt, FilterSpectrum):
        khat = filt.khat_HxF
        return jnp.real(khat).astype(jnp.float32), jnp.imag(khat).astype(jnp.float32)
    return _to_planes(base.doubled_kernel(filt), seq_len)


def _matmul(a: Array, b_np: np.ndarray) -> Array:
    """``a @ b`` with b a float64 NumPy constant rounded once to float32."""
    return jnp.matmul(a, _f32(b_np), precision=DFT_PRECISION)


def _to_planes(x: Array, seq_len: int) -> tuple[Array, Array]:
    """The size-2L DFT of x (..., S), S <= 2L samples (zero beyond), as planes (re, im), each
    float32 (..., L + 1)."""
    a = np_forward_planes(x.shape[-1], seq_len)
    return _matmul(x, a[:, : seq_len + 1]), _matmul(x, a[:, seq_len + 1 :])


def _from_planes(p_re: Array, p_im: Array, seq_len: int) -> Array:
    """The first L samples of the inverse real DFT of (re, im) planes (..., L + 1): (..., L)."""
    b = np_inverse_planes(seq_len)
    return _matmul(p_re, b[: seq_len + 1]) + _matmul(p_im, b[seq_len + 1 :])


def _times_spectrum(x_re: Array, x_im: Array, k_re: Array, k_im: Array, *,
                    conjugate: bool = False) -> tuple[Array, Array]:
    """The complex product (or with conj(k)) of planes (re, im), (..., F), by a spectrum (R, F)."""
    if conjugate:
        k_im = -k_im
    return x_re * k_re - x_im * k_im, x_re * k_im + x_im * k_re


@jax.custom_vjp
def _spectral_conv(x_BxHxL: Array, k_re: Array, k_im: Array) -> Array:
    """First L samples of the inverse DFT of ``DFT(x) * k``, float32 (B, H, L); k (H, L + 1)."""
    return _spectral_conv_fwd(x_BxHxL, k_re, k_im)[0]


def _spectral_conv_fwd(x_BxHxL, k_re, k_im):
    seq_len = x_BxHxL.shape[-1]
    x_re, x_im = _to_planes(x_BxHxL, seq_len)
    y = _from_planes(*_times_spectrum(x_re, x_im, k_re, k_im), seq_len)
    return y, (x_re, x_im, k_re, k_im)


def _spectral_conv_bwd(residuals, g_BxHxL):
    # Written out rather than left to autodiff, whose backward of the planes' slices and
    # concatenation ran 2x slower than XLA's FFT path (docs/perf.md). The transposed DFT
    # matrices are constants of their own, so each backward stage is a plain (rows, K) x (K, N)
    # matmul like the forward's.
    x_re, x_im, k_re, k_im = residuals
    seq_len, bins = g_BxHxL.shape[-1], k_re.shape[-1]
    b_t = np_inverse_planes(seq_len).T
    g_re, g_im = _matmul(g_BxHxL, b_t[:, :bins]), _matmul(g_BxHxL, b_t[:, bins:])
    a_t = np_forward_planes(seq_len, seq_len).T
    d_re, d_im = _times_spectrum(g_re, g_im, k_re, k_im, conjugate=True)
    dx = _matmul(d_re, a_t[:bins]) + _matmul(d_im, a_t[bins:])
    lead = tuple(range(x_re.ndim - 2))  # the axes k was broadcast over
    dk_re = jnp.sum(g_re * x_re + g_im * x_im, axis=lead)
    dk_im = jnp.sum(g_im * x_re - g_re * x_im, axis=lead)
    return dx, dk_re, dk_im


_spectral_conv.defvjp(_spectral_conv_fwd, _spectral_conv_bwd)


def _conv(x_BxHxL: Array, filt: ConvFilter | FilterSpectrum) -> Array:
    seq_len = x_BxHxL.shape[-1]
    if not supports(seq_len, x_BxHxL.dtype):
        raise ValueError(
            f"implementation 'xla_dense_dft' takes 1 <= L <= {MAX_SEQ_LEN} (its DFT matrices grow "
            f"as L^2, and beyond that XLA's FFT is faster); got L = {seq_len}. Use 'xla_fft' or "
            f"'auto'.")
    k_re, k_im = filter_planes(filt, seq_len)
    return _spectral_conv(x_BxHxL, k_re, k_im)


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array,
                    gate: ConvFilter | FilterSpectrum, u_BxHxL: Array | None = None,
                    residual: ConvFilter | FilterSpectrum | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` with dense DFT matmuls; shapes and dtypes as
    there. Filters may be `ConvFilter`s or their spectra (`FilterSpectrum`)."""
    return base.gated_block(_conv, x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual)
