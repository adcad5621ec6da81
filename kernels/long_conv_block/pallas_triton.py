"""Pallas (Triton lowering) kernels for the M2 long-convolution block, with a custom VJP.

One program per (channel, batch row) holds a whole sequence as an (R, N2) tile and runs the
size-2L circular convolution as FlashFFTConv does: the DFT of spec section 7 as small dense
matmuls on real/imaginary float32 planes (Pallas GPU kernels have no FFT and no complex dtype),
twiddles, a pointwise product with the kernel spectrum (D and 1/N folded in, `dft_plan`), then the
inverse stages. The gating around the convolutions (``v * x1``, ``* x2``, ``+`` the residual
convolution of u) is fused, so the block reads its inputs once and writes y once.

Backward: a second kernel recomputes the gate convolution and runs the two transposed
convolutions (same stages with the conjugate spectrum) fused with the gating derivatives; the
gradients of the kernel spectra (sums over the batch of conj(X) * dY) are XLA FFTs.

Backend: Triton (`pallas.triton.CompilerParams`), on purpose. It lowers for A100 (sm80) and
H100/H200 alike, its `dot` takes float32 planes with a chosen input precision (3xTF32 for float32
callers, TF32 for bf16 callers), and it can be lowered for CUDA on a CPU machine. Mosaic GPU is
Hopper-first (partial Ampere support) and is interpreted on CPU only through private APIs.

Off a GPU the kernels run in the Pallas interpreter (tests), or as set by $M2JAX_PALLAS_INTERPRET.
Compiled, each `pallas_call` is lowered for CUDA only (`lowering.lower_only_for`), so a module
exported for several platforms can carry this path in its CUDA branch.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.long_conv_block import base, dft_plan, lowering
from kernels.long_conv_block.base import ConvFilter
from kernels.long_conv_block.dft_plan import DftPlan

Array = jax.Array
INTERPRET_ENV_VAR = "M2JAX_PALLAS_INTERPRET"
_F32 = jnp.float32
_NUM_CONSTANTS = 8


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one kernel launch (hashable: a `custom_vjp` non-diff argument).

    Attributes:
        plan: the DFT factorisation for this L.
        has_residual: whether the block includes the residual convolution of u.
        interpret: run through the Pallas interpreter (CPU tests) instead of Triton.
        precision: dot precision inside the kernel (see `dot_precision`).
    """

    plan: DftPlan
    has_residual: bool
    interpret: bool
    precision: jax.lax.PrecisionLike

    @property
    def num_warps(self) -> int:
        # 128 x 128 float32 planes need the registers of 8 warps; small tiles are fine with 4.
        return 8 if self.plan.n1 * self.plan.n2 > 4096 else 4


def dot_precision(dtype: jnp.dtype, interpret: bool) -> jax.lax.PrecisionLike:
    """The matmul precision of the DFT stages.

    Float32 callers get 3xTF32 (float32-level error on the tensor cores); bf16 callers get TF32,
    whose ~1e-3 relative error is below bf16's rounding. The interpreter runs on the CPU, where the
    TF32 algorithms do not exist: HIGHEST (plain float32) there.
    """
    if interpret:
        return jax.lax.Precision.HIGHEST
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return jax.lax.Precision.DEFAULT


def _spectral_conv(x_RxN2: Array, kr_N1xN2: Array, ki_N1xN2: Array, consts: tuple[Array, ...],
                   precision: jax.lax.PrecisionLike) -> Array:
    """First L outputs of the size-N circular convolution of one zero-padded tile, in registers.

    ``x`` is real (R, N2) float32; (kr, ki) the kernel spectrum in the transposed layout with 1/N
    folded in. Returns (R, N2) float32.
    """
    f1r, f1i, twr, twi, f2r, f2i, g1r, g1i = consts
    dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=_F32)
    # Stage 1: N1-point DFTs down the columns; x's zero rows beyond R are skipped.
    ar, ai = dot(f1r, x_RxN2), dot(f1i, x_RxN2)
    ar, ai = ar * twr - ai * twi, ar * twi + ai * twr
    # Stage 2: N2-point DFTs along the rows; B[k1, k2] is frequency k1 + N1 * k2.
    br = dot(ar, f2r) - dot(ai, f2i)
    bi = dot(ar, f2i) + dot(ai, f2r)
    pr, pi = br * kr_N1xN2 - bi * ki_N1xN2, br * ki_N1xN2 + bi * kr_N1xN2
    # Inverse: conj(F_N2) along the rows, conj(twiddles), conj(F_N1) for the kept rows only.
    cr = dot(pr, f2r) + dot(pi, f2i)
    ci = dot(pi, f2r) - dot(pr, f2i)
    cr, ci = cr * twr + ci * twi, ci * twr - cr * twi
    # Re((g1r + i g1i)(cr + i ci)), g1 = conj(F_N1)[:R] already conjugated.
    return dot(g1r, cr) - dot(g1i, ci)


