"""The one entry point of the long-convolution block, with per-platform dispatch.

``long_conv_block(x1, x2, v, gate, u, residual, implementation=...)`` computes

    y = (LongConv_f(v * x1) + D_f * v * x1) * x2 + LongConv_g(u) + D_g * u

(spec 3.1 steps 4-7, channels-first) with one of

* ``"xla_fft"``: XLA real FFTs of length 2L (`xla_fft`);
* ``"xla_monarch"``: the DFT as matmuls, spec section 7 (`xla_monarch`);
* ``"xla_dense_dft"``: the real DFT as one dense matmul each way, for L <= 128
  (`xla_dense_dft`);
* ``"pallas_triton"``: the fused Triton-Pallas kernel with its custom VJP (`pallas_triton`),
  interpreted off a GPU;
* ``"pallas_mosaic_tpu"``: the fused Mosaic TPU kernel with its custom VJP
  (`pallas_mosaic_tpu`), interpreted off a TPU;
* ``"auto"`` (default): a choice per lowering platform through `jax.lax.platform_dependent`, so
  one jitted or exported function carries the right path for each backend: `AUTO_PREFERENCES`
  lists, per platform, the implementations tried in order; the first whose ``supports(L, dtype)``
  holds is taken (the XLA paths always hold).

Every implementation module has ``long_conv_block(x1, x2, v, gate, u=None, residual=None)`` and
``supports(seq_len, dtype)``; adding one is one line in `_MODULES` (and, for `auto`, in
`AUTO_PREFERENCES`).

Callers that run many inputs through one set of filters (inference) may pass each filter through
`prepare_filter` once: where an XLA path that takes spectra will run, that is the filter's
spectrum (`base.FilterSpectrum`), which the block then takes as it is. `SPECTRUM_PREFERENCES`
lists, per platform, the paths that run a spectrum: on CPU the dense DFT for short sequences
(1.4-2.6x faster forward than XLA's FFTs at L <= 128, docs/perf.md), else the FFT.
The dense DFT is not in ``auto``'s choice for `ConvFilter`s (training): its forward + backward
ran at 0.6-0.9x the FFT path's speed on the same CPU.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from kernels.long_conv_block import base
from kernels.long_conv_block.base import ConvFilter, FilterSpectrum

Array = jax.Array

# Implementation name -> module.
_MODULES = {
    "xla_fft": "kernels.long_conv_block.xla_fft",
    "xla_monarch": "kernels.long_conv_block.xla_monarch",
    "xla_dense_dft": "kernels.long_conv_block.xla_dense_dft",
    "pallas_triton": "kernels.long_conv_block.pallas_triton",
    "pallas_mosaic_tpu": "kernels.long_conv_block.pallas_mosaic_tpu",
}
# Names users may pass; a slot without a module gives a clear error.
IMPLEMENTATIONS = ("auto", "xla_fft", "xla_monarch", "xla_dense_dft", "pallas_triton",
                   "pallas_mosaic_tpu")

# `auto`, per lowering platform: candidates in order of preference (the last always supports L).
# CPU: the faster XLA path measured on the 2-core dev machine (benchmarks/long_conv_block.py,
# docs/perf.md) for filters computed in the call (training): the FFT, whose forward + backward
# beat the dense DFT's. TPU: its kernel, else the matmul DFT (XLA's TPU FFT is slow for large N).
AUTO_PREFERENCES = {
    "cpu": ("xla_fft",),
    "cuda": ("pallas_triton", "xla_fft"),
    "tpu": ("pallas_mosaic_tpu", "xla_monarch", "xla_fft"),
    "default": ("xla_fft",),
}

# The implementations that take a `FilterSpectrum`, and for spectra under `auto`, per lowering
# platform, those tried in order (the last always supports L). CPU: the dense DFT's matmuls use
# every core where XLA:CPU's FFT runs on one; beyond its MAX_SEQ_LEN the FFT is faster.
SPECTRUM_IMPLEMENTATIONS = ("xla_fft", "xla_dense_dft")
SPECTRUM_PREFERENCES = {
    "cpu": ("xla_dense_dft", "xla_fft"),
    "default": ("xla_fft",),
}


def _check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r} for the long-conv block; expected one of "
            f"{IMPLEMENTATIONS}.")
    if implementation != "auto" and implementation not in _MODULES:
        raise ValueError(
            f"implementation {implementation!r} is not available: its module "
            f"kernels/long_conv_block/{implementation}.py does not exist yet. Use 'auto' (it "
            f"picks an available path on every platform) or one of "
            f"{tuple(sorted(_MODULES))}.")


def implementation_module(name: str) -> ModuleType:
    """The module of a registered implementation (imported on first use: the Pallas modules
    load only when their path runs)."""
    _check_implementation(name)
    if name == "auto":
        raise ValueError("'auto' is a choice per platform, not a module; see auto_choice().")
    return importlib.import_module(_MODULES[name])


def auto_choice(platform: str, seq_len: int, dtype: jnp.dtype) -> str:
    """The implementation ``"auto"`` runs on `platform` ("cpu", "cuda", "tpu", other) for L and
    the inputs' dtype."""
    for name in AUTO_PREFERENCES.get(platform, AUTO_PREFERENCES["default"]):
        if name in _MODULES and implementation_module(name).supports(seq_len, dtype):
            return name
    raise AssertionError(f"no implementation supports L = {seq_len} on {platform}")


