"""The Mosaic TPU long-conv block: shared cases (interpreted on CPU), TPU lowering, plans, tiles.

On a TPU run with M2JAX_PALLAS_INTERPRET=0 (benchmarks/tpu_check.sh) the same tests run the
compiled Mosaic kernels. The float32 tolerance holds there too: float32 callers get
``Precision.HIGHEST`` matmuls (measured here, interpreted: ~4e-7 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import test_base
from kernels.long_conv_block import (ConvFilter, api, long_conv_block, pallas_mosaic_tpu,
                                     tpu_dft, tpu_plan)

MOSAIC_CALL = "tpu_custom_call"
Case = test_base.Case
# The interpreter is slow: five cases cover both DFT forms, f32 and bf16, with and without the
# residual and reverse kernels, several L and H, several channel tiles and a padded H.
TPU_CASES = (
    Case(2, 3, 128),                                    # dense, residual + reverse
    Case(2, 3, 128, dtype="bfloat16"),
    Case(2, 50, 384, residual=False),  # dense; backward: H padded to 56, 7 tiles of 8 channels
    Case(1, 40, 512),                  # Monarch with R = 4; backward: 2 tiles of 20 channels
    Case(1, 2, 2048, reverse=False, dtype="bfloat16"),
)


class TestPallasMosaicTpu(test_base.LongConvBlockTestBase):
    IMPLEMENTATION = "pallas_mosaic_tpu"

    @classmethod
    def cases(cls):
        module = pallas_mosaic_tpu
        assert all(module.supports(c.l, jnp.dtype(c.dtype)) for c in TPU_CASES)
        return list(TPU_CASES)


def _filters(h: int, l: int):
    ker = jax.ShapeDtypeStruct((h, l), jnp.float32)
    dd = jax.ShapeDtypeStruct((h,), jnp.float32)
    return ConvFilter(ker, ker, dd), ConvFilter(ker, ker, dd)


def export_value_and_grad(l: int, dtype, platforms=("tpu",), b=2, h=8, implementation=
                          "pallas_mosaic_tpu") -> export.Exported:
    """Exports forward + every gradient of the block (interpret off) for `platforms`."""
    def value_and_grads(x1, x2, v, u, gate, res):
        def loss(x1, x2, v, u, gate, res):
            y = long_conv_block(x1, x2, v, gate, u, res, implementation=implementation,
                                interpret=False)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=tuple(range(6)))(x1, x2, v, u, gate, res)

    sig = jax.ShapeDtypeStruct((b, h, l), dtype)
    return export.export(jax.jit(value_and_grads), platforms=list(platforms))(
        sig, sig, sig, sig, *_filters(h, l))


KERNEL_NAMES = ("forward_kernel", "backward_kernel", "taps_to_spectrum", "spectrum_to_taps")


@pytest.mark.parametrize("l,dtype", [(128, jnp.float32), (384, jnp.bfloat16),
                                     (512, jnp.float32), (32768, jnp.bfloat16)])
def test_real_kernels_lower_for_tpu(l, dtype):
    mlir = export_value_and_grad(l, dtype).mlir_module()
    # Block forward and backward, and the filter spectra of both filters and their adjoints.
    assert mlir.count(MOSAIC_CALL) == 6
    kind = tpu_plan.make_plan(l).kind
    for name in KERNEL_NAMES:
        assert f"m2_block_{name}_{kind}" in mlir, name
    assert "stablehlo.fft" not in mlir  # no XLA FFT on the TPU path


def test_unsupported_op_in_kernel_body_raises_at_tpu_lowering(monkeypatch):
    matmul_forward = tpu_dft.DenseDft.forward

    def fft_forward(self, x):  # no FFT in a Mosaic kernel: the export must fail
        return tuple(jnp.real(jnp.fft.ifft(jnp.fft.fft(p))) for p in matmul_forward(self, x))

    monkeypatch.setattr(tpu_dft.DenseDft, "forward", fft_forward)
    api._block.clear_cache()
    try:
        # Mosaic has no complex vectors either: the first complex value fails to lower.
        with pytest.raises(Exception, match="fft|Invalid type"):
            export_value_and_grad(128, jnp.float32)
    finally:
        api._block.clear_cache()


def test_compiled_kernel_runs_only_on_tpu():
    x = jnp.ones((1, 2, 128))
    k = ConvFilter(jnp.ones((2, 128)), None, jnp.ones((2,)))
    fn = jax.jit(lambda x: long_conv_block(x, x, x, k, implementation="pallas_mosaic_tpu",
                                           interpret=False))
    if jax.default_backend() == "tpu":  # benchmarks/tpu_check.sh: the compiled kernel runs
        assert np.all(np.isfinite(np.asarray(fn(x))))
    else:
        with pytest.raises(ValueError, match="runs only on 'tpu'"):
            fn.lower(x).compile()


def test_auto_exported_for_cpu_and_tpu_carries_the_kernel_in_the_tpu_branch():
    # `auto` lowers one branch per platform: the CPU's XLA path and the TPU's Mosaic kernels.
    # (tests/kernels/test_api.py runs such a multi-platform module on this CPU.)
    exp = export_value_and_grad(256, jnp.float32, platforms=("cpu", "tpu"), implementation="auto")
    assert exp.platforms == ("cpu", "tpu") and exp.mlir_module().count(MOSAIC_CALL) == 6


@pytest.mark.parametrize("l", [64, 100, 640, 1000, 65536])
def test_lengths_outside_the_kernel(l):
    assert not pallas_mosaic_tpu.supports(l, jnp.float32)
    assert api.auto_choice("tpu", l, jnp.float32) == "xla_monarch"
    x = jnp.ones((1, 1, l))
    k = ConvFilter(jnp.ones((1, l)), None, jnp.ones((1,)))
    with pytest.raises(ValueError, match=r"multiple of 128 in \[128, 384\] or of 512 in "):
        long_conv_block(x, x, x, k, implementation="pallas_mosaic_tpu")


def test_every_power_of_two_in_range_is_supported():
    for e in range(7, 16):
        assert pallas_mosaic_tpu.supports(2 ** e, jnp.bfloat16), 2 ** e
        assert api.auto_choice("tpu", 2 ** e, jnp.float32) == "pallas_mosaic_tpu"
    assert not pallas_mosaic_tpu.supports(1024, jnp.float16)


def test_plans():
    assert tpu_plan.make_plan(384) == tpu_plan.TpuPlan(384, "dense")
    for l, (n1, rows) in {512: (8, 4), 1536: (24, 12), 8192: (128, 64),
                          32768: (512, 256)}.items():
        p = tpu_plan.make_plan(l)
        assert (p.kind, p.n1, p.rows, p.n1 * tpu_plan.LANES) == ("monarch", n1, rows, 2 * l)


@pytest.mark.parametrize("h,l,dtype", [(768, 128, jnp.float32), (768, 128, jnp.bfloat16),
                                       (1024, 512, jnp.float32), (12, 256, jnp.float32),
                                       (100, 384, jnp.bfloat16), (768, 4096, jnp.float32),
                                       (960, 32768, jnp.bfloat16)])
def test_tiles_respect_tpu_block_rules_and_vmem(h, l, dtype):
    cfg, hp = pallas_mosaic_tpu.make_config((4, h, l), dtype, True, interpret=False)
    dense = cfg.plan.kind == "dense"
    sublanes = 16 if dtype == jnp.bfloat16 else 8
    assert hp >= h and hp - h < sublanes
    for tile in (cfg.tile_forward, cfg.tile_backward, cfg.tile_taps):
        assert hp % tile == 0
        if dense and tile != hp:  # (channels, L) blocks: whole sublane tiles or all of H
            assert tile % (8 if tile == cfg.tile_taps else sublanes) == 0
    if dense:
        assert l % tpu_plan.LANES == 0
    else:  # (R, 128) blocks (R the whole axis); (tile * N1, 128) stage-2 operands
        assert cfg.plan.n1 % 8 == 0
    # One program's VMEM stays under the 16 MiB default scoped limit of v4 / v5e.
    for tile, n_sig, n_out, n_acc in ((cfg.tile_forward, 4, 1, 0),
                                      (cfg.tile_backward, 5, 4, 2)):
        est = tpu_plan.vmem_estimate_bytes(cfg.plan, tile, n_sig, n_out, 2 + n_acc,
                                           jnp.dtype(cfg.operand_dtype).itemsize)
        assert est < 16 * 2 ** 20, (tile, est)


def test_interpret_env_var(monkeypatch):
    env = pallas_mosaic_tpu.INTERPRET_ENV_VAR
    monkeypatch.setenv(env, "0")
    assert pallas_mosaic_tpu.use_interpreter(backend="cpu") is False
    monkeypatch.setenv(env, "1")
    assert pallas_mosaic_tpu.use_interpreter(backend="tpu") is True
    monkeypatch.delenv(env)
    assert pallas_mosaic_tpu.use_interpreter(backend="cpu") is True
    assert pallas_mosaic_tpu.use_interpreter(backend="tpu") is False
    monkeypatch.setenv(env, "yes")
    with pytest.raises(ValueError, match="must be '0' or '1'"):
        pallas_mosaic_tpu.use_interpreter()


def test_dense_packing_is_the_real_dft():
    # Column 0 of the packed forward holds bin 0 (real) and the Nyquist bin (imaginary slot).
    l = 128
    x = np.random.default_rng(0).standard_normal((3, l))
    ar, ai, ai_t = (np.asarray(c, np.float64) for c in
                    tpu_plan.constants(tpu_plan.make_plan(l), "block", jnp.float32))
    spec = np.fft.rfft(x, n=2 * l)
    np.testing.assert_allclose(x @ ar[:, 1:], spec.real[:, 1:l], atol=1e-4)
    np.testing.assert_allclose(x @ ai[:, 1:], spec.imag[:, 1:l], atol=1e-4)
    np.testing.assert_allclose((x @ ar)[:, 0], spec.real[:, 0], atol=1e-4)
    np.testing.assert_allclose((x @ ai)[:, 0], spec.real[:, l], atol=1e-4)
    np.testing.assert_array_equal(ai_t, ai.T)
