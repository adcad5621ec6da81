"""Optimizer parameter groups (m2jax/optim.py): groups come from the parameter types the filters
create (FilterGroupParam, FilterPositionParam), and each group steps with its own lr and decay."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m2jax
from m2jax.filters import FilterGroupParam, FilterPositionParam
from m2jax.optim import OptimizerConfig, make_optimizer, param_group_labels

MODELS = (
    m2jax.M2BertForMaskedLM,
    m2jax.M2BertForSequenceClassification,
    m2jax.M2BertForTextEncoding,
)

# The "filter_groups" labels the path regexes (_FILTER_GROUP, _Z_GROUP, deleted) gave, recorded from
# that code before it was removed; every other parameter was "default". Every layer `*` is the same.
OLD_REGEX_GROUPS = {
    f"/bert/layers/*/attention/{fs}/{name}": group
    for fs in ("filter_fn", "filter_fn2")
    for name, group in [
        ("freq", "filter"),
        ("mlp_fwd/0/bias", "filter"),
        ("mlp_fwd/0/kernel", "filter"),
        ("mlp_fwd/1/bias", "filter"),
        ("mlp_fwd/1/kernel", "filter"),
        ("mlp_fwd/2/bias", "filter"),
        ("mlp_fwd/2/kernel", "filter"),
        ("mlp_fwd/3/kernel", "filter"),
        ("z", "z"),
    ]
}


def _labels(tree) -> dict:
    """{'/bert/layers/*/...': label}, with layer indices replaced by `*`."""
    out = {}
    for path, label in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [
            str(getattr(k, "key", k)) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)
        ]
        name = re.sub(r"/layers/\d+/", "/layers/*/", "/" + "/".join(keys))
        assert out.setdefault(name, label) == label, name
    return out


@pytest.mark.parametrize(
    "overrides",
    [{}, {"bidirectional": False, "residual_long_conv": False}],
    ids=["full", "minimal"],
)
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_group_labels_equal_what_the_path_regexes_gave(model_cls, overrides):
    model = m2jax.abstract_model(model_cls, m2jax.get_model_config("tiny", **overrides))
    params = nnx.state(model, nnx.Param)
    labels = _labels(param_group_labels(params, "filter_groups"))
    assert labels == {name: OLD_REGEX_GROUPS.get(name, "default") for name in labels}
    assert {"filter", "z", "default"} == set(labels.values())
    if not overrides:
        assert set(OLD_REGEX_GROUPS) <= set(labels)
    assert set(_labels(param_group_labels(params, "single")).values()) == {"default"}


def test_group_types_are_params_for_every_param_filter():
    model = m2jax.abstract_model(m2jax.M2BertForMaskedLM, m2jax.get_model_config("tiny"))
    params = nnx.state(model, nnx.Param)
    kinds = {
        type(v) for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    }
    assert kinds == {nnx.Param, FilterGroupParam, FilterPositionParam}
    assert len(jax.tree.leaves(nnx.state(model, FilterGroupParam))) == 2 * 2 * 8  # layers x sets
    assert len(jax.tree.leaves(nnx.state(model, FilterPositionParam))) == 2 * 2


def test_filter_groups_need_the_typed_parameter_state():
    with pytest.raises(ValueError, match="found no filter parameters"):
        param_group_labels({"w": jnp.zeros(3)}, "filter_groups")
    with pytest.raises(ValueError, match="'single' or 'filter_groups'"):
        param_group_labels({"w": jnp.zeros(3)}, "filters")
    assert param_group_labels({"w": jnp.zeros(3)}, "single") == {"w": "default"}


@pytest.mark.parametrize("name", ["decoupled", "adamw"])
def test_each_group_steps_with_its_own_learning_rate_and_weight_decay(name):
    cfg = OptimizerConfig(
        name=name,
        lr=1e-3,
        weight_decay=0.5,
        filter_lr=1e-2,
        filter_weight_decay=0.25,
        z_lr=1e-5,
        z_weight_decay=2.0,
        clip_norm=None,
        total_steps=4,
        warmup_fraction=0.25,  # lr 0 at step 0, the peak from step 1 on
        final_lr_fraction=1.0,
        param_groups="filter_groups",
    )
    model = m2jax.abstract_model(m2jax.M2BertForMaskedLM, m2jax.get_model_config("tiny"))
    # One filter set holds all three groups (and compiles faster than the whole model).
    filters = nnx.state(model.bert.layers[0].attention.filter_fn, nnx.Param)
    params = jax.tree.map(lambda x: jnp.full(x.shape, 2.0, x.dtype), filters)
    tx = make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, opt_state = update(grads, opt_state, params)
    # Constant gradients: Adam's bias-corrected step is exactly 1 per weight (eps aside).
    group = {"default": (1e-3, 0.5), "filter": (1e-2, 0.25), "z": (1e-5, 2.0)}
    moved = {"default": 0, "filter": 0, "z": 0}
    labels = param_group_labels(params, "filter_groups")
    for label, u in zip(jax.tree.leaves(labels), jax.tree.leaves(updates)):
        lr, wd = group[label]
        # decoupled: lr_t * adam + wd * (lr_t / lr_peak) * p; torch AdamW: lr_t * (adam + wd * p)
        step = lr + wd * 2.0 if name == "decoupled" else lr * (1.0 + wd * 2.0)
        np.testing.assert_allclose(u, -step, rtol=1e-5)
        moved[label] += 1
    # 7 forward-MLP weights + freq; z; D and the 7 reverse-MLP weights in the default group.
    assert moved == {"filter": 8, "z": 1, "default": 8}
