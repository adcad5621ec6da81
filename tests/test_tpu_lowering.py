"""The default-config M2-BERT exported for TPU carries the Mosaic long-conv kernels.

`jax.export(..., platforms=["tpu"])` lowers every Pallas kernel to Mosaic MLIR on this CPU, so a
Mosaic lowering error in the model's forward or in a training step fails here without a TPU.
(`benchmarks/tpu_aot_check.py` goes one step further where libtpu is installed: the Mosaic
compiler itself, for v4 / v5e / v5p / v6e.) The CUDA counterpart, the Triton kernel in the
forward exported for `cuda`, is `tests/test_model.py::test_default_forward_exported_for_cuda_...`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import m2jax
from m2jax.train.step import TrainState, make_train_step

MOSAIC_CALL = "tpu_custom_call"
FORWARD_KERNELS = ("m2_block_forward_kernel_dense", "m2_block_taps_to_spectrum_dense")
BACKWARD_KERNELS = ("m2_block_backward_kernel_dense", "m2_block_spectrum_to_taps_dense")
BATCH = 2


@pytest.fixture(scope="module")
def default_model():
    """The abstract default model, shapes only: M2-BERT-base 80M (H = 768, L = 128, float32,
    ``long_conv_implementation="auto"``) with 2 of its 12 identical layers, to keep tracing
    short."""
    cfg = m2jax.get_model_config("m2-bert-base-80m", num_hidden_layers=2)
    assert cfg.long_conv_implementation == "auto" and cfg.max_position_embeddings == 128
    assert cfg.hidden_size == 768 and cfg.dtype == "float32"
    model = nnx.eval_shape(lambda: m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(0)))
    return cfg, model


def _ids(cfg) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((BATCH, cfg.max_position_embeddings), jnp.int32)


def test_default_forward_exported_for_tpu_carries_the_mosaic_kernel(default_model):
    cfg, model = default_model
    graphdef, state = nnx.split(model)
    exported = jax.export.export(
        jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids)), platforms=["tpu"])(state, _ids(cfg))
    mlir = exported.mlir_module()
    assert MOSAIC_CALL in mlir
    for name in FORWARD_KERNELS:
        assert name in mlir, name
    assert "stablehlo.fft" not in mlir  # the long convolutions are all in the kernels


def test_default_train_step_exported_for_tpu_carries_forward_and_backward_kernels(default_model):
    cfg, model = default_model
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    # Everything abstract enters as an argument (a closed-over abstract array cannot be traced).
    step = lambda state, consts, batch: make_train_step(graphdef, consts, tx, "mlm")(state, batch)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    ids = _ids(cfg)
    batch = {"input_ids": ids, "token_type_ids": ids, "attention_mask": ids, "labels": ids}
    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(state, consts, batch)
    mlir = exported.mlir_module()
    for name in FORWARD_KERNELS + BACKWARD_KERNELS:
        assert name in mlir, name
    assert "stablehlo.fft" not in mlir
