"""The fused M2 long-conv block: Pallas kernel vs the XLA path, CUDA lowering, dispatch.

On CPU the kernel runs in the Pallas interpreter. On a GPU run with M2JAX_PALLAS_INTERPRET=0
(benchmarks/gpu_check.sh) the same tests run the compiled Triton kernels; the float32 tolerance
then allows 3xTF32 dots (documented in kernels.m2_block_pallas.dot_precision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import kernels
from kernels import ConvFilter, dft_plan, m2_block_pallas, m2_long_conv_block, m2_block_reference
from kernels.m2_block import _block

ON_GPU = jax.default_backend() == "gpu"
INTERPRETED = kernels.use_interpreter()
F32_RTOL = 1e-5 if INTERPRETED else 1e-4
BF16_RTOL = 1e-2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed: int, b: int, h: int, l: int, dtype=jnp.float32, residual=True, reverse=True):
    ks = jax.random.split(jax.random.key(seed), 10)
    sig = [jax.random.normal(ks[i], (b, h, l), jnp.float32).astype(dtype) for i in range(4)]
    # Hyena-like kernels: decaying, O(1) total mass.
    decay = jnp.exp(-jnp.arange(l) / (l / 8))[None, :]
    k = lambda i: jax.random.normal(ks[i], (h, l)) * decay / np.sqrt(l / 8)
    gate = ConvFilter(k(4), k(5) if reverse else None, jax.random.normal(ks[6], (h,)))
    res = ConvFilter(k(7), k(8), jax.random.normal(ks[9], (h,))) if residual else None
    return sig[0], sig[1], sig[2], (sig[3] if residual else None), gate, res


SHAPES = [  # (B, H, L, residual, reverse): odd batches, the smallest tile (L=128), two plans.
    (3, 2, 128, True, True),
    (1, 3, 256, True, False),
    (5, 2, 512, False, True),
    (2, 1, 1024, True, True),
]


@pytest.mark.parametrize("b,h,l,residual,reverse", SHAPES)
def test_forward_float32_matches_xla(b, h, l, residual, reverse):
    x1, x2, v, u, gate, res = _inputs(l + b, b, h, l, residual=residual, reverse=reverse)
    y_kernel = m2_long_conv_block(x1, x2, v, gate, u, res, implementation="pallas")
    y_ref = m2_long_conv_block(x1, x2, v, gate, u, res, implementation="xla")
    assert y_kernel.shape == (b, h, l) and y_kernel.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y_kernel)))
    assert _rel(y_kernel, y_ref) < F32_RTOL
    # The XLA path itself is the plain definition of spec 3.1 (direct O(L^2) sums).
    y_direct = m2_block_reference(x1, x2, v, gate, u, res, conv_implementation="direct")
    assert _rel(y_ref, y_direct) < 1e-5


def _grads(impl, x1, x2, v, u, gate, res):
    l = v.shape[-1]
    weight = jnp.cos(0.37 * jnp.arange(l))  # a non-uniform cotangent

    def loss(x1, x2, v, u, gate, res):
        y = m2_long_conv_block(x1, x2, v, gate, u, res, implementation=impl)
        return jnp.sum(y.astype(jnp.float32) * weight)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x1, x2, v, u, gate, res)


@pytest.mark.parametrize("b,h,l,residual,reverse", [SHAPES[0], SHAPES[1], SHAPES[2]])
def test_gradients_float32_match_xla(b, h, l, residual, reverse):
    args = _inputs(7 * l + b, b, h, l, residual=residual, reverse=reverse)
    g_kernel, g_ref = _grads("pallas", *args), _grads("xla", *args)
    leaves_k, leaves_r = jax.tree.leaves(g_kernel), jax.tree.leaves(g_ref)
    assert len(leaves_k) == len(leaves_r) >= 6
    for gk, gr in zip(leaves_k, leaves_r):
        assert gk.shape == gr.shape and gk.dtype == gr.dtype
        assert np.linalg.norm(np.asarray(gr)) > 0
        assert _rel(gk, gr) < F32_RTOL


def test_bfloat16_inputs_within_bf16_tolerance():
    x1, x2, v, u, gate, res = _inputs(11, 3, 2, 512, dtype=jnp.bfloat16)
    y_kernel = m2_long_conv_block(x1, x2, v, gate, u, res, implementation="pallas")
    y_ref = m2_long_conv_block(x1, x2, v, gate, u, res, implementation="xla")
    assert y_kernel.dtype == jnp.bfloat16
    assert _rel(y_kernel, y_ref) < BF16_RTOL
    g_kernel = _grads("pallas", x1, x2, v, u, gate, res)
    g_ref = _grads("xla", x1, x2, v, u, gate, res)
    for gk, gr in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_ref)):
        assert gk.dtype == gr.dtype
        assert _rel(gk, gr) < BF16_RTOL


def test_every_output_element_is_written():
    # A NaN-poisoned padding row would leak into y only through a wrong index map.
    x1, x2, v, u, gate, res = _inputs(3, 2, 2, 128)
    y = m2_long_conv_block(x1, x2, v, gate, u, res, implementation="pallas")
    y_ref = m2_block_reference(x1, x2, v, gate, u, res)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- CUDA lowering on this machine

_TRITON_CALL = "__gpu$xla.gpu.triton"


def _export_for_cuda(l: int, dtype, b: int = 3, h: int = 4):
    """Lower forward + backward of the real (non-interpret) kernels for CUDA; returns MLIR text."""
    def value_and_grads(x1, x2, v, u, kf, kr, d, gf, gr, gd):
        def loss(x1, x2, v, u, kf, kr, d, gf, gr, gd):
            y = m2_long_conv_block(x1, x2, v, ConvFilter(kf, kr, d), u, ConvFilter(gf, gr, gd),
                                   implementation="pallas", interpret=False)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=tuple(range(10)))(x1, x2, v, u, kf, kr, d, gf, gr, gd)

    sig = jax.ShapeDtypeStruct((b, h, l), dtype)
    ker = jax.ShapeDtypeStruct((h, l), jnp.float32)
    dd = jax.ShapeDtypeStruct((h,), jnp.float32)
    exported = export.export(
        jax.jit(value_and_grads), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
    )(sig, sig, sig, sig, ker, ker, dd, ker, ker, dd)
    return exported.mlir_module()


@pytest.mark.parametrize("l,dtype", [(128, jnp.float32), (2048, jnp.bfloat16),
                                     (8192, jnp.bfloat16), (8192, jnp.float32)])
def test_real_kernels_lower_for_cuda(l, dtype):
    mlir = _export_for_cuda(l, dtype)
    # One forward and one backward Triton kernel, and no FFT inside them (the FFTs of the
    # spectrum preparation are XLA ops outside the custom calls).
    assert mlir.count(_TRITON_CALL) == 2


def test_unsupported_op_in_kernel_body_raises_at_cuda_lowering(monkeypatch):
    def fft_conv(x_RxN2, kr, ki, consts, precision):  # FFTs do not exist in Pallas GPU kernels
        return jnp.fft.irfft(jnp.fft.rfft(x_RxN2, axis=-1), n=x_RxN2.shape[-1], axis=-1)

    monkeypatch.setattr(m2_block_pallas, "_spectral_conv", fft_conv)
    _block.clear_cache()  # the jitted entry point must re-trace with the patched body
    try:
        with pytest.raises(NotImplementedError,
                           match="Unimplemented primitive in Pallas Triton lowering: fft"):
            _export_for_cuda(256, jnp.float32)
    finally:
        _block.clear_cache()


def test_dot_precision_per_dtype():
    assert m2_block_pallas.dot_precision(jnp.float32, interpret=False) == \
        jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    assert m2_block_pallas.dot_precision(jnp.bfloat16, interpret=False) == jax.lax.Precision.DEFAULT
    assert m2_block_pallas.dot_precision(jnp.float32, interpret=True) == jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- dispatch of the entry point

def test_auto_picks_xla_on_cpu_and_pallas_on_gpu():
    assert kernels.resolve_implementation("auto", 2048, backend="cpu") == "xla"
    assert kernels.resolve_implementation("auto", 2048, backend="tpu") == "xla"
    assert kernels.resolve_implementation("auto", 2048, backend="gpu") == "pallas"
    assert kernels.resolve_implementation("pallas", 2048, backend="cpu") == "pallas"
    assert kernels.resolve_implementation("xla", 2048, backend="gpu") == "xla"
    if not ON_GPU:
        assert kernels.resolve_implementation("auto", 2048) == "xla"


@pytest.mark.parametrize("l", [64, 96, 16384, 32768])
def test_lengths_outside_the_kernel_fall_back_to_xla(l):
    assert kernels.resolve_implementation("pallas", l, backend="gpu") == "xla"
    assert not kernels.kernel_supports(l)


def test_fallback_computes_the_xla_numbers():
    x1, x2, v, u, gate, res = _inputs(5, 3, 2, 96)  # 96: not a power of two
    y = m2_long_conv_block(x1, x2, v, gate, u, res, implementation="pallas")
    np.testing.assert_array_equal(np.asarray(y),
                                  np.asarray(m2_long_conv_block(x1, x2, v, gate, u, res,
                                                                implementation="xla")))


def test_bad_implementation_name_is_a_clear_error():
    x1, x2, v, u, gate, res = _inputs(5, 1, 2, 128)
    with pytest.raises(ValueError, match=r"unknown implementation 'triton'.*'auto', 'pallas', 'xla'"):
        m2_long_conv_block(x1, x2, v, gate, u, res, implementation="triton")


def test_shape_errors_name_the_argument():
    x1, x2, v, u, gate, res = _inputs(5, 1, 2, 128)
    with pytest.raises(ValueError, match="x2 must have v's shape"):
        m2_long_conv_block(x1, x2[..., :64], v, gate, u, res)
    with pytest.raises(ValueError, match="given together"):
        m2_long_conv_block(x1, x2, v, gate, u, None)


def test_interpret_env_var(monkeypatch):
    monkeypatch.setenv(kernels.INTERPRET_ENV_VAR, "0")
    assert kernels.use_interpreter(backend="cpu") is False
    monkeypatch.setenv(kernels.INTERPRET_ENV_VAR, "1")
    assert kernels.use_interpreter(backend="gpu") is True
    monkeypatch.delenv(kernels.INTERPRET_ENV_VAR)
    assert kernels.use_interpreter(backend="cpu") is True
    assert kernels.use_interpreter(backend="gpu") is False
    monkeypatch.setenv(kernels.INTERPRET_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="must be '0' or '1'"):
        kernels.use_interpreter()


def test_plans_cover_the_kernel_range():
    for l, (n1, n2, rows) in {128: (16, 16, 16), 256: (32, 16, 16), 1024: (64, 32, 32),
                              8192: (128, 128, 64)}.items():
        p = dft_plan.make_plan(l)
        assert (p.n1, p.n2, p.rows, p.n) == (n1, n2, rows, 2 * l)
    with pytest.raises(ValueError, match="power of two"):
        dft_plan.make_plan(16384)
