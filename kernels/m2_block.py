"""Public entry point of the M2 long-convolution block: one call, several implementations.

``m2_long_conv_block(x1, x2, v, gate_filter, u, residual_filter, implementation=...)`` computes

    y = (LongConv_f(v * x1) + D_f * (v * x1)) * x2 + LongConv_g(u) + D_g * u

(spec 3.1 steps 4-7, channels-first) with

* ``"xla"``: `kernels.reference.m2_block_reference` (XLA FFTs, float32);
* ``"pallas"``: the fused Triton-Pallas kernel (`kernels.m2_block_pallas`), forward and backward;
  run through the Pallas interpreter when no GPU is present (or M2JAX_PALLAS_INTERPRET=1);
  sequence lengths the kernel does not handle (not a power of two in [128, 8192]) fall back to
  ``"xla"``;
* ``"auto"``: ``"pallas"`` on a GPU backend when the kernel handles L, ``"xla"`` elsewhere
  (CPU, TPU), so model code never branches on the platform.

The kernels are lowered by jaxlib itself (Pallas' Triton backend); the separate ``jax_triton``
package is not needed and never imported.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels import dft_plan
from kernels.reference import ConvFilter, m2_block_reference

Array = jax.Array

IMPLEMENTATIONS = ("auto", "pallas", "xla")
INTERPRET_ENV_VAR = "M2JAX_PALLAS_INTERPRET"


def _check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r} for the M2 long-conv block; expected one "
            f"of {IMPLEMENTATIONS}.")


def resolve_implementation(implementation: str, seq_len: int, backend: str | None = None) -> str:
    """The implementation that actually runs: ``"pallas"`` or ``"xla"``.

    Args:
        implementation: one of `IMPLEMENTATIONS`.
        seq_len: L.
        backend: platform name (``jax.default_backend()`` when None).
    """
    _check_implementation(implementation)
    if implementation == "xla" or not dft_plan.kernel_supports(seq_len):
        return "xla"
    if implementation == "pallas":
        return "pallas"
    backend = jax.default_backend() if backend is None else backend
    return "pallas" if backend in ("gpu", "cuda") else "xla"


def use_interpreter(backend: str | None = None) -> bool:
    """Whether Pallas calls run in the interpreter: $M2JAX_PALLAS_INTERPRET ("0"/"1") if set,
    otherwise whenever the backend is not a GPU."""
    flag = os.environ.get(INTERPRET_ENV_VAR, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"${INTERPRET_ENV_VAR} must be '0' or '1'; got {flag!r}.")
    backend = jax.default_backend() if backend is None else backend
    return backend not in ("gpu", "cuda")


def _check_shapes(x1: Array, x2: Array, v: Array, gate_filter: ConvFilter, u: Array | None,
                  residual_filter: ConvFilter | None) -> None:
    if v.ndim != 3:
        raise ValueError(f"v must have shape (B, H, L); got {tuple(v.shape)}.")
    for name, t in (("x1", x1), ("x2", x2), ("u", u)):
        if t is not None and t.shape != v.shape:
            raise ValueError(f"{name} must have v's shape {tuple(v.shape)}; got {tuple(t.shape)}.")
    if (u is None) != (residual_filter is None):
        raise ValueError("u and residual_filter must be given together (or both None).")
    _, h, l = v.shape
    for fname, filt in (("gate_filter", gate_filter), ("residual_filter", residual_filter)):
        if filt is None:
            continue
        for kname, k in (("k_fwd_HxL", filt.k_fwd_HxL), ("k_rev_HxL", filt.k_rev_HxL)):
            if k is not None and tuple(k.shape) != (h, l):
                raise ValueError(
                    f"{fname}.{kname} must have shape (H, L) = {(h, l)}; got {tuple(k.shape)}.")
        if tuple(filt.d_H.shape) != (h,):
            raise ValueError(f"{fname}.d_H must have shape ({h},); got {tuple(filt.d_H.shape)}.")


def _pallas_block(x1: Array, x2: Array, v: Array, gate_filter: ConvFilter, u: Array | None,
                  residual_filter: ConvFilter | None, interpret: bool) -> Array:
    # Imported here so that the XLA path never needs the Pallas GPU modules.
    from kernels import m2_block_pallas

    plan = dft_plan.make_plan(v.shape[-1])
    spectra = dft_plan.kernel_spectrum(*gate_filter, plan)
    signals = [x1, x2, v]
    if u is not None:
        spectra += dft_plan.kernel_spectrum(*residual_filter, plan)
        signals.append(u)
    cfg = m2_block_pallas.KernelConfig(
        plan=plan, has_residual=u is not None, interpret=interpret,
        precision=m2_block_pallas.dot_precision(v.dtype, interpret))
    tiles = tuple(dft_plan.to_tiles(s, plan) for s in signals)
    y = m2_block_pallas.block_on_tiles(cfg, tiles, spectra)
    return dft_plan.from_tiles(y, plan)


@functools.partial(jax.jit, static_argnames=("implementation", "interpret"))
def _block(x1, x2, v, gate_filter, u, residual_filter, implementation, interpret):
    if implementation == "pallas":
        return _pallas_block(x1, x2, v, gate_filter, u, residual_filter, interpret)
    return m2_block_reference(x1, x2, v, gate_filter, u, residual_filter)


def m2_long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array,
                       gate_filter: ConvFilter, u_BxHxL: Array | None = None,
                       residual_filter: ConvFilter | None = None, *,
                       implementation: str = "auto", interpret: bool | None = None) -> Array:
    """The gated long-convolution block of the M2 sequence mixer, channels-first.

    Args:
        x1_BxHxL, x2_BxHxL, v_BxHxL: branches of the short convolution, (B, H, L), float32 or
            bf16 (all the same shape).
        gate_filter: `ConvFilter(k_fwd_HxL, k_rev_HxL or None, d_H)` applied to ``v * x1``.
        u_BxHxL: the mixer input for the residual long convolution, or None (no residual).
        residual_filter: its `ConvFilter` (given exactly when u is).
        implementation: ``"auto"``, ``"pallas"`` or ``"xla"`` (see the module docstring).
        interpret: force the Pallas interpreter on/off; None follows `use_interpreter()`.

    Returns:
        y, (B, H, L), dtype of v. The convolutions run in float32 (spec section 8).
        Differentiable in every array argument (the kernel path through a custom VJP).
    """
    _check_implementation(implementation)
    _check_shapes(x1_BxHxL, x2_BxHxL, v_BxHxL, gate_filter, u_BxHxL, residual_filter)
    impl = resolve_implementation(implementation, v_BxHxL.shape[-1])
    interp = use_interpreter() if interpret is None else bool(interpret)
    return _block(x1_BxHxL, x2_BxHxL, v_BxHxL, gate_filter, u_BxHxL, residual_filter,
                  implementation=impl, interpret=interp)