def _load(ref) -> Array:
    return ref[...].astype(_F32)


def _forward_kernel(*refs, has_residual: bool, precision: jax.lax.PrecisionLike) -> None:
    """y = conv_f(v * x1) * x2 (+ conv_g(u)); D terms live in the spectra."""
    n_sig = 4 if has_residual else 3
    n_spec = 4 if has_residual else 2
    sig, spec = refs[:n_sig], refs[n_sig:n_sig + n_spec]
    consts = tuple(r[...] for r in refs[n_sig + n_spec:n_sig + n_spec + _NUM_CONSTANTS])
    (y_ref,) = refs[n_sig + n_spec + _NUM_CONSTANTS:]
    w = _load(sig[2]) * _load(sig[0])
    y = _spectral_conv(w, spec[0][...], spec[1][...], consts, precision) * _load(sig[1])
    if has_residual:
        y = y + _spectral_conv(_load(sig[3]), spec[2][...], spec[3][...], consts, precision)
    y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(*refs, has_residual: bool, precision: jax.lax.PrecisionLike) -> None:
    """Input cotangents of the block: dx1, dx2, dv (and du).

    The transposed convolution is the convolution with the conjugate spectrum (real kernel), and
    the zero padding makes the truncation self-adjoint, so it reuses `_spectral_conv`.
    """
    n_sig = 5 if has_residual else 4
    n_spec = 4 if has_residual else 2
    sig, spec = refs[:n_sig], refs[n_sig:n_sig + n_spec]
    consts = tuple(r[...] for r in refs[n_sig + n_spec:n_sig + n_spec + _NUM_CONSTANTS])
    out = refs[n_sig + n_spec + _NUM_CONSTANTS:]
    dy, x1, x2, v = (_load(r) for r in sig[:4])
    kfr, kfi = spec[0][...], spec[1][...]
    w = v * x1
    out[1][...] = (dy * _spectral_conv(w, kfr, kfi, consts, precision)).astype(out[1].dtype)
    dw = _spectral_conv(dy * x2, kfr, -kfi, consts, precision)
    out[0][...] = (dw * v).astype(out[0].dtype)
    out[2][...] = (dw * x1).astype(out[2].dtype)
    if has_residual:
        du = _spectral_conv(dy, spec[2][...], -spec[3][...], consts, precision)
        out[3][...] = du.astype(out[3].dtype)


def _call(kernel_body, cfg: KernelConfig, signals: tuple[Array, ...], spectra: tuple[Array, ...],
          out_dtypes: tuple[jnp.dtype, ...]) -> tuple[Array, ...]:
    """Launch one kernel over the grid (H, B): programs of one channel share its spectrum in L2."""
    plan = cfg.plan
    b, h, r, n2 = signals[0].shape
    consts = dft_plan.dft_constants(plan.seq_len).as_tuple()
    tile = pl.BlockSpec((None, None, r, n2), lambda hi, bi: (bi, hi, 0, 0))
    spec_block = pl.BlockSpec((None, plan.n1, plan.n2), lambda hi, bi: (hi, 0, 0))
    const_specs = [pl.BlockSpec(c.shape, lambda hi, bi: (0, 0)) for c in consts]
    call = pl.pallas_call(
        functools.partial(kernel_body, has_residual=cfg.has_residual, precision=cfg.precision),
        out_shape=tuple(jax.ShapeDtypeStruct((b, h, r, n2), d) for d in out_dtypes),
        grid=(h, b),
        in_specs=[tile] * len(signals) + [spec_block] * len(spectra) + const_specs,
        out_specs=tuple(tile for _ in out_dtypes),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name=kernel_body.__name__.strip("_"),
    )
    operands = (*signals, *spectra, *consts)
    if cfg.interpret:
        return call(*operands)
    return tuple(lowering.lower_only_for("cuda", call, *operands))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_on_tiles(cfg: KernelConfig, signals: tuple[Array, ...],
                   spectra: tuple[Array, ...]) -> Array:
    """The fused block on (B, H, R, N2) tiles.

    Args:
        cfg: static launch settings.
        signals: (x1, x2, v) or (x1, x2, v, u), each (B, H, R, N2), any float dtype (zero rows
            beyond L / N2).
        spectra: (kf_real, kf_imag) or (kf_real, kf_imag, kg_real, kg_imag), float32 (H, N1, N2),
            from `dft_plan.kernel_spectrum`.

    Returns:
        y, (B, H, R, N2), dtype of v.
    """
    (y,) = _call(_forward_kernel, cfg, signals, spectra, (signals[2].dtype,))
    return y


