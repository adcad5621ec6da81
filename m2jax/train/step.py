"""Pure training and evaluation steps over an M2-BERT model split into (graphdef, params, consts).

`train_step(state, batch) -> (state, metrics)` is what the loop jits once with explicit
shardings. Gradient accumulation scans over microbatches, summing per-token (MLM) or per-example
(classification) losses and their counts, so the result equals one step on the whole batch. A
step whose loss or gradient is not finite is not applied: the state comes back unchanged and
`metrics["finite"]` is False, which the loop turns into an error before anything is saved.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2jax.losses import mlm_loss

Batch = dict[str, jax.Array]
# What a batch holds; `example_mask` (1 real row, 0 padding) only classification batches need.
BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels", "example_mask")
TASKS = ("mlm", "classification")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue a run exactly."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's Params
    opt_state: Any
    rng: jax.Array  # uint32 (2,): raw dropout key; per-step keys are folded in


def _forward(model: nnx.Module, batch: Batch, rng: jax.Array | None) -> jax.Array:
    return model(
        batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], dropout_rng=rng
    )


def _loss_sum(task: str, logits: jax.Array, batch: Batch) -> tuple:
    """(sum of per-item losses, number of items, number correct) for one microbatch."""
    labels = batch["labels"]
    if task == "mlm":
        mean, count = mlm_loss(logits, labels)
        correct = ((jnp.argmax(logits, -1) == labels) & (labels > 0)).sum()
        return mean * count, count, correct.astype(jnp.float32)
    valid = batch.get("example_mask", jnp.ones(labels.shape, jnp.int32)).astype(jnp.float32)
    if logits.shape[-1] == 1:  # regression (STS-B)
        per_item = (logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32)) ** 2
        correct = jnp.zeros((), jnp.float32)
    else:
        valid = valid * (labels >= 0)
        safe = jnp.where(labels >= 0, labels, 0).astype(jnp.int32)
        per_item = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
        correct = ((jnp.argmax(logits, -1) == safe) * valid).sum()
    return (per_item * valid).sum(), valid.sum(), correct


def make_train_step(
    graphdef: nnx.GraphDef,
    consts: nnx.State,
    tx: optax.GradientTransformation,
    task: str,
    accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple]:
    """The pure step `(state, batch) -> (state, metrics)` for `task` ("mlm" or
    "classification") with `accum_steps` microbatches."""
    step = _step_with_consts(graphdef, tx, task, accum_steps)
    return lambda state, batch: step(state, consts, batch)


def _step_with_consts(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, task: str, accum_steps: int
) -> Callable[[TrainState, nnx.State, Batch], tuple]:
    """The step with the model's constants an argument: `(state, consts, batch)`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def micro_grads(params, consts, micro: Batch, rng):
        def f(p):
            model = nnx.merge(graphdef, p, consts)
            total, count, correct = _loss_sum(task, _forward(model, micro, rng), micro)
            return total, (count, correct)

        (total, (count, correct)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, total, count, correct

    def train_step(
        state: TrainState, consts: nnx.State, batch: Batch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        step_key = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            grads, total, count, correct = micro_grads(state.params, consts, batch, step_key)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch
            )

            def body(carry, xs):
                i, mb = xs
                g, t, c, k = micro_grads(state.params, consts, mb, jax.random.fold_in(step_key, i))
                acc_g, acc_t, acc_c, acc_k = carry
                return (
                    jax.tree_util.tree_map(jnp.add, acc_g, g),
                    acc_t + t,
                    acc_c + c,
                    acc_k + k,
                ), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
            (grads, total, count, correct), _ = jax.lax.scan(
                body, init, (jnp.arange(accum_steps), micro)
            )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss, grad_norm = total / denom, optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stepped = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        # A NaN or infinite loss or gradient would poison every parameter through Adam's
        # moments: keep the state as it was (the loop stops the run and saves nothing).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), stepped, state
        )
        metrics = {
            "loss": loss,
            "count": count,
            "accuracy": correct / denom,
            "grad_norm": grad_norm,
            "finite": finite,
        }
        return new_state, metrics

    return train_step


# Compiled steps by (model structure, task, microbatches, what the optimizer and the shardings
# are built from): a GLUE sweep's seeds, or a run resumed in the same process, reuse one.
_COMPILED_STEPS: collections.OrderedDict = collections.OrderedDict()
_MAX_COMPILED_STEPS = 8


def jit_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    task: str,
    accum_steps: int,
    state_shardings: TrainState,
    consts_shardings: Any,
    batch_sharding: jax.sharding.Sharding,
    replicated: jax.sharding.Sharding,
    *,
    cache_key: Any = None,
) -> Callable[[TrainState, nnx.State, Batch], tuple]:
    """The step `(state, consts, batch) -> (state, metrics)` jitted once with explicit
    shardings, the state donated.

    `cache_key` (hashable): everything `tx` and the shardings are built from besides the model
    structure (the OptimizerConfig, the mesh, the axis rules); a later call with the same key
    and an equal `graphdef` returns the step already compiled. None: never cached."""
    key = None if cache_key is None else (graphdef, task, accum_steps, cache_key)
    if key is not None and key in _COMPILED_STEPS:
        _COMPILED_STEPS.move_to_end(key)
        return _COMPILED_STEPS[key]
    step = jax.jit(
        _step_with_consts(graphdef, tx, task, accum_steps),
        in_shardings=(state_shardings, consts_shardings, {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    if key is not None:
        _COMPILED_STEPS[key] = step
        while len(_COMPILED_STEPS) > _MAX_COMPILED_STEPS:
            _COMPILED_STEPS.popitem(last=False)
    return step


def make_eval_step(graphdef: nnx.GraphDef, task: str) -> Callable:
    """`eval_step(params, consts, batch)`: MLM -> loss sum, count, correct; classification ->
    also the logits, for the task metrics computed on the host."""

    def eval_step(params, consts, batch: Batch) -> dict[str, jax.Array]:
        logits = _forward(nnx.merge(graphdef, params, consts), batch, None)
        total, count, correct = _loss_sum(task, logits, batch)
        out = {"loss_sum": total, "count": count, "correct": correct}
        if task != "mlm":
            out["logits"] = logits
        return out

    return eval_step


@functools.cache
def jit_eval_step(graphdef: nnx.GraphDef, task: str) -> Callable:
    """`make_eval_step` jitted, one per (model structure, task): the loop's check of a state
    before saving it and the evaluators share the compiled forward pass."""
    return jax.jit(make_eval_step(graphdef, task))
