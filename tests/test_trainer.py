"""Trainer pieces in-process: optimizer semantics, parameter groups, gradient accumulation,
sharding rules, non-finite steps, configs."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import m2jax
from m2jax import sharding as shd
from m2jax.optim import OptimizerConfig, make_optimizer, param_group_labels, warmup_linear_decay
from m2jax.train.errors import NonFiniteError
from m2jax.train.init import model_config
from m2jax.train.loop import _check_finite
from m2jax.train.step import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import glue as glue_config  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402

CFG = m2jax.get_model_config("tiny", hidden_dropout_prob=0.0)


def _batch(B=8, seed=0):
    rng = np.random.default_rng(seed)
    L = CFG.max_position_embeddings
    ids = rng.integers(1, CFG.vocab_size, (B, L)).astype(np.int32)
    labels = np.where(rng.random((B, L)) < 0.3, ids, -100).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "token_type_ids": jnp.zeros((B, L), jnp.int32),
            "attention_mask": jnp.ones((B, L), jnp.int32), "labels": jnp.asarray(labels)}


def _state(opt_cfg, seed=0):
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(seed))
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(opt_cfg, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    return graphdef, consts, tx, state


def test_schedule_warms_up_then_decays_to_the_final_fraction():
    s = warmup_linear_decay(1.0, total_steps=100, warmup_fraction=0.06, final_fraction=0.02)
    np.testing.assert_allclose([s(0), s(3), s(6), s(53), s(100)], [0.0, 0.5, 1.0, 0.51, 0.02],
                               atol=1e-6)


def test_decoupled_weight_decay_scales_with_schedule_not_lr():
    """Composer DecoupledAdamW: p -= lr_t * adam + wd * (lr_t / lr_peak) * p (spec section 0)."""
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_norm=None, total_steps=10,
                          warmup_fraction=0.2)
    params = {"w": jnp.full((3,), 2.0)}
    tx = make_optimizer(cfg, params)
    opt = tx.init(params)
    zero = {"w": jnp.zeros(3)}
    for step in range(2):  # lr_t at step 1 is half the peak (2 warmup steps)
        updates, opt = tx.update(zero, opt, params)
    # With zero gradients only the decay moves p: -wd * (lr_1 / lr_peak) * p = -0.1 * 0.5 * 2.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    torch_style = OptimizerConfig(**{**cfg.__dict__, "name": "adamw"})
    tx2 = make_optimizer(torch_style, params)
    opt2 = tx2.init(params)
    for step in range(2):
        updates2, opt2 = tx2.update(zero, opt2, params)
    np.testing.assert_allclose(updates2["w"], -1e-3 * 0.5 * 0.1 * 2.0, rtol=1e-6)


def test_filter_groups_apply_their_own_learning_rates():
    cfg = OptimizerConfig(lr=1e-4, weight_decay=0.0, filter_lr=1e-2, filter_weight_decay=0.0,
                          z_lr=1e-6, clip_norm=None, total_steps=4, warmup_fraction=0.25,
                          final_lr_fraction=1.0, param_groups="filter_groups")
    graphdef, consts, tx, state = _state(cfg)
    step = jax.jit(make_train_step(graphdef, consts, tx, "mlm"))
    state, _ = step(state, _batch())  # step 0: lr 0 during warmup
    before = state.params
    state, _ = step(state, _batch(seed=1))
    labels = param_group_labels(before, "filter_groups")
    moved = {"default": [], "filter": [], "z": []}
    for lab, a, b in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(before),
                         jax.tree_util.tree_leaves(state.params)):
        moved[lab].append(float(jnp.max(jnp.abs(a - b))))
    # Adam's second step moves each weight by at most ~lr (|m/sqrt(v)| <= ~1.x).
    assert 0.2e-2 < max(moved["filter"]) <= 1.5e-2
    assert 0.2e-4 < max(moved["default"]) <= 1.5e-4
    assert 0 < max(moved["z"]) <= 1.5e-6
    single = param_group_labels(before, "single")
    assert set(jax.tree_util.tree_leaves(single)) == {"default"}


def test_gradient_accumulation_equals_one_large_batch():
    cfg = OptimizerConfig(lr=1e-3, total_steps=10, warmup_fraction=0.1)
    graphdef, consts, tx, state = _state(cfg)
    batch = _batch(B=8)
    one = jax.jit(make_train_step(graphdef, consts, tx, "mlm", accum_steps=1))
    four = jax.jit(make_train_step(graphdef, consts, tx, "mlm", accum_steps=4))
    s1, m1 = one(state, batch)
    s1, m1 = one(s1, _batch(B=8, seed=3))
    s4, m4 = four(state, batch)
    s4, m4 = four(s4, _batch(B=8, seed=3))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["count"], m1["count"])
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_reduces_loss_on_a_fixed_batch():
    cfg = OptimizerConfig(lr=3e-3, total_steps=30, warmup_fraction=0.1, clip_norm=1.0)
    graphdef, consts, tx, state = _state(cfg)
    step = jax.jit(make_train_step(graphdef, consts, tx, "mlm"))
    batch = _batch()
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0


def test_classification_step_masks_padded_examples():
    model = m2jax.M2BertForSequenceClassification(CFG.replace(num_labels=3), rngs=nnx.Rngs(0))
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.0)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(graphdef, consts, tx, "classification"))
    b = _batch(B=4)
    b["labels"] = jnp.array([0, 2, 1, -1])
    b["example_mask"] = jnp.array([1, 1, 1, 0])
    _, metrics = step(state, b)
    logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[:3], b["labels"][:3]).mean()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert float(metrics["count"]) == 3


def test_mesh_shapes_are_checked():
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    assert shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}).shape["data"] == jax.device_count()


def test_a_non_finite_step_is_not_applied():
    cfg = OptimizerConfig(lr=1e-3, total_steps=10, warmup_fraction=0.1)
    graphdef, consts, tx, state = _state(cfg)
    step = jax.jit(make_train_step(graphdef, consts, tx, "mlm"))
    state, metrics = step(state, _batch())
    assert bool(metrics["finite"]) and int(state.step) == 1
    # An infinite weight makes the loss NaN: the step comes back with the state unchanged.
    def poison(path, x):
        return jnp.full_like(x, jnp.inf) if "embeddings" in jax.tree_util.keystr(path) else x

    bad = state.replace(params=jax.tree_util.tree_map_with_path(poison, state.params))
    after, metrics = step(bad, _batch(seed=1))
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(bad), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)  # step counter, params, Adam moments, rng


def test_non_finite_steps_are_reported_with_the_first_one():
    ok = {"finite": np.bool_(True), "loss": np.float32(2.0), "grad_norm": np.float32(1.0)}
    bad = {"finite": np.bool_(False), "loss": np.float32(np.nan), "grad_norm": np.float32(np.inf)}
    assert _check_finite([(1, ok)])["loss"] == 2.0
    with pytest.raises(NonFiniteError, match=r"not finite at step 7 \(loss nan, gradient norm inf"):
        _check_finite([(6, ok), (7, bad), (8, bad)])


@pytest.mark.parametrize("variant", ["m2_base_80m", "m2_base_110m", "m2_large_260m",
                                     "m2_large_341m", "m2_80m_2k", "m2_80m_8k", "m2_80m_32k",
                                     "smoke"])
def test_pretraining_configs_build_valid_models(variant):
    c = pretrain_config.get_config(variant)
    cfg = model_config(c.model)
    assert c.optimizer.name == "decoupled" and c.optimizer.param_groups == "single"
    if variant != "smoke":
        assert (c.optimizer.lr, c.optimizer.b2, c.optimizer.eps) == (8e-4, 0.98, 1e-6)
        assert c.data.mlm_probability == 0.30 and cfg.dtype == "bfloat16"
    assert cfg.hyena_training_additions == (variant == "m2_base_80m")


def test_glue_config_has_every_task_and_chains_from_mnli():
    c = glue_config.get_config("m2_base_80m")
    assert list(c.task_order)[0] == "mnli"
    assert {t: c.tasks[t].start_from_task for t in ("rte", "mrpc", "stsb")} == \
        {"rte": "mnli", "mrpc": "mnli", "stsb": "mnli"}
    assert len(c.tasks) == 8 and list(c.tasks.rte.seeds) == [19, 8364, 717, 10536, 90166]
    assert (c.tasks.qqp.optimizer.name, c.tasks.qqp.optimizer.lr, c.tasks.qqp.epochs) == ("adamw", 3e-5, 10)
    assert c.tasks.qnli.pool_all and not c.tasks.mnli.pool_all
    c110 = glue_config.get_config("m2_base_110m")
    assert c110.tasks.cola.optimizer.name == "adamw" and c110.tasks.cola.optimizer.lr == 8e-5
    with pytest.raises(ValueError, match="unknown GLUE variant"):
        glue_config.get_config("bert_huge")
