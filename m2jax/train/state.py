"""The sharded train state: where parameters, optimizer moments and constants live on the mesh.

`param_shardings` is the one place that decides a parameter's sharding; the mesh and the rules
come from the config (`config.mesh`, `config.axis_rules`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2jax import sharding as shd
from m2jax.train.errors import ConfigError
from m2jax.train.step import TrainState

AxisRules = Sequence[tuple[str, str | None]]


def param_shardings(tree: Any, mesh: jax.sharding.Mesh, axis_rules: AxisRules | None) -> Any:
    """NamedSharding of every leaf of a model state (params or constants) on `mesh`, from the
    logical axes each parameter declares and the rules `axis_rules` (`config.axis_rules`:
    logical axis -> mesh axis or None; None: m2jax.sharding.DEFAULT_AXIS_RULES)."""
    rules = shd.DEFAULT_AXIS_RULES if axis_rules is None else tuple(map(tuple, axis_rules))
    try:
        return shd.state_shardings(tree, mesh, rules=rules)
    except ValueError as e:  # an unknown logical axis or mesh axis in the rules
        raise ConfigError(f"config.axis_rules: {e}") from None


def create_train_state(
    params: nnx.State,
    consts: nnx.State,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    axis_rules: AxisRules | None,
    seed: int,
) -> tuple[TrainState, TrainState, nnx.State]:
    """(state, its shardings, the constants placed on the mesh) for `params` and optimizer `tx`.

    Optimizer moments are laid out like their parameters; counters and the rng are replicated.
    The inputs are not changed: the state holds new, sharded copies."""
    shardings = param_shardings(params, mesh, axis_rules)
    params = jax.device_put(params, shardings)
    consts = jax.device_put(consts, param_shardings(consts, mesh, axis_rules))
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        shardings,
        transform_non_params=lambda _: shd.replicated(mesh),
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state_shardings = TrainState(
        step=shd.replicated(mesh),
        params=shardings,
        opt_state=opt_shardings,
        rng=shd.replicated(mesh),
    )
    state = jax.device_put(
        TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=jax.random.PRNGKey(seed),
        ),
        state_shardings,
    )
    return state, state_shardings, consts


def abstract_state(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `state`: the target a checkpoint is restored into."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
