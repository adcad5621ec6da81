"""The Triton-Pallas long-conv block: shared cases (interpreted on CPU), CUDA lowering, plans.

On a GPU run with M2JAX_PALLAS_INTERPRET=0 (benchmarks/gpu_check.sh) the same tests run the
compiled Triton kernels; the float32 tolerance then allows 3xTF32 dots
(`pallas_triton.dot_precision`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

import test_base
from kernels.long_conv_block import ConvFilter, api, dft_plan, long_conv_block, pallas_triton

INTERPRETED = pallas_triton.use_interpreter()
TRITON_CALL = "__gpu$xla.gpu.triton"


class TestPallasTriton(test_base.LongConvBlockTestBase):
    IMPLEMENTATION = "pallas_triton"
    F32_RTOL = 1e-5 if INTERPRETED else 1e-4


def export_value_and_grad(l: int, dtype, implementation: str, platforms=("cuda",), b=3, h=4):
    """Exports forward + gradients of the block (interpret off) for `platforms`; the Exported."""
    def value_and_grads(x1, x2, v, u, kf, kr, d, gf, gr, gd):
        def loss(x1, x2, v, u, kf, kr, d, gf, gr, gd):
            y = long_conv_block(x1, x2, v, ConvFilter(kf, kr, d), u, ConvFilter(gf, gr, gd),
                                implementation=implementation, interpret=False)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=tuple(range(10)))(x1, x2, v, u, kf, kr, d, gf,
                                                                  gr, gd)

    sig = jax.ShapeDtypeStruct((b, h, l), dtype)
    ker = jax.ShapeDtypeStruct((h, l), jnp.float32)
    dd = jax.ShapeDtypeStruct((h,), jnp.float32)
    return export.export(
        jax.jit(value_and_grads), platforms=list(platforms),
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(sig, sig, sig, sig, ker, ker, dd, ker, ker, dd)


@pytest.mark.parametrize("l,dtype", [(128, jnp.float32), (2048, jnp.bfloat16),
                                     (8192, jnp.bfloat16), (8192, jnp.float32)])
def test_real_kernels_lower_for_cuda(l, dtype):
    mlir = export_value_and_grad(l, dtype, "pallas_triton").mlir_module()
    # One forward and one backward Triton kernel, and no FFT inside them (the FFTs of the
    # spectrum preparation are XLA ops outside the custom calls).
    assert mlir.count(TRITON_CALL) == 2


def test_unsupported_op_in_kernel_body_raises_at_cuda_lowering(monkeypatch):
    def fft_conv(x_RxN2, kr, ki, consts, precision):  # FFTs do not exist in Pallas GPU kernels
        return jnp.fft.irfft(jnp.fft.rfft(x_RxN2, axis=-1), n=x_RxN2.shape[-1], axis=-1)

    monkeypatch.setattr(pallas_triton, "_spectral_conv", fft_conv)
    api._block.clear_cache()  # the jitted entry point must re-trace with the patched body
    try:
        with pytest.raises(NotImplementedError,
                           match="Unimplemented primitive in Pallas Triton lowering: fft"):
            export_value_and_grad(256, jnp.float32, "pallas_triton")
    finally:
        api._block.clear_cache()


def test_compiled_kernel_off_its_platform_is_a_clear_error():
    x = jnp.ones((1, 2, 128))
    k = ConvFilter(jnp.ones((2, 128)), None, jnp.ones((2,)))
    with pytest.raises(ValueError, match="runs only on 'cuda'"):
        jax.jit(lambda x: long_conv_block(x, x, x, k, implementation="pallas_triton",
                                          interpret=False)).lower(x).compile()


def test_dot_precision_per_dtype():
    assert pallas_triton.dot_precision(jnp.float32, interpret=False) == \
        jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    assert pallas_triton.dot_precision(jnp.bfloat16, interpret=False) == jax.lax.Precision.DEFAULT
    assert pallas_triton.dot_precision(jnp.float32, interpret=True) == jax.lax.Precision.HIGHEST


@pytest.mark.parametrize("l", [64, 96, 16384, 32768])
def test_lengths_outside_the_kernel(l):
    assert not pallas_triton.supports(l, jnp.float32)
    assert api.auto_choice("cuda", l, jnp.float32) == "xla_fft"
    x = jnp.ones((1, 1, l))
    k = ConvFilter(jnp.ones((1, l)), None, jnp.ones((1,)))
    with pytest.raises(ValueError, match="power of two in \\[128, 8192\\]"):
        long_conv_block(x, x, x, k, implementation="pallas_triton")


def test_interpret_env_var(monkeypatch):
    env = pallas_triton.INTERPRET_ENV_VAR
    monkeypatch.setenv(env, "0")
    assert pallas_triton.use_interpreter(backend="cpu") is False
    monkeypatch.setenv(env, "1")
    assert pallas_triton.use_interpreter(backend="gpu") is True
    monkeypatch.delenv(env)
    assert pallas_triton.use_interpreter(backend="cpu") is True
    assert pallas_triton.use_interpreter(backend="gpu") is False
    monkeypatch.setenv(env, "yes")
    with pytest.raises(ValueError, match="must be '0' or '1'"):
        pallas_triton.use_interpreter()


def test_plans_cover_the_kernel_range():
    for l, (n1, n2, rows) in {128: (16, 16, 16), 256: (32, 16, 16), 1024: (64, 32, 32),
                              8192: (128, 128, 64)}.items():
        p = dft_plan.make_plan(l)
        assert (p.n1, p.n2, p.rows, p.n) == (n1, n2, rows, 2 * l)
    with pytest.raises(ValueError, match="power of two"):
        dft_plan.make_plan(16384)
