"""Constants and data layout of the DFT-matmul long convolution (spec sections 3.3 and 7).

The kernels compute a size-N = 2L circular convolution with the order-2 factorisation
N = N1 * N2 of spec section 7, split into real and imaginary float32 planes because Pallas GPU
kernels have neither FFTs nor complex numbers (JAX_NOTES, Pallas). Index n = N2 * n1 + n2 views a
signal as an (N1, N2) matrix. The input is zero beyond L = N / 2, i.e. beyond row N1 / 2, so the
kernels read and write only the first R rows (R = N1 / 2, padded up to `MIN_DOT_DIM` for the
shortest sequences) and the first DFT stage multiplies by the first R columns of F_N1 alone.

Everything here is plain XLA: the DFT factors are NumPy float64 constants rounded once to float32,
and the kernel spectrum is prepared with `jnp.fft` (differentiable, once per call, shared by the
batch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Triton's tensor-core dot needs every dimension >= 16; block shapes must be powers of two.
MIN_DOT_DIM = 16
# The largest sequence length whose (N1, N2) tiles (128 x 128 float32 planes) fit one program.
MAX_KERNEL_SEQ_LEN = 8192
MIN_KERNEL_SEQ_LEN = 128


@dataclasses.dataclass(frozen=True)
class DftPlan:
    """Factorisation of the size-2L DFT used by the kernels.

    Attributes:
        seq_len: L.
        n1, n2: N = 2L = n1 * n2, both powers of two >= 16, n1 >= n2.
        rows: R, the rows of the (R, n2) time-domain tiles the kernels read and write
            (``max(n1 // 2, MIN_DOT_DIM)``; rows beyond L / n2 are zero padding).
    """

    seq_len: int
    n1: int
    n2: int
    rows: int

    @property
    def n(self) -> int:
        return self.n1 * self.n2

    @property
    def padded_len(self) -> int:
        """R * n2: the length of the time-domain rows the kernels see (>= L)."""
        return self.rows * self.n2


def kernel_supports(seq_len: int) -> bool:
    """True when the kernels handle L: a power of two in [MIN_KERNEL_SEQ_LEN, MAX_KERNEL_SEQ_LEN]."""
    return (MIN_KERNEL_SEQ_LEN <= seq_len <= MAX_KERNEL_SEQ_LEN
            and seq_len & (seq_len - 1) == 0)


@functools.lru_cache(maxsize=None)
def make_plan(seq_len: int) -> DftPlan:
    """The `DftPlan` for sequence length L (see `kernel_supports`)."""
    if not kernel_supports(seq_len):
        raise ValueError(
            f"the Pallas long-conv kernel needs L a power of two in [{MIN_KERNEL_SEQ_LEN}, "
            f"{MAX_KERNEL_SEQ_LEN}]; got L = {seq_len}.")
    log_n = (2 * seq_len).bit_length() - 1
    # n1 takes the larger half of the exponent so that R = n1 / 2 rows reach 16 as early as possible.
    n1 = 1 << ((log_n + 1) // 2)
    n2 = 1 << (log_n // 2)
    return DftPlan(seq_len=seq_len, n1=n1, n2=n2, rows=max(n1 // 2, MIN_DOT_DIM))


def _phase(numerator: np.ndarray, n: int) -> np.ndarray:
    # Reduce the integer phase mod n before scaling: exact for any size.
    return np.exp(-2j * np.pi * (np.mod(numerator, n) / n))


@functools.lru_cache(maxsize=None)
def _np_constants(seq_len: int) -> tuple[np.ndarray, ...]:
    p = make_plan(seq_len)
    i1, i2 = np.arange(p.n1), np.arange(p.n2)
    f1 = _phase(np.outer(i1, i1), p.n1)
    f2 = _phase(np.outer(i2, i2), p.n2)
    tw = _phase(np.outer(i1, i2), p.n)
    f1_cols = f1[:, :p.rows]                 # forward stage 1: only the non-zero input rows
    g1_rows = np.conj(f1)[:p.rows, :]        # inverse last stage: only the rows that are kept
    planes = (f1_cols.real, f1_cols.imag, tw.real, tw.imag, f2.real, f2.imag,
              g1_rows.real, g1_rows.imag)
    return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in planes)


@dataclasses.dataclass(frozen=True)
class DftConstants:
    """Float32 planes of the DFT factors, as the kernels take them.

    Shapes: f1r/f1i (N1, R) = F_N1[:, :R]; twr/twi (N1, N2) twiddles exp(-2 pi i k1 n2 / N);
    f2r/f2i (N2, N2) = F_N2; g1r/g1i (R, N1) = conj(F_N1)[:R, :]. The inverse uses conj(F_N2) and
    conj(twiddles) by sign flips inside the kernel.
    """

    f1r: Array
    f1i: Array
    twr: Array
    twi: Array
    f2r: Array
    f2i: Array
    g1r: Array
    g1i: Array

    def as_tuple(self) -> tuple[Array, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def dft_constants(seq_len: int) -> DftConstants:
    """Device arrays of `_np_constants` (rebuilt per trace; the NumPy side is cached)."""
    return DftConstants(*(jnp.asarray(a) for a in _np_constants(seq_len)))


def kernel_spectrum(k_Hx2L: Array, plan: DftPlan) -> tuple[Array, Array]:
    """Spectrum of a doubled kernel in the kernels' (N1, N2) layout, 1/N folded in.

    The spectrum is read transposed, ``K[k1, k2] = fft(k)[k1 + N1 * k2]``, the layout in which the
    forward DFT stages leave the input's spectrum (spec section 7), and scaled by 1/N so that the
    kernel's inverse stages need no extra multiply.

    Args:
        k_Hx2L: `base.doubled_kernel(filter)`: ``[k_fwd, reverse(k_rev)]`` with D folded into the
            lag-0 tap (``conv(x, k) + D * x`` is a convolution with ``k[0] + D``), float32.
        plan: `make_plan(L)`.

    Returns:
        (real, imag) float32 planes of shape (H, N1, N2). Differentiable (jnp.fft).
    """
    khat_HxN = jnp.fft.fft(k_Hx2L.astype(jnp.float32), axis=-1) / plan.n
    h = k_Hx2L.shape[0]
    khat_HxN1xN2 = jnp.swapaxes(khat_HxN.reshape(h, plan.n2, plan.n1), 1, 2)
    return jnp.real(khat_HxN1xN2), jnp.imag(khat_HxN1xN2)


def signal_spectrum(x_BxHxL: Array, plan: DftPlan) -> Array:
    """Unscaled DFT of the zero-padded signal (size N) in the (N1, N2) layout; complex64.

    Used by the backward pass for the kernel-spectrum gradient (XLA FFT).
    """
    b, h, _ = x_BxHxL.shape
    xhat = jnp.fft.fft(x_BxHxL.astype(jnp.float32), n=plan.n, axis=-1)
    return jnp.swapaxes(xhat.reshape(b, h, plan.n2, plan.n1), 2, 3)


def to_tiles(x_BxHxL: Array, plan: DftPlan) -> Array:
    """(B, H, L) -> (B, H, R, N2): row-major view of the signal, zero rows appended if R*N2 > L."""
    b, h, l = x_BxHxL.shape
    if plan.padded_len > l:
        x_BxHxL = jnp.pad(x_BxHxL, ((0, 0), (0, 0), (0, plan.padded_len - l)))
    return x_BxHxL.reshape(b, h, plan.rows, plan.n2)


def from_tiles(y_BxHxRxN2: Array, plan: DftPlan) -> Array:
    """Inverse of `to_tiles`: (B, H, R, N2) -> (B, H, L)."""
    b, h = y_BxHxRxN2.shape[:2]
    return y_BxHxRxN2.reshape(b, h, plan.padded_len)[..., :plan.seq_len]
