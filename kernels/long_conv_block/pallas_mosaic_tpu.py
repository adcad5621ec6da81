"""Pallas Mosaic TPU kernels for the M2 long-convolution block, with a custom VJP.

    w = v * x1
    y = (LongConv_f(w) + D_f * w) * x2 + LongConv_g(u) + D_g * u

(spec 3.1 steps 4-7, bidirectional convolutions of spec 3.3, channels-first (B, H, L)).

One program owns a tile of channels of one batch row and runs the whole block on it in VMEM: the
size-2L DFT as dense matmuls on the MXU (real and imaginary planes, float32 accumulation; the
two forms, dense real-DFT for L <= 384 and Monarch above, are in `tpu_plan` and `tpu_dft`), the
product with the kernel spectrum (D, 1/N and the Hermitian factor folded in), the inverse, and
the gating, so the block reads x1, x2, v, u once and writes y once. Grid (H / tile, B) with the
batch innermost, so a channel tile's spectra stay in VMEM across it; the DFT constants are one
whole VMEM copy for the kernel's lifetime.

Backward (`jax.custom_vjp`): one fused kernel recomputes the gate convolution, runs the two
adjoint convolutions (the same stages with the conjugate spectrum) with the gating derivatives,
and accumulates the spectrum cotangents ``sum_b conj(X) G`` over the batch in VMEM (the batch
grid axis is "arbitrary" for that). The filter spectra come from, and their cotangents go back
to, the (H, 2L) taps through two small kernels of the same stages (`filter_spectrum`), so no FFT
and no large XLA einsum runs on the TPU.

Off a TPU the kernels run in the Pallas interpreter (tests), or as $M2JAX_PALLAS_INTERPRET says.
Compiled, each `pallas_call` is lowered for TPU only (`lowering.lower_only_for`), so a module
exported for several platforms carries this path in its TPU branch.

Precision: float32 callers get float32 matmuls (``Precision.HIGHEST``, Mosaic's multi-pass fp32
contraction); bf16 callers get bf16 operands and constants with float32 accumulation (one MXU
pass). Signals are upcast to float32 on load; spectra, the spectral product and the gating are
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.long_conv_block import lowering, tpu_dft, tpu_plan
from kernels.long_conv_block.base import ConvFilter
from kernels.long_conv_block.tpu_plan import TpuPlan

Array = jax.Array
# The same switch as the Triton kernel's (`pallas_triton.INTERPRET_ENV_VAR`).
INTERPRET_ENV_VAR = "M2JAX_PALLAS_INTERPRET"
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# Mosaic's scoped-VMEM limit for these kernels; None keeps the compiler's default (16 MiB on
# v4 / v5e / v5p, 32 MiB on v6e), which every supported L fits (docs/perf.md). The AOT check
# (benchmarks/tpu_aot_check.py) sets a tiny limit to read each kernel's need from the error.
VMEM_LIMIT_BYTES: int | None = None


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one block call (hashable: the `custom_vjp` non-diff argument).

    Attributes:
        plan: the DFT form for this L.
        has_residual: whether the block includes the residual convolution of u.
        operand_dtype: dtype of the block kernels' matmul operands (float32 or bfloat16).
        tile_forward, tile_backward, tile_taps: channels per program of the forward, backward
            and filter-spectrum kernels.
        interpret: run through the Pallas interpreter (CPU tests) instead of Mosaic.
    """

    plan: TpuPlan
    has_residual: bool
    operand_dtype: jnp.dtype
    tile_forward: int
    tile_backward: int
    tile_taps: int
    interpret: bool

    @property
    def precision(self) -> jax.lax.Precision | None:
        return _HIGHEST if self.operand_dtype == _F32 else None


def _split(refs, counts):
    out, i = [], 0
    for c in counts:
        out.append(refs[i:i + c])
        i += c
    return out


def _load(ref) -> Array:
    return ref[...].astype(_F32)


# ---------------------------------------------------------------------------------------------
# Block kernels. Refs: signals, spectrum planes (of f, then of g), constants, outputs.


