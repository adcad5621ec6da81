"""Monarch primitives: block-diagonal products, order-2 Monarch products, the DFT as one.

Conventions (spec sections 3.4 and 7):

* A block-diagonal weight ``w_KxQxP`` has K blocks, each mapping P inputs to Q outputs. The
  input's last axis (length K*P) is read row-major as (K, P); the output (length K*Q) as (K, Q).
* ``transpose_permute(x, a, b)`` is the reshape-transpose permutation P_(a,b) of the Monarch
  paper: the last axis (length a*b) is read row-major as (a, b), transposed to (b, a) and
  flattened, i.e. ``out[j*a + i] = x[i*b + j]``. Its inverse is P_(b,a).
* An order-2 Monarch product (the convention of the reference's ``blockdiag_butterfly_multiply``)
  with ``w1_KxQxP`` and ``w2_LxSxR`` (L*R == K*Q) is
  ``M = P_(L,S) . BD(w2) . P_(R,L) . BD(w1)``. For square blocks (all sizes sqrt(n)) both
  permutations are the same involution P and this is the paper's ``M = P L P^T R``.
* The length-N DFT with N = N1*N2 is ``F_N = M(w1, w2) . P_(N1,N2)`` where w1 holds N2 copies
  of F_N1 with the twiddles folded into their rows and w2 holds N1 copies of F_N2: an order-2
  Monarch matrix times one input permutation.

DFT matrices and twiddles are built in float64 NumPy from exact integer phases (k*n mod N) and
only then cast to complex64: computing exp(-2*pi*i*k*n/N) with k*n ~ N^2 in float32 would lose
several digits for the sizes M2 needs (N up to 65536).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The DFT must stay float32-accurate (spec 7); GPUs would otherwise run f32 matmuls in TF32.
_DFT_PRECISION = jax.lax.Precision.HIGHEST

# Public array functions are jitted (shape-determining arguments static) so that eager calls
# compile once per shape instead of once per primitive; inside a caller's jit they inline.


def _check_blockdiag_weight(w_KxQxP: Array, name: str) -> None:
    if w_KxQxP.ndim != 3:
        raise ValueError(
            f"{name} must have shape (blocks, out_per_block, in_per_block); got shape "
            f"{tuple(w_KxQxP.shape)}.")


@functools.partial(jax.jit, static_argnames=("precision",))
def blockdiag_matmul(x_NxI: Array, w_KxQxP: Array,
                     precision: jax.lax.PrecisionLike = None) -> Array:
    """Block-diagonal linear map (no bias), spec 3.4.

    Args:
        x_NxI: input, shape (..., I) with I = K*P; any number of leading batch axes.
        w_KxQxP: weight, shape (K, Q, P): K blocks, Q outputs and P inputs per block.
        precision: passed to the einsum.

    Returns:
        y, shape (..., K*Q), with ``y[..., k*Q + q] = sum_p w[k, q, p] * x[..., k*P + p]``; dtype is
        the promotion of the input dtypes.
    """
    _check_blockdiag_weight(w_KxQxP, "w_KxQxP")
    k, q, p = w_KxQxP.shape
    if x_NxI.ndim < 1 or x_NxI.shape[-1] != k * p:
        raise ValueError(
            f"x's last axis must be blocks*in_per_block = {k}*{p} = {k * p} for a weight of shape "
            f"{tuple(w_KxQxP.shape)}; got x of shape {tuple(x_NxI.shape)}.")
    x_NxKxP = x_NxI.reshape(*x_NxI.shape[:-1], k, p)
    y_NxKxQ = jnp.einsum("...kp,kqp->...kq", x_NxKxP, w_KxQxP, precision=precision)
    return y_NxKxQ.reshape(*x_NxI.shape[:-1], k * q)


@jax.jit
def blockdiag_to_dense(w_KxQxP: Array) -> Array:
    """Dense (K*Q, K*P) matrix D of a block-diagonal weight, so that ``blockdiag_matmul(x, w)``
    equals ``x @ D.T``. Same dtype as w."""
    _check_blockdiag_weight(w_KxQxP, "w_KxQxP")
    k, q, p = w_KxQxP.shape
    eye_KxK = jnp.eye(k, dtype=w_KxQxP.dtype)
    # Exact: every output entry is one weight times 1 plus zeros.
    dense_KxQxKxP = jnp.einsum("kqp,kj->kqjp", w_KxQxP, eye_KxK,
                               precision=jax.lax.Precision.HIGHEST)
    return dense_KxQxKxP.reshape(k * q, k * p)


@functools.partial(jax.jit, static_argnames=("a", "b"))
def transpose_permute(x_NxM: Array, a: int, b: int) -> Array:
    """The reshape-transpose permutation P_(a,b) along the last axis.

    Args:
        x_NxM: shape (..., M) with M = a*b.
        a, b: the row-major view (a, b) of the last axis.

    Returns:
        Shape (..., M), ``out[..., j*a + i] = x[..., i*b + j]``; same dtype.
    """
    if x_NxM.ndim < 1 or x_NxM.shape[-1] != a * b:
        raise ValueError(
            f"transpose_permute needs a last axis of length a*b = {a}*{b} = {a * b}; got shape "
            f"{tuple(x_NxM.shape)}.")
    lead = x_NxM.shape[:-1]
    return jnp.swapaxes(x_NxM.reshape(*lead, a, b), -1, -2).reshape(*lead, a * b)


@functools.partial(jax.jit, static_argnames=("precision",))
def monarch_matmul(x_NxI: Array, w1_KxQxP: Array, w2_LxSxR: Array,
                   precision: jax.lax.PrecisionLike = None) -> Array:
    """Order-2 Monarch product ``y = P_(L,S) BD(w2) P_(R,L) BD(w1) x`` along the last axis.

    Args:
        x_NxI: shape (..., K*P).
        w1_KxQxP: first block-diagonal factor, shape (K, Q, P).
        w2_LxSxR: second block-diagonal factor, shape (L, S, R), with L*R == K*Q.
        precision: passed to both einsums.

    Returns:
        Shape (..., L*S). After BD(w1) the K*Q intermediate is read as (R, L) and transposed so that
        each of the L blocks of w2 gathers R entries spaced L apart (one from each group of L);
        the (L, S) output is then transposed to (S, L) and flattened.
    """
    _check_blockdiag_weight(w1_KxQxP, "w1_KxQxP")
    _check_blockdiag_weight(w2_LxSxR, "w2_LxSxR")
    k, q, _ = w1_KxQxP.shape
    l, s, r = w2_LxSxR.shape
    if l * r != k * q:
        raise ValueError(
            f"w2's blocks*in_per_block ({l}*{r} = {l * r}) must equal w1's blocks*out_per_block "
            f"({k}*{q} = {k * q}); got w1 {tuple(w1_KxQxP.shape)}, w2 {tuple(w2_LxSxR.shape)}.")
    y1_NxKQ = blockdiag_matmul(x_NxI, w1_KxQxP, precision=precision)
    y2_NxLS = blockdiag_matmul(transpose_permute(y1_NxKQ, r, l), w2_LxSxR, precision=precision)
    return transpose_permute(y2_NxLS, l, s)


@jax.jit
def monarch_to_dense(w1_KxQxP: Array, w2_LxSxR: Array) -> Array:
    """Dense (L*S, K*P) matrix M of the Monarch product, ``monarch_matmul(x, w1, w2) == x @ M.T``.

    Materialised by applying the product to the identity (HIGHEST precision); dtype is the
    promotion of the weights' dtypes.
    """
    _check_blockdiag_weight(w1_KxQxP, "w1_KxQxP")
    n_in = w1_KxQxP.shape[0] * w1_KxQxP.shape[2]
    dtype = jnp.result_type(w1_KxQxP.dtype, w2_LxSxR.dtype)
    # Row i of the result is M applied to the i-th unit vector, i.e. column i of M.
    cols = monarch_matmul(jnp.eye(n_in, dtype=dtype), w1_KxQxP, w2_LxSxR,
                          precision=jax.lax.Precision.HIGHEST)
    return cols.T


def factor_fft_size(n: int) -> tuple[int, int]:
    """Split an FFT size into (n1, n2) with n1*n2 == n, 2 <= n1 <= n2 and n1 as close to sqrt(n)
    as the divisors allow (balanced factors keep both block-diagonal GEMMs small)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise ValueError(f"FFT size must be an int; got {n!r} of type {type(n).__name__}.")
    n = int(n)
    if n < 4:
        raise ValueError(
            f"FFT size must be >= 4 to factor as n1*n2 with n1, n2 >= 2; got {n}.")
    for n1 in range(math.isqrt(n), 1, -1):
        if n % n1 == 0:
            return n1, n // n1
    raise ValueError(
        f"FFT size {n} is prime: it has no order-2 Monarch factorisation n1*n2 with n1, n2 >= 2.")


