"""The entry point: names, errors, and `auto`'s choice per lowering platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import test_base
from kernels.long_conv_block import (
    AUTO_PREFERENCES, IMPLEMENTATIONS, ConvFilter, FilterSpectrum, api, auto_choice,
    long_conv_block, prepare_filter)

TRITON_CALL = "__gpu$xla.gpu.triton"


def test_names():
    assert IMPLEMENTATIONS == ("auto", "xla_fft", "xla_monarch", "xla_dense_dft",
                               "pallas_triton", "pallas_mosaic_tpu")
    assert set(AUTO_PREFERENCES) == {"cpu", "cuda", "tpu", "default"}


def test_auto_choice_per_platform():
    f32 = jnp.float32
    assert auto_choice("cuda", 2048, f32) == "pallas_triton"
    assert auto_choice("cuda", 100, f32) == "xla_fft"          # outside the kernel's range
    assert auto_choice("cpu", 2048, f32) == AUTO_PREFERENCES["cpu"][0]
    # ConvFilters (training) keep the FFT on CPU at every L: the dense DFT's backward is slower.
    assert auto_choice("cpu", 128, f32) == "xla_fft"
    assert auto_choice("tpu", 2048, f32) == "pallas_mosaic_tpu"
    assert auto_choice("tpu", 640, f32) == "xla_monarch"  # outside the TPU kernel's range
    assert auto_choice("tpu", 1, f32) == "xla_fft"  # L = 1: no Monarch factorisation
    assert auto_choice("rocm", 2048, f32) == AUTO_PREFERENCES["default"][0]


def test_auto_on_this_cpu_computes_the_cpu_choice():
    args = test_base.make_inputs(test_base.Case(2, 3, 64))
    y = long_conv_block(*args)
    expected = long_conv_block(*args, implementation=auto_choice("cpu", 64, jnp.float32))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))


def test_unknown_and_unavailable_implementations_are_clear_errors():
    args = test_base.make_inputs(test_base.Case(1, 2, 16))
    with pytest.raises(ValueError, match=r"unknown implementation 'fft'.*'auto', 'xla_fft'"):
        long_conv_block(*args, implementation="fft")


def test_shape_errors_name_the_argument():
    x1, x2, v, gate, u, res = test_base.make_inputs(test_base.Case(1, 2, 16))
    with pytest.raises(ValueError, match="x2 must have v's shape"):
        long_conv_block(x1, x2[..., :8], v, gate, u, res)
    with pytest.raises(ValueError, match="given together"):
        long_conv_block(x1, x2, v, gate, u, None)
    with pytest.raises(ValueError, match=r"gate.k_rev_HxL must have shape \(H, L\) = \(2, 16\)"):
        long_conv_block(x1, x2, v, gate._replace(k_rev_HxL=gate.k_rev_HxL[:, :8]), u, res)
    with pytest.raises(ValueError, match=r"residual.d_H must have shape \(2,\)"):
        long_conv_block(x1, x2, v, gate, u, res._replace(d_H=res.d_H[:1]))
    with pytest.raises(ValueError, match="floating-point"):
        long_conv_block(x1.astype(jnp.int32), x2, v, gate, u, res)


def test_prepare_filter_gives_spectra_only_where_a_spectrum_path_runs():
    _, _, v, gate, _, _ = test_base.make_inputs(test_base.Case(1, 2, 128))
    f32 = jnp.float32
    assert isinstance(prepare_filter(gate, platform="cpu", dtype=f32), FilterSpectrum)
    for name in ("xla_fft", "xla_dense_dft"):
        assert isinstance(prepare_filter(gate, platform="cuda", dtype=f32, implementation=name),
                          FilterSpectrum)
    # The kernels and the Monarch path build their own spectra: the filter stays as it is.
    assert prepare_filter(gate, platform="cuda", dtype=f32) is gate
    assert prepare_filter(gate, platform="tpu", dtype=f32) is gate
    assert prepare_filter(gate, platform="cpu", dtype=f32, implementation="xla_monarch") is gate
    with pytest.raises(ValueError, match="unknown implementation"):
        prepare_filter(gate, platform="cpu", dtype=f32, implementation="fft")


def test_filter_spectra_errors_name_the_argument():
    x1, x2, v, gate, u, res = test_base.make_inputs(test_base.Case(1, 2, 16))
    prep = lambda f: prepare_filter(f, platform="cpu", dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"XLA paths \('xla_fft', 'xla_dense_dft'\) only; got "
                                         r"implementation='xla_monarch'"):
        long_conv_block(x1, x2, v, prep(gate), u, prep(res), implementation="xla_monarch")
    with pytest.raises(ValueError, match="must both be ConvFilters or both FilterSpectrums"):
        long_conv_block(x1, x2, v, prep(gate), u, res)
    with pytest.raises(ValueError, match=r"gate.khat_HxF must be a complex \(H, L \+ 1\)"):
        long_conv_block(x1, x2, v, FilterSpectrum(prep(gate).khat_HxF[:, :16]), u, prep(res))


def test_spectra_run_an_xla_spectrum_path_on_every_platform():
    # A spectrum is an XLA path's operand (the dense DFT on CPU at this L, the FFT elsewhere):
    # auto exported for CPU and CUDA carries no Triton call and computes the same block.
    x1, x2, v, gate, u, res = test_base.make_inputs(test_base.Case(2, 4, 128))
    prep = lambda f: prepare_filter(f, platform="cpu", dtype=jnp.float32)
    fn = jax.jit(lambda *a: long_conv_block(*a))
    args = (x1, x2, v, prep(gate), u, prep(res))
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    exp = export.export(fn, platforms=["cpu", "cuda"])(*specs)
    assert TRITON_CALL not in exp.mlir_module()
    np.testing.assert_allclose(np.asarray(exp.call(*args)),
                               np.asarray(long_conv_block(x1, x2, v, gate, u, res)),
                               rtol=1e-5, atol=1e-5)


def _export_auto(l: int, platforms: list[str]):
    def loss_and_grads(x1, x2, v, u, gate, res):
        def loss(x1, x2, v, u, gate, res):
            return jnp.sum(long_conv_block(x1, x2, v, gate, u, res) ** 2)
        return jax.value_and_grad(loss, argnums=tuple(range(6)))(x1, x2, v, u, gate, res)

    x1, x2, v, gate, u, res = test_base.make_inputs(test_base.Case(2, 4, l))
    args = (x1, x2, v, u, gate, res)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    exp = export.export(jax.jit(loss_and_grads), platforms=platforms,
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
                        )(*specs)
    return exp, loss_and_grads, args


def test_auto_exported_for_cuda_carries_the_triton_kernel():
    exp, _, _ = _export_auto(128, ["cuda"])
    assert exp.mlir_module().count(TRITON_CALL) == 2  # forward and backward kernels
    # Where the kernel does not handle L, CUDA gets the XLA path.
    exp, _, _ = _export_auto(96, ["cuda"])
    assert TRITON_CALL not in exp.mlir_module()


def test_auto_exported_for_cpu_and_cuda_runs_here_with_the_cpu_path():
    exp, fn, args = _export_auto(128, ["cpu", "cuda"])
    assert exp.platforms == ("cpu", "cuda")
    assert exp.mlir_module().count(TRITON_CALL) == 2
    got, want = exp.call(*args), jax.jit(fn)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_entry_point_compiles_once_per_shape():
    api._block.clear_cache()
    for seed in range(3):
        long_conv_block(*test_base.make_inputs(test_base.Case(1, 2, 32), seed=seed))
    assert api._block._cache_size() == 1