def _forward_kernel(*refs, cfg: KernelConfig) -> None:
    """y = conv_f(v * x1) * x2 (+ conv_g(u)); the D terms live in the spectra."""
    p, names = cfg.plan.num_spectrum_planes, tpu_plan.constant_names(cfg.plan, "block")
    n_sig, n_filt = (4, 2) if cfg.has_residual else (3, 1)
    sig, spec, consts, (y_ref,) = _split(refs, (n_sig, p * n_filt, len(names), 1))
    t = tpu_dft.make(cfg.plan.kind, names, consts, cfg.operand_dtype, cfg.precision)
    kf = tuple(r[...] for r in spec[:p])
    y = t.inverse(t.product(t.forward(_load(sig[2]) * _load(sig[0])), kf, False)) * _load(sig[1])
    if cfg.has_residual:
        kg = tuple(r[...] for r in spec[p:])
        y = y + t.inverse(t.product(t.forward(_load(sig[3])), kg, False))
    y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(*refs, cfg: KernelConfig) -> None:
    """dx1, dx2, dv (, du) of one tile, and the spectrum cotangents summed over the batch.

    The adjoint of the truncated circular convolution is the convolution with the conjugate
    spectrum (zero padding makes the truncation self-adjoint), so it reuses the stages.
    """
    p, names = cfg.plan.num_spectrum_planes, tpu_plan.constant_names(cfg.plan, "block")
    n_sig, n_filt = (5, 2) if cfg.has_residual else (4, 1)
    sig, spec, consts, grads, accs = _split(
        refs, (n_sig, p * n_filt, len(names), n_sig - 1, p * n_filt))
    t = tpu_dft.make(cfg.plan.kind, names, consts, cfg.operand_dtype, cfg.precision)

    @pl.when(pl.program_id(1) == 0)
    def _zero_accumulators():
        for acc in accs:
            acc[...] = jnp.zeros(acc.shape, acc.dtype)

    # Ordered so that at most two spectra of the tile are live at a time (VMEM at long L).
    dy, x1, x2, v = (_load(r) for r in sig[:4])
    kf = tuple(r[...] for r in spec[:p])
    w_hat = t.forward(v * x1)
    grads[1][...] = (dy * t.inverse(t.product(w_hat, kf, False))).astype(grads[1].dtype)
    gf_hat = t.forward(dy * x2)
    for acc, c in zip(accs[:p], t.cotangent(w_hat, gf_hat)):
        acc[...] += c
    dw = t.inverse(t.product(gf_hat, kf, True))
    grads[0][...] = (dw * v).astype(grads[0].dtype)
    grads[2][...] = (dw * x1).astype(grads[2].dtype)
    if cfg.has_residual:
        kg = tuple(r[...] for r in spec[p:])
        dy_hat = t.forward(dy)
        for acc, c in zip(accs[p:], t.cotangent(t.forward(_load(sig[4])), dy_hat)):
            acc[...] += c
        grads[3][...] = t.inverse(t.product(dy_hat, kg, True)).astype(grads[3].dtype)


def _channel_specs(plan: TpuPlan, tile: int, shape_fn, batched: bool,
                   single_buffer: bool = False) -> pl.BlockSpec:
    """A BlockSpec taking ``tile`` channels (axis 1 if ``batched`` else 0), everything else whole.

    ``single_buffer``: for blocks whose index changes only with the channel tile (spectra,
    accumulators): one VMEM buffer instead of two; the copy is exposed once per B steps.
    """
    rest = shape_fn(1)[1:]
    zeros = (0,) * len(rest)
    mode = pl.Buffered(1) if single_buffer else None
    if batched:
        return pl.BlockSpec((None, tile) + rest, lambda h, b: (b, h) + zeros, pipeline_mode=mode)
    return pl.BlockSpec((tile,) + rest, lambda h, *_: (h,) + zeros, pipeline_mode=mode)


_VMEM_WHOLE = pl.BlockSpec(memory_space=pltpu.VMEM)  # one copy for the kernel's lifetime


def _run(call, cfg: KernelConfig, operands: tuple[Array, ...]) -> tuple[Array, ...]:
    if cfg.interpret:
        return tuple(call(*operands))
    return tuple(lowering.lower_only_for("tpu", call, *operands))


