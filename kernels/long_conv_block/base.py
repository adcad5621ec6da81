"""What every implementation of the long-convolution block shares: arguments, checks, gating.

The block is steps 4-7 of the M2 sequence mixer (spec section 3.1), channels-first:

    w = v * x1
    y = (LongConv_f(w) + D_f * w) * x2 + LongConv_g(u) + D_g * u

with the bidirectional long convolution of spec 3.3: the first L outputs of the size-2L circular
convolution of the zero-padded signal with ``[k_fwd, reverse(k_rev)]``. Everything is computed in
float32 (spec section 8) and returned in v's dtype.

An implementation module (``xla_fft``, ``xla_monarch``, ``pallas_triton``, ...) exposes

* ``long_conv_block(x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL=None, residual=None)``, the
  signature of `kernels.long_conv_block.long_conv_block` without ``implementation``;
* ``supports(seq_len, dtype) -> bool``, which ``implementation="auto"`` consults.

A filter is a `ConvFilter` (what every implementation takes) or, for the XLA paths that take spectra
(`api.SPECTRUM_IMPLEMENTATIONS`: the FFT and the dense DFT), a
`FilterSpectrum`: the FFT of its doubled kernel, computed once by a caller that reuses one filter
across calls (`kernels.long_conv_block.prepare_filter`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

COMPUTE_DTYPE = jnp.float32


class ConvFilter(NamedTuple):
    """One filter set of the block: kernels (H, L) and the skip weight D (H,).

    Attributes:
        k_fwd_HxL: causal kernel, float.
        k_rev_HxL: anti-causal kernel (``k_rev[0]`` acts at lag -1), or None for a causal-only
            convolution.
        d_H: per-channel skip weight D.
    """

    k_fwd_HxL: Array
    k_rev_HxL: Array | None
    d_H: Array


class FilterSpectrum(NamedTuple):
    """A `ConvFilter` prepared for the XLA paths that take spectra (`xla_fft.filter_spectrum`).

    Attributes:
        khat_HxF: ``rfft(doubled_kernel(filter), n=2L)``, complex64 (H, L + 1): the spectrum of
            the length-2L circular kernel with the skip weight folded in. A function of the
            filter and L only, so a caller that runs many inputs through one filter computes it
            once instead of on every call.
    """

    khat_HxF: Array


def check_args(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate: ConvFilter,
               u_BxHxL: Array | None, residual: ConvFilter | None) -> None:
    """Shape and dtype checks shared by every implementation; raises ValueError naming the
    argument."""
    if getattr(v_BxHxL, "ndim", None) != 3:
        raise ValueError(f"v must have shape (B, H, L); got {tuple(jnp.shape(v_BxHxL))}.")
    _, h, l = v_BxHxL.shape
    if l < 1:
        raise ValueError(f"v must have a sequence length L >= 1; got {tuple(v_BxHxL.shape)}.")
    for name, t in (("x1", x1_BxHxL), ("x2", x2_BxHxL), ("v", v_BxHxL), ("u", u_BxHxL)):
        if t is None:
            continue
        if t.shape != v_BxHxL.shape:
            raise ValueError(f"{name} must have v's shape {tuple(v_BxHxL.shape)}; got "
                             f"{tuple(t.shape)}.")
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array; got dtype {t.dtype}.")
    if (u_BxHxL is None) != (residual is None):
        raise ValueError("u and residual must be given together (or both None).")
    kinds = {type(f) for f in (gate, residual) if f is not None}
    if kinds == {ConvFilter, FilterSpectrum}:
        raise ValueError("gate and residual must both be ConvFilters or both FilterSpectrums; "
                         "got one of each.")
    for fname, filt in (("gate", gate), ("residual", residual)):
        if filt is None:
            continue
        if isinstance(filt, FilterSpectrum):
            k = filt.khat_HxF
            if tuple(jnp.shape(k)) != (h, l + 1) or not jnp.iscomplexobj(k):
                raise ValueError(
                    f"{fname}.khat_HxF must be a complex (H, L + 1) = {(h, l + 1)} spectrum; "
                    f"got shape {tuple(jnp.shape(k))}, dtype {jnp.result_type(k)}.")
            continue
        if not isinstance(filt, ConvFilter):
            raise ValueError(f"{fname} must be a ConvFilter(k_fwd_HxL, k_rev_HxL, d_H) or a "
                             f"FilterSpectrum; got {type(filt).__name__}.")
        for kname, k in (("k_fwd_HxL", filt.k_fwd_HxL), ("k_rev_HxL", filt.k_rev_HxL)):
            if k is not None and tuple(k.shape) != (h, l):
                raise ValueError(
                    f"{fname}.{kname} must have shape (H, L) = {(h, l)}; got {tuple(k.shape)}.")
        if tuple(filt.d_H.shape) != (h,):
            raise ValueError(f"{fname}.d_H must have shape ({h},); got {tuple(filt.d_H.shape)}.")


def doubled_kernel(filt: ConvFilter, *, with_skip: bool = True) -> Array:
    """The length-2L circular kernel ``[k_fwd, reverse(k_rev)]``, float32 (H, 2L).

    ``k[:, L + i] = k_rev[:, L - 1 - i]``: in a circular convolution of size 2L, index 2L - j is
    lag -j, so k_rev[0] lands on lag -1 and lag 0 belongs to k_fwd alone (spec 3.3). With
    ``with_skip`` the skip term is folded in: ``conv(x, k) + D * x`` is a convolution whose lag-0
    tap is ``k_fwd[0] + D``.
    """
    kf = filt.k_fwd_HxL.astype(COMPUTE_DTYPE)
    length = kf.shape[-1]
    # Zero-padded terms added together: XLA fuses the pads, the reversal and the adds into one
    # pass writing (H, 2L). A concatenation of slices ran as three passes (the reversal, the
    # slice and the copy each on their own), 7.6 vs 2.1 ms at H = 768, L = 2048 on CPU.
    k = jnp.pad(kf, ((0, 0), (0, length)))
    if filt.k_rev_HxL is not None:
        kr_rev = filt.k_rev_HxL.astype(COMPUTE_DTYPE)[:, ::-1]
        k = k + jnp.pad(kr_rev, ((0, 0), (length, 0)))
    if with_skip:
        d_Hx1 = filt.d_H.astype(COMPUTE_DTYPE)[:, None]
        k = k + jnp.pad(d_Hx1, ((0, 0), (0, 2 * length - 1)))
    return k


# conv(x_BxHxL, filter) -> y_BxHxL: see `gated_block`.
Conv = Callable[[Array, "ConvFilter | FilterSpectrum"], Array]


def gated_block(conv: Conv, x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array,
                gate: ConvFilter, u_BxHxL: Array | None, residual: ConvFilter | None) -> Array:
    """The gating around the convolutions, shared by the XLA implementations.

    Args:
        conv: ``conv(x_BxHxL, filter) -> y_BxHxL``, float32 in and out, the first L outputs of
            the size-2L circular convolution of the zero-padded signal with the filter's
            `doubled_kernel` (skip folded in).
        the rest: as `kernels.long_conv_block.long_conv_block`.

    Returns:
        y, (B, H, L), dtype of v.

    The two convolutions run as separate calls on (B, H, L) arrays, never stacked on a new
    leading axis: under data-parallel SPMD partitioning on CPU, a stacked FFT operand was
    all-gathered into a layout XLA:CPU's FFT rejects (RET_CHECK in fft_thunk.cc).
    """
    f32 = COMPUTE_DTYPE
    w = v_BxHxL.astype(f32) * x1_BxHxL.astype(f32)
    y = conv(w, gate) * x2_BxHxL.astype(f32)
    if u_BxHxL is not None:
        y = y + conv(u_BxHxL.astype(f32), residual)
    return y.astype(v_BxHxL.dtype)