def _block_fwd(cfg, signals, spectra):
    return block_on_tiles(cfg, signals, spectra), (signals, spectra)


def _spectrum_cotangent(x_BxHxRxN2: Array, g_BxHxRxN2: Array, plan: DftPlan) -> tuple[Array, Array]:
    """d loss / d (real, imag) spectrum planes = sum_b conj(DFT x) * DFT g (XLA FFTs)."""
    b, h = x_BxHxRxN2.shape[:2]
    flat = lambda t: t.reshape(b, h, plan.padded_len)
    prod = jnp.sum(jnp.conj(dft_plan.signal_spectrum(flat(x_BxHxRxN2), plan))
                   * dft_plan.signal_spectrum(flat(g_BxHxRxN2), plan), axis=0)
    return jnp.real(prod), jnp.imag(prod)


def _block_bwd(cfg, res, dy):
    signals, spectra = res
    dtypes = tuple(s.dtype for s in (signals[0], signals[1], signals[2]))
    if cfg.has_residual:
        dtypes += (signals[3].dtype,)
    grads = _call(_backward_kernel, cfg, (dy,) + tuple(signals), spectra, dtypes)
    f32 = lambda t: t.astype(_F32)
    dyf = f32(dy)
    spec_grads = _spectrum_cotangent(f32(signals[2]) * f32(signals[0]), dyf * f32(signals[1]),
                                     cfg.plan)
    if cfg.has_residual:
        spec_grads += _spectrum_cotangent(f32(signals[3]), dyf, cfg.plan)
    return tuple(grads), spec_grads


block_on_tiles.defvjp(_block_fwd, _block_bwd)


def supports(seq_len: int, dtype: jnp.dtype) -> bool:
    """L a power of two in [128, 8192] (`dft_plan.kernel_supports`); float32 and bf16 inputs."""
    return dft_plan.kernel_supports(seq_len) and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)


def use_interpreter(backend: str | None = None) -> bool:
    """Whether the kernels run in the Pallas interpreter: $M2JAX_PALLAS_INTERPRET ("0"/"1") if
    set, otherwise whenever the backend is not a GPU."""
    flag = os.environ.get(INTERPRET_ENV_VAR, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"${INTERPRET_ENV_VAR} must be '0' or '1'; got {flag!r}.")
    backend = jax.default_backend() if backend is None else backend
    return backend not in ("gpu", "cuda")


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate: ConvFilter,
                    u_BxHxL: Array | None = None, residual: ConvFilter | None = None, *,
                    interpret: bool | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` as the fused Triton kernel; shapes as there.

    Args:
        interpret: run in the Pallas interpreter; None follows `use_interpreter()`.

    Raises:
        ValueError: L is not one the kernel handles (see `supports`).
    """
    seq_len = v_BxHxL.shape[-1]
    if not supports(seq_len, v_BxHxL.dtype):
        raise ValueError(
            f"the Triton long-conv kernel needs L a power of two in "
            f"[{dft_plan.MIN_KERNEL_SEQ_LEN}, {dft_plan.MAX_KERNEL_SEQ_LEN}] and float32 or "
            f"bfloat16 inputs; got L = {seq_len}, dtype {v_BxHxL.dtype}. Use implementation="
            f"'auto' (which falls back to XLA) or an XLA implementation.")
    interpret = use_interpreter() if interpret is None else bool(interpret)
    plan = dft_plan.make_plan(seq_len)
    spectra = dft_plan.kernel_spectrum(base.doubled_kernel(gate), plan)
    signals = [x1_BxHxL, x2_BxHxL, v_BxHxL]
    if u_BxHxL is not None:
        spectra += dft_plan.kernel_spectrum(base.doubled_kernel(residual), plan)
        signals.append(u_BxHxL)
    cfg = KernelConfig(plan=plan, has_residual=u_BxHxL is not None, interpret=interpret,
                       precision=dot_precision(v_BxHxL.dtype, interpret))
    tiles = tuple(dft_plan.to_tiles(s, plan) for s in signals)
    y = block_on_tiles(cfg, tiles, spectra)
    return dft_plan.from_tiles(y, plan)