def _block_call(body, cfg: KernelConfig, tile: int, signals: tuple[Array, ...],
                spectra: tuple[Array, ...], grad_dtypes: tuple[jnp.dtype, ...] | None) -> tuple:
    """One block pallas_call over the grid (H / tile, B).

    ``grad_dtypes`` None: the forward kernel (one output, v's dtype). Otherwise the backward:
    one signal-shaped output per dtype, then float32 spectrum cotangents accumulated over B.
    """
    plan = cfg.plan
    b, h = signals[0].shape[:2]
    sig_spec = _channel_specs(plan, tile, lambda c: plan.signal_shape(1, c)[1:], batched=True)
    spec_spec = _channel_specs(plan, tile, plan.spectrum_shape, batched=False,
                               single_buffer=True)
    consts = tpu_plan.constants(plan, "block", cfg.operand_dtype)
    sig_shape = signals[0].shape
    if grad_dtypes is None:
        out_shape = (jax.ShapeDtypeStruct(sig_shape, signals[2].dtype),)
        out_specs = (sig_spec,)
        semantics = ("parallel", "parallel")
    else:
        out_shape = tuple(jax.ShapeDtypeStruct(sig_shape, d) for d in grad_dtypes)
        out_shape += tuple(jax.ShapeDtypeStruct(s.shape, _F32) for s in spectra)
        out_specs = (sig_spec,) * len(grad_dtypes) + (spec_spec,) * len(spectra)
        # The cotangents accumulate over the batch axis: it runs in order on one core.
        semantics = ("parallel", "arbitrary")
    call = pl.pallas_call(
        functools.partial(body, cfg=cfg),
        out_shape=out_shape,
        grid=(h // tile, b),
        in_specs=[sig_spec] * len(signals) + [spec_spec] * len(spectra)
        + [_VMEM_WHOLE] * len(consts),
        out_specs=out_specs,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                             vmem_limit_bytes=VMEM_LIMIT_BYTES),
        interpret=cfg.interpret,
        name=f"m2_block_{body.__name__.strip('_')}_{plan.kind}",
    )
    return _run(call, cfg, (*signals, *spectra, *consts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_on_tiles(cfg: KernelConfig, signals: tuple[Array, ...],
                   spectra: tuple[Array, ...]) -> Array:
    """The fused block on kernel-layout signals (`tpu_plan.to_kernel_layout`).

    Args:
        cfg: static settings.
        signals: (x1, x2, v) or (x1, x2, v, u), each of `cfg.plan.signal_shape(B, H)`.
        spectra: the gate filter's planes, then the residual filter's (`filter_spectrum`).

    Returns:
        y in the signals' layout, dtype of v.
    """
    (y,) = _block_call(_forward_kernel, cfg, cfg.tile_forward, signals, spectra, None)
    return y


def _block_fwd(cfg, signals, spectra):
    return block_on_tiles(cfg, signals, spectra), (signals, spectra)


def _block_bwd(cfg, res, dy):
    signals, spectra = res
    outs = _block_call(_backward_kernel, cfg, cfg.tile_backward, (dy,) + tuple(signals), spectra,
                       tuple(s.dtype for s in signals))
    return tuple(outs[:len(signals)]), tuple(outs[len(signals):])


block_on_tiles.defvjp(_block_fwd, _block_bwd)


# ---------------------------------------------------------------------------------------------
# Filter spectra: taps (H, 2L) -> (re, im) / N planes and the adjoint, float32 matmuls.


def _taps_kernel(*refs, plan: TpuPlan, role: str) -> None:
    names = tpu_plan.constant_names(plan, role)
    n_in = 1 if role == "taps_to_spectrum" else 2
    ins, consts, outs = _split(refs, (n_in, len(names), 2 if n_in == 1 else 1))
    t = tpu_dft.make(plan.kind, names, consts, jnp.dtype(_F32), _HIGHEST)
    if role == "taps_to_spectrum":
        for ref, plane in zip(outs, t.forward(ins[0][...])):
            ref[...] = plane
    else:
        outs[0][...] = t.inverse((ins[0][...], ins[1][...]))


def _taps_call(cfg: KernelConfig, role: str, ins: tuple[Array, ...]) -> tuple[Array, ...]:
    plan, h = cfg.plan, ins[0].shape[0]
    taps = _channel_specs(plan, cfg.tile_taps, plan.taps_shape, batched=False)
    spec = _channel_specs(plan, cfg.tile_taps, plan.spectrum_shape, batched=False)
    in_spec, out_spec, out_shape = ((taps, spec, plan.spectrum_shape(h)) if role ==
                                    "taps_to_spectrum" else (spec, taps, plan.taps_shape(h)))
    n_out = 2 if role == "taps_to_spectrum" else 1
    consts = tpu_plan.constants(plan, role, jnp.dtype(_F32))
    call = pl.pallas_call(
        functools.partial(_taps_kernel, plan=plan, role=role),
        out_shape=tuple(jax.ShapeDtypeStruct(out_shape, _F32) for _ in range(n_out)),
        grid=(h // cfg.tile_taps,),
        in_specs=[in_spec] * len(ins) + [_VMEM_WHOLE] * len(consts),
        out_specs=(out_spec,) * n_out,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=VMEM_LIMIT_BYTES),
        interpret=cfg.interpret,
        name=f"m2_block_{role}_{plan.kind}",
    )
    return _run(call, cfg, (*ins, *consts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def filter_spectrum(cfg: KernelConfig, taps: Array) -> tuple[Array, Array]:
    """(re, im) / N of the DFT of the doubled taps (`tpu_plan.doubled_taps`), in the layout of
    the block kernels' spectra (before `tpu_plan.pack_spectrum`). Linear; float32."""
    return _taps_call(cfg, "taps_to_spectrum", (taps,))


def _spectrum_fwd(cfg, taps):
    return filter_spectrum(cfg, taps), None


def _spectrum_bwd(cfg, _, cotangents):
    return _taps_call(cfg, "spectrum_to_taps", tuple(cotangents))


filter_spectrum.defvjp(_spectrum_fwd, _spectrum_bwd)


# ---------------------------------------------------------------------------------------------
# Entry point.


def operand_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """bf16 matmul operands for bf16 callers, float32 for everything else."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(_F32)


def make_config(batch_shape: tuple[int, int, int], dtype: jnp.dtype, has_residual: bool,
                interpret: bool) -> tuple[KernelConfig, int]:
    """The `KernelConfig` for signals of shape (B, H, L) and dtype, and the padded H it needs."""
    _, h, l = batch_shape
    plan = tpu_plan.make_plan(l)
    op_dtype = operand_dtype(dtype)
    dense = plan.kind == "dense"
    # Dense blocks are (channels, L) with the signal dtype's sublane tiling; Monarch's channel
    # axis is a leading block dim. The taps kernels' blocks are float32.
    align = (16 if op_dtype == jnp.bfloat16 else 8) if dense else 1
    budgets = (tpu_plan.TILE_ELEMENTS_FORWARD, tpu_plan.TILE_ELEMENTS_BACKWARD)
    # One padding serves all three kernels: a multiple of `align` is one of 8 as well.
    hp = max([tpu_plan.padded_channels(h, l, n, align) for n in budgets]
             + [tpu_plan.padded_channels(h, plan.n, budgets[0], align)])
    return KernelConfig(
        plan=plan, has_residual=has_residual, operand_dtype=op_dtype,
        tile_forward=tpu_plan.channel_tile(hp, l, budgets[0], align),
        tile_backward=tpu_plan.channel_tile(hp, l, budgets[1], align),
        tile_taps=tpu_plan.channel_tile(hp, plan.n, budgets[0], 8 if dense else 1),
        interpret=bool(interpret)), hp


def supports(seq_len: int, dtype: jnp.dtype) -> bool:
    """`tpu_plan.supports` (every power of two in [128, 32768]); float32 and bf16 inputs."""
    return tpu_plan.supports(seq_len) and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)


def use_interpreter(backend: str | None = None) -> bool:
    """Whether the kernels run in the Pallas interpreter: $M2JAX_PALLAS_INTERPRET ("0"/"1") if
    set, otherwise whenever the backend is not a TPU."""
    flag = os.environ.get(INTERPRET_ENV_VAR, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"${INTERPRET_ENV_VAR} must be '0' or '1'; got {flag!r}.")
    return (jax.default_backend() if backend is None else backend) != "tpu"


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate: ConvFilter,
                    u_BxHxL: Array | None = None, residual: ConvFilter | None = None, *,
                    interpret: bool | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` as the Mosaic TPU kernels; shapes as there.

    Args:
        interpret: run in the Pallas interpreter; None follows `use_interpreter()`.

    Raises:
        ValueError: L or the dtype is not one the kernel handles (see `supports`).
    """
    b, h, l = v_BxHxL.shape
    if not supports(l, v_BxHxL.dtype):
        raise ValueError(
            f"the Mosaic TPU long-conv kernel needs L a multiple of 128 in "
            f"[{tpu_plan.MIN_SEQ_LEN}, {tpu_plan.MAX_DENSE_SEQ_LEN}] or of "
            f"{tpu_plan.MONARCH_SEQ_LEN_MULTIPLE} in "
            f"[{tpu_plan.MIN_MONARCH_SEQ_LEN}, {tpu_plan.MAX_SEQ_LEN}], and float32 or bfloat16 "
            f"inputs; got L = {l}, dtype {v_BxHxL.dtype}. Use implementation='auto' (which falls "
            f"back to XLA Monarch) or an XLA implementation.")
    interpret = use_interpreter() if interpret is None else bool(interpret)
    cfg, hp = make_config((b, h, l), v_BxHxL.dtype, u_BxHxL is not None, interpret)
    pad = lambda a: a if hp == h else jnp.pad(a, ((0, 0),) * (a.ndim - 2) + ((0, hp - h), (0, 0)))
    pad_d = lambda d: d if hp == h else jnp.pad(d, (0, hp - h))

    def spectrum(filt: ConvFilter) -> tuple[Array, ...]:
        k_rev = None if filt.k_rev_HxL is None else pad(filt.k_rev_HxL)
        taps = tpu_plan.doubled_taps(pad(filt.k_fwd_HxL), k_rev, pad_d(filt.d_H), cfg.plan)
        return tpu_plan.pack_spectrum(filter_spectrum(cfg, taps), cfg.plan)

    signals = [x1_BxHxL, x2_BxHxL, v_BxHxL]
    spectra = spectrum(gate)
    if u_BxHxL is not None:
        signals.append(u_BxHxL)
        spectra += spectrum(residual)
    tiles = tuple(tpu_plan.to_kernel_layout(pad(s), cfg.plan) for s in signals)
    y = tpu_plan.from_kernel_layout(block_on_tiles(cfg, tiles, spectra), cfg.plan)
    return y[:, :h] if hp != h else y

