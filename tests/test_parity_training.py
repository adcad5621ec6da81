"""Training fidelity against golden files made by the PyTorch reference (tests/fixtures/README.md):
gradients of the training losses with [PAD] tokens in the batch, and optimizer steps.

The weights come from `parity_recipe.perturb_state_dict` (as in test_parity.py); the gradients
are taken through m2jax's own training step (`make_train_step`), so the losses, the model's
backward pass and the [PAD] row rule are all judged together.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import m2jax
from m2jax.torch_names import torch_layout
from m2jax.train_step import TrainState, make_train_step
from parity_weights import load_parity_model, rel_l2

# Relative L2 per parameter. The criterion is 1e-4; the reference's own float32-vs-float64 noise
# on these gradients is at most 5.6e-6 (written in each golden file).
GRAD_TOLERANCE = 1e-4
WORD = "bert.embeddings.word_embeddings.weight"
# LLVM optimisation level 0 halves XLA:CPU's compile time of a training step (~3 s -> ~1.5 s);
# the computation is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _keep_gradients() -> optax.GradientTransformation:
    """An 'optimizer' whose state is the last gradient it was given and that moves nothing."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (
            jax.tree_util.tree_map(jnp.zeros_like, grads),
            grads,
        ),
    )


def _train_step_gradients(model, golden, task):
    """(gradients as the reference's state-dict arrays, step metrics) of one m2jax train step."""
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    tx = _keep_gradients()
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(golden[k]) for k in
             ("input_ids", "token_type_ids", "attention_mask", "labels")}
    step = jax.jit(make_train_step(graphdef, consts, tx, task)).lower(state, batch)
    state, metrics = step.compile(compiler_options=FAST_COMPILE)(state, batch)
    grads = state.opt_state
    n_values = sum(int(np.prod(g.shape)) for g in jax.tree_util.tree_leaves(grads))
    nnx.update(model, grads)  # the model now holds its gradients: read them by torch name
    layout = torch_layout(model)
    return {k: layout[k].to_torch() for k in layout}, metrics, n_values


@pytest.mark.parametrize(
    "name, model_cls, task",
    [
        ("grad_mlm_additions", m2jax.M2BertForMaskedLM, "mlm"),
        ("grad_cls_first", m2jax.M2BertForSequenceClassification, "classification"),
        ("grad_cls_mean", m2jax.M2BertForSequenceClassification, "classification"),
    ],
)
def test_gradients_with_padding_match_reference(name, model_cls, task):
    model, golden = load_parity_model(name, model_cls)
    assert (golden["input_ids"] == model.config.pad_token_id).sum() == 40
    assert len(np.unique(golden["token_type_ids"])) == 2
    ours, metrics, n_values = _train_step_gradients(model, golden, task)
    reference = {k[len("grad."):]: golden[k] for k in golden.files if k.startswith("grad.")}
    # Every parameter is judged: the reference's unique Parameters hold as many values as ours.
    assert n_values == sum(g.size for g in reference.values())
    errors = {k: rel_l2(ours[k], g) for k, g in reference.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_TOLERANCE, f"{worst}: rel L2 {errors[worst]:.2e}"
    np.testing.assert_allclose(metrics["loss"], golden["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], golden["grad_global_norm"], rtol=1e-5)
    if task == "classification":
        # Only lookups reach the word embeddings, and [PAD]'s row takes none (padding_idx).
        assert not np.any(reference[WORD][0]) and not np.any(ours[WORD][0])
    else:
        # The tied decoder still trains the [PAD] row.
        assert np.linalg.norm(ours[WORD][0]) > 1e-3