def spectrum_choice(platform: str, seq_len: int, dtype: jnp.dtype) -> str:
    """The implementation ``"auto"`` runs filter spectra with on `platform` for L and dtype."""
    for name in SPECTRUM_PREFERENCES.get(platform, SPECTRUM_PREFERENCES["default"]):
        if implementation_module(name).supports(seq_len, dtype):
            return name
    raise AssertionError(f"no spectrum implementation supports L = {seq_len} on {platform}")


def prepare_filter(filt: ConvFilter, *, platform: str, dtype: jnp.dtype,
                   implementation: str = "auto") -> ConvFilter | FilterSpectrum:
    """`filt` in the form `long_conv_block` runs fastest with when it is reused across calls.

    Args:
        filt: the filter, kernels (H, L).
        platform: where the block will run: a lowering platform ("cpu", "cuda", "rocm", "tpu").
        dtype: the dtype of the block's signals (v), which `auto`'s choice may depend on.
        implementation: as for `long_conv_block`.

    Returns:
        Where the XLA FFT path runs (named, or `auto`'s choice on `platform`) or the dense DFT is
        named, the filter's spectrum (`xla_fft.filter_spectrum`, complex64 (H, L + 1)): the
        block skips computing it, and under `auto` runs it on `spectrum_choice`'s path.
        Otherwise `filt` unchanged (the kernels build their own spectra). Either gives the same
        block; a spectrum passed where another platform runs it still computes the right values,
        on that platform's `SPECTRUM_PREFERENCES`.
    """
    _check_implementation(implementation)
    seq_len = filt.k_fwd_HxL.shape[-1]
    name = (auto_choice(platform, seq_len, jnp.dtype(dtype)) if implementation == "auto"
            else implementation)
    if name not in SPECTRUM_IMPLEMENTATIONS:
        return filt
    return implementation_module("xla_fft").filter_spectrum(filt)


def _auto(x1, x2, v, gate, u, residual):
    seq_len, dtype = v.shape[-1], v.dtype
    choose = spectrum_choice if isinstance(gate, FilterSpectrum) else auto_choice
    choice = {p: choose(p, seq_len, dtype) for p in AUTO_PREFERENCES}
    # Inside a branch, the compiled kernel (never the interpreter) runs on its own platform.
    branch = {p: functools.partial(_run, choice[p], interpret=False) for p in choice}
    if len(set(choice.values())) == 1:
        return branch["default"](x1, x2, v, gate, u, residual)
    return jax.lax.platform_dependent(
        x1, x2, v, gate, u, residual,
        cpu=branch["cpu"], cuda=branch["cuda"], tpu=branch["tpu"], default=branch["default"])


def _run(name: str, x1, x2, v, gate, u, residual, *, interpret: bool | None) -> Array:
    module = implementation_module(name)
    if name.startswith("pallas"):
        return module.long_conv_block(x1, x2, v, gate, u, residual, interpret=interpret)
    return module.long_conv_block(x1, x2, v, gate, u, residual)


@functools.partial(jax.jit, static_argnames=("implementation", "interpret"))
def _block(x1, x2, v, gate, u, residual, implementation, interpret):
    if implementation == "auto":
        return _auto(x1, x2, v, gate, u, residual)
    return _run(implementation, x1, x2, v, gate, u, residual, interpret=interpret)


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array,
                    gate: ConvFilter | FilterSpectrum, u_BxHxL: Array | None = None,
                    residual: ConvFilter | FilterSpectrum | None = None, *,
                    implementation: str = "auto", interpret: bool | None = None) -> Array:
    """The gated long-convolution block of the M2 sequence mixer, channels-first.

    Args:
        x1_BxHxL, x2_BxHxL, v_BxHxL: branches of the short convolution, (B, H, L), float32 or
            bf16 (all the same shape).
        gate: `ConvFilter(k_fwd_HxL, k_rev_HxL or None, d_H)` applied to ``v * x1``, or its
            `prepare_filter` spectrum (`FilterSpectrum`; then ``auto`` runs
            `spectrum_choice`'s path).
        u_BxHxL: the mixer's input for the residual long convolution, or None (no residual).
        residual: its filter, of gate's kind (given exactly when u is).
        implementation: one of `IMPLEMENTATIONS` (see the module docstring).
        interpret: Pallas implementations only: force the interpreter on/off (None: on unless a
            GPU runs it, or $M2JAX_PALLAS_INTERPRET). ``auto`` always compiles its kernels.

    Returns:
        y, (B, H, L), dtype of v; the convolutions run in float32 (spec section 8).
        Differentiable in every array argument.

    Raises:
        ValueError: an unknown or unavailable implementation, mismatched shapes, an L the
            explicitly named implementation does not handle, or spectra given to an
            implementation that does not take them (not in `SPECTRUM_IMPLEMENTATIONS`).
    """
    _check_implementation(implementation)
    base.check_args(x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual)
    if (isinstance(gate, FilterSpectrum)
            and implementation not in ("auto",) + SPECTRUM_IMPLEMENTATIONS):
        raise ValueError(
            f"filter spectra (FilterSpectrum, from prepare_filter) run on the XLA paths "
            f"{SPECTRUM_IMPLEMENTATIONS} only; got implementation={implementation!r}. Pass the "
            f"ConvFilters, or prepare them with implementation={implementation!r} (which keeps "
            f"them as they are).")
    return _block(x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual,
                  implementation=implementation, interpret=interpret)
