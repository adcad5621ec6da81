"""The bidirectional long convolution of the M2 sequence mixer (spec section 3.3).

One signature, several implementations that compute the same numbers:

* ``"fft"``: real FFTs of length 2L (XLA's FFT).
* ``"monarch"``: the length-2L DFT as an order-2 Monarch product (dense complex64 GEMMs,
  spec section 7), for accelerators whose FFT is slow.
* ``"direct"``: the O(L^2) sum as a dense Toeplitz-like matrix; the slow reference for tests.

The convolution is always computed in float32 (spec section 8: the published runs kept it in
float32 under bf16 autocast; ``jnp.fft`` also rejects bf16) and returned in x's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m2jax import monarch

Array = jax.Array

IMPLEMENTATIONS = ("fft", "monarch", "direct")

_COMPUTE_DTYPE = jnp.float32


def doubled_kernel(k_fwd_HxL: Array, k_rev_HxL: Array | None) -> Array:
    """The length-2L circular kernel ``k = [k_fwd, reverse(k_rev)]`` (zeros when k_rev is None).

    Args:
        k_fwd_HxL, k_rev_HxL: per-channel kernels, shape (H, L).

    Returns:
        Shape (H, 2L), same dtype as the kernels, ``k[:, L + i] = k_rev[:, L - 1 - i]``: in a
        circular convolution of size 2L, index 2L - j is lag -j, so k_rev[0] lands on lag -1 and
        lag 0 belongs to k_fwd alone.
    """
    if k_rev_HxL is None:
        k_rev_HxL = jnp.zeros_like(k_fwd_HxL)
    return jnp.concatenate([k_fwd_HxL, k_rev_HxL[:, ::-1]], axis=-1)


def _check_inputs(x_BxHxL: Array, k_fwd_HxL: Array, k_rev_HxL: Array | None,
                  implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown long-conv implementation {implementation!r}; expected one of "
            f"{IMPLEMENTATIONS}.")
    if x_BxHxL.ndim != 3:
        raise ValueError(f"x must have shape (B, H, L); got shape {tuple(x_BxHxL.shape)}.")
    if not jnp.issubdtype(x_BxHxL.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array; got dtype {x_BxHxL.dtype}.")
    _, h, l = x_BxHxL.shape
    if l < 1:
        raise ValueError(f"x must have a sequence length L >= 1; got shape {tuple(x_BxHxL.shape)}.")
    for name, k in (("k_fwd", k_fwd_HxL), ("k_rev", k_rev_HxL)):
        if k is not None and tuple(k.shape) != (h, l):
            raise ValueError(
                f"{name} must have shape (H, L) = {(h, l)} to match x of shape "
                f"{tuple(x_BxHxL.shape)}; got {tuple(k.shape)}.")
    if implementation == "monarch":
        try:
            monarch.factor_fft_size(2 * l)
        except ValueError as err:
            raise ValueError(
                f"implementation 'monarch' needs a composite FFT size 2L >= 4, i.e. L >= 2; "
                f"got L = {l}.") from err


# Jitted so that eager callers compile once per shape; inlined inside a caller's jit.
@functools.partial(jax.jit, static_argnames=("implementation",))
def bidirectional_long_conv(x_BxHxL: Array, k_fwd_HxL: Array, k_rev_HxL: Array | None, *,
                            implementation: str = "fft") -> Array:
    """Per-channel bidirectional convolution, spec 3.3.

    ``y[b, h, t] = sum_{s<=t} k_fwd[h, t-s] x[b, h, s] + sum_{s>t} k_rev[h, s-t-1] x[b, h, s]``,
    i.e. the first L outputs of the size-2L circular convolution of zero-padded x with
    ``doubled_kernel(k_fwd, k_rev)``. With ``k_rev=None`` only the causal half remains.
    The D*x skip term is not included: the caller adds it.

    Args:
        x_BxHxL: input, exactly 3 axes (B, H, L), any floating dtype.
        k_fwd_HxL: forward (causal) kernel, shape (H, L).
        k_rev_HxL: reverse (anti-causal) kernel, shape (H, L), or None.
        implementation: one of ``IMPLEMENTATIONS``. ``"monarch"`` needs L >= 2. Under
            ``jax.jit`` it must be static.

    Returns:
        y, shape (B, H, L), dtype of x; computed in float32.
    """
    _check_inputs(x_BxHxL, k_fwd_HxL, k_rev_HxL, implementation)
    x32 = x_BxHxL.astype(_COMPUTE_DTYPE)
    kf32 = k_fwd_HxL.astype(_COMPUTE_DTYPE)
    kr32 = None if k_rev_HxL is None else k_rev_HxL.astype(_COMPUTE_DTYPE)
    if implementation == "direct":
        y = _direct_conv(x32, kf32, kr32)
    elif implementation == "fft":
        y = _fft_conv(x32, doubled_kernel(kf32, kr32))
    else:
        y = _monarch_conv(x32, doubled_kernel(kf32, kr32))
    return y.astype(x_BxHxL.dtype)


def conv_matrix(k_fwd_HxL: Array, k_rev_HxL: Array | None) -> Array:
    """The (H, L, L) matrix of the convolution: ``y[b, h, :] = T[h] @ x[b, h, :]``.

    ``T[h, t, s] = k_fwd[h, t-s]`` for s <= t and ``k_rev[h, s-t-1]`` for s > t (0 when k_rev is
    None). Same dtype as the kernels.
    """
    l = k_fwd_HxL.shape[-1]
    lag_LxL = jnp.arange(l)[:, None] - jnp.arange(l)[None, :]
    fwd_HxLxL = jnp.where(lag_LxL >= 0, k_fwd_HxL[:, jnp.clip(lag_LxL, 0, l - 1)], 0)
    if k_rev_HxL is None:
        return fwd_HxLxL
    rev_HxLxL = jnp.where(lag_LxL < 0, k_rev_HxL[:, jnp.clip(-lag_LxL - 1, 0, l - 1)], 0)
    return fwd_HxLxL + rev_HxLxL


def _direct_conv(x_BxHxL: Array, k_fwd_HxL: Array, k_rev_HxL: Array | None) -> Array:
    t_HxLxL = conv_matrix(k_fwd_HxL, k_rev_HxL)
    return jnp.einsum("hts,bhs->bht", t_HxLxL, x_BxHxL, precision=jax.lax.Precision.HIGHEST)


def _fft_conv(x_BxHxL: Array, k_Hx2L: Array) -> Array:
    l = x_BxHxL.shape[-1]
    n = 2 * l
    # Default "backward" norm: irfft(rfft(x) * rfft(k)) is the plain circular convolution.
    y_BxHxN = jnp.fft.irfft(jnp.fft.rfft(x_BxHxL, n=n) * jnp.fft.rfft(k_Hx2L, n=n), n=n)
    return y_BxHxN[..., :l]


def _monarch_conv(x_BxHxL: Array, k_Hx2L: Array) -> Array:
    l = x_BxHxL.shape[-1]
    n1, n2 = monarch.factor_fft_size(2 * l)
    x_BxHxN = jnp.pad(x_BxHxL, ((0, 0), (0, 0), (0, l)))
    # Both spectra stay in the DFT's transposed output layout; the inverse reads that layout,
    # so the output permutation is never materialised (spec section 7).
    xhat_BxHxN1xN2 = monarch.monarch_dft_transposed(x_BxHxN, n1, n2)
    khat_HxN1xN2 = monarch.monarch_dft_transposed(k_Hx2L, n1, n2)
    y_BxHxN = monarch.monarch_idft_transposed(xhat_BxHxN1xN2 * khat_HxN1xN2)
    return y_BxHxN[..., :l].real