def _check_factor(n: int, name: str) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name} must be a positive int; got {n!r}.")
    return int(n)


def _unit_phase(numerator: np.ndarray, n: int) -> np.ndarray:
    """exp(-2*pi*i*numerator/n) in float64, with the phase reduced mod n in exact integers."""
    return np.exp(-2j * np.pi * (np.mod(numerator, n) / n))


def _np_dft(n: int) -> np.ndarray:
    idx = np.arange(n, dtype=np.int64)
    return _unit_phase(np.outer(idx, idx), n)


def _np_dft_factors(n1: int, n2: int,
                    inverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n1 = _check_factor(n1, "n1")
    n2 = _check_factor(n2, "n2")
    n = n1 * n2
    f1, f2 = _np_dft(n1), _np_dft(n2)
    tw = _unit_phase(np.outer(np.arange(n1, dtype=np.int64), np.arange(n2, dtype=np.int64)), n)
    if inverse:
        f1, f2, tw = np.conj(f1), np.conj(f2), np.conj(tw) / n
    return f1, f2, tw


def _to_complex64(*arrays: np.ndarray) -> tuple[Array, ...]:
    # Constants are finished in float64 NumPy and rounded once; no per-shape XLA compiles.
    return tuple(jnp.asarray(a.astype(np.complex64)) for a in arrays)


def dft_matrix(n: int, inverse: bool = False) -> Array:
    """The n-point DFT matrix, ``F[k, m] = exp(-2*pi*i*k*m/n)``, complex64 of shape (n, n).

    With ``inverse=True`` returns the inverse DFT matrix ``conj(F) / n``.
    """
    n = _check_factor(n, "n")
    f = _np_dft(n)
    if inverse:
        f = np.conj(f) / n
    return _to_complex64(f)[0]


def dft_factors(n1: int, n2: int, inverse: bool = False) -> tuple[Array, Array, Array]:
    """Factors of the N = n1*n2 point DFT in the reshape form of spec section 7.

    Returns:
        ``(f_N1xN1, f_N2xN2, twiddle_N1xN2)``, complex64, with
        ``twiddle[k1, m2] = exp(-2*pi*i*k1*m2/N)``, such that for x viewed row-major as
        X (n1, n2): ``xhat[k1 + n1*k2] = ((f_N1 @ X) * twiddle @ f_N2)[k1, k2]`` (the DFT
        matrices are symmetric, so no transposes are needed). With ``inverse=True`` every factor is
        conjugated and the 1/N of the inverse DFT is folded into the twiddles.
    """
    return _to_complex64(*_np_dft_factors(n1, n2, inverse))


def dft_monarch_weights(n1: int, n2: int, inverse: bool = False) -> tuple[Array, Array]:
    """Block-diagonal factors of the N = n1*n2 point DFT as an order-2 Monarch product.

    Returns:
        ``(w1_KxQxP, w2_LxSxR)``, complex64, with K = n2, Q = P = n1 (n2 copies of F_n1, block m2's
        row k1 scaled by ``twiddle[k1, m2]``) and L = n1, S = R = n2 (n1 copies of F_n2), such that
        ``DFT(x) == monarch_matmul(transpose_permute(x, n1, n2), w1, w2)``.
        ``inverse=True`` gives the same for the inverse DFT (conjugated factors, 1/N in w1).
    """
    f1, f2, tw = _np_dft_factors(n1, n2, inverse)
    w1 = f1[None, :, :] * tw.T[:, :, None]
    w2 = np.broadcast_to(f2[None, :, :], (n1, n2, n2))
    return _to_complex64(w1, w2)


def _check_dft_input(x: Array, n1: int, n2: int) -> tuple[int, int]:
    n1 = _check_factor(n1, "n1")
    n2 = _check_factor(n2, "n2")
    if x.ndim < 1 or x.shape[-1] != n1 * n2:
        raise ValueError(
            f"the DFT axis (last) must have length n1*n2 = {n1}*{n2} = {n1 * n2}; got shape "
            f"{tuple(x.shape)}.")
    return n1, n2


def _as_complex64(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.complex64)


@functools.partial(jax.jit, static_argnames=("n1", "n2", "inverse", "precision"))
def monarch_dft(x_NxM: Array, n1: int, n2: int, *, inverse: bool = False,
                precision: jax.lax.PrecisionLike = _DFT_PRECISION) -> Array:
    """DFT of length M = n1*n2 along the last axis as two small dense GEMMs (spec section 7).

    Args:
        x_NxM: shape (..., M), real or complex; computed in complex64.
        n1, n2: the factorisation of M.
        inverse: compute the inverse DFT (``jnp.fft.ifft`` scaling, 1/M) instead.
        precision: passed to the einsums; HIGHEST by default so that TF32 never degrades the DFT.

    Returns:
        complex64 of shape (..., M), in natural frequency (or time) order, like ``jnp.fft.fft``.
    """
    n1, n2 = _check_dft_input(x_NxM, n1, n2)
    b_NxN1xN2 = _dft_to_transposed(x_NxM, n1, n2, inverse, precision)
    # B[k1, k2] holds output index k1 + n1*k2: read it transposed.
    lead = x_NxM.shape[:-1]
    return jnp.swapaxes(b_NxN1xN2, -1, -2).reshape(*lead, n1 * n2)


def _dft_to_transposed(x_NxM: Array, n1: int, n2: int, inverse: bool,
                       precision: jax.lax.PrecisionLike) -> Array:
    f1, f2, tw = dft_factors(n1, n2, inverse=inverse)
    x_NxN1xN2 = _as_complex64(x_NxM).reshape(*x_NxM.shape[:-1], n1, n2)
    a_NxN1xN2 = jnp.einsum("km,...mj->...kj", f1, x_NxN1xN2, precision=precision) * tw
    return jnp.einsum("...kj,jl->...kl", a_NxN1xN2, f2, precision=precision)


@functools.partial(jax.jit, static_argnames=("n1", "n2", "precision"))
def monarch_dft_transposed(x_NxM: Array, n1: int, n2: int, *,
                           precision: jax.lax.PrecisionLike = _DFT_PRECISION) -> Array:
    """Forward DFT without its final permutation (for convolutions, spec section 7).

    Args:
        x_NxM: shape (..., M), M = n1*n2, real or complex.

    Returns:
        complex64 ``b`` of shape (..., n1, n2) with ``b[..., k1, k2] = DFT(x)[..., k1 + n1*k2]``.
        Pointwise products of two such arrays are in the same layout, and
        ``monarch_idft_transposed`` maps them back to natural time order, so the permutations
        cancel.
    """
    n1, n2 = _check_dft_input(x_NxM, n1, n2)
    return _dft_to_transposed(x_NxM, n1, n2, False, precision)


@functools.partial(jax.jit, static_argnames=("precision",))
def monarch_idft_transposed(b_NxN1xN2: Array, *,
                            precision: jax.lax.PrecisionLike = _DFT_PRECISION) -> Array:
    """Inverse DFT of a spectrum in the layout of ``monarch_dft_transposed``.

    Args:
        b_NxN1xN2: shape (..., n1, n2), ``b[..., k1, k2]`` = spectrum at frequency k1 + n1*k2.

    Returns:
        complex64 of shape (..., n1*n2) in natural time order, ``jnp.fft.ifft`` scaling (1/N).
        The forward steps run backwards with conjugated factors: DFT along k2, conjugate twiddles
        (holding the 1/N), DFT along k1, read row-major.
    """
    if b_NxN1xN2.ndim < 2:
        raise ValueError(
            f"spectrum must have shape (..., n1, n2); got shape {tuple(b_NxN1xN2.shape)}.")
    n1, n2 = b_NxN1xN2.shape[-2:]
    f1, f2, tw = dft_factors(n1, n2, inverse=True)
    c = jnp.einsum("...kl,lj->...kj", _as_complex64(b_NxN1xN2), f2, precision=precision) * tw
    x_NxN1xN2 = jnp.einsum("mk,...kj->...mj", f1, c, precision=precision)
    return x_NxN1xN2.reshape(*b_NxN1xN2.shape[:-2], n1 * n2)
