"""Optimizers and learning-rate schedules of the M2-BERT recipes (spec sections 0 and 5).

Two AdamW variants are used by the reference:
- "decoupled" (Composer's DecoupledAdamW, pretraining and some GLUE tasks): the decay is scaled by
  the schedule but not by the learning rate, `p -= lr_t * adam(g) + wd * (lr_t / lr_peak) * p`.
- "adamw" (torch AdamW, the other GLUE tasks): `p -= lr_t * (adam(g) + wd * p)` (optax.adamw).

Parameter groups: the reference's yaml intends the implicit filters to train with their own lr and
weight decay, but its deepcopy dropped those settings, so the released models used one group
(spec section 0). `param_groups="single"` reproduces what was run; `"filter_groups"` the intent.
The groups are declared by parameter type where the filters create their parameters
(`m2jax.filters.FilterGroupParam`, `FilterPositionParam`), not found by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from m2jax.filters import FilterGroupParam, FilterPositionParam


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything `make_optimizer` needs; the trainer's ml_collections config maps onto it."""

    name: str = "decoupled"  # "decoupled" (Composer DecoupledAdamW) or "adamw" (torch AdamW)
    lr: float = 8e-4  # peak learning rate
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 1e-5
    clip_norm: float | None = 1.0  # global-norm clipping; None for none
    total_steps: int = 70_000
    warmup_fraction: float = 0.06  # linear warmup over this fraction of total_steps
    final_lr_fraction: float = 0.02  # linear decay to this fraction of the peak
    param_groups: str = "single"  # "single" or "filter_groups"
    filter_lr: float = 1e-3  # "filter_groups": forward filter MLPs and freq
    filter_weight_decay: float = 0.1
    z_lr: float = 1e-5  # "filter_groups": the filters' positional input z
    z_weight_decay: float = 0.0


def warmup_linear_decay(
    peak: float, total_steps: int, warmup_fraction: float, final_fraction: float
) -> optax.Schedule:
    """Linear 0 -> peak over `warmup_fraction * total_steps`, then linear to `final_fraction * peak`
    at `total_steps` (Composer's LinearWithWarmupScheduler with alpha_f = final_fraction)."""
    # Composer truncates a fraction of the duration to whole steps; with 0 warmup steps (also
    # HF's linear schedule) step 0 already runs at the peak rate.
    warmup = int(warmup_fraction * total_steps)
    decay = optax.linear_schedule(peak, final_fraction * peak, max(1, total_steps - warmup))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


# Parameter type -> its group under "filter_groups"; every other parameter is "default".
GROUP_OF_PARAM_TYPE: tuple[tuple[type[nnx.Param], str], ...] = (
    (FilterGroupParam, "filter"),
    (FilterPositionParam, "z"),
)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_group_labels(params: Any, mode: str) -> Any:
    """A pytree like `params` holding each parameter's group: "default", "filter" or "z".

    `params` is the model's `nnx.State` of parameters (or a tree of the same Variables, such as
    the optimizer's); in "filter_groups" mode the groups come from the parameter types, so a tree
    of bare arrays, which has lost them, is an error rather than one silent group.
    """
    if mode not in ("single", "filter_groups"):
        raise ValueError(f"param_groups must be 'single' or 'filter_groups', got {mode!r}")

    def group(x: Any) -> str:
        if mode == "filter_groups":
            for param_type, name in GROUP_OF_PARAM_TYPE:
                if isinstance(x, param_type):
                    return name
        return "default"

    def label(x: Any) -> Any:
        return x.replace(group(x)) if _is_variable(x) else group(x)

    labels = jax.tree_util.tree_map(label, params, is_leaf=_is_variable)
    if mode == "filter_groups" and "filter" not in jax.tree_util.tree_leaves(labels):
        raise ValueError(
            "param_groups='filter_groups' found no filter parameters: pass the model's "
            "parameters as an nnx.State (`nnx.state(model, nnx.Param)`), whose Variable types "
            "mark the groups"
        )
    return labels


def _adam_variant(
    cfg: OptimizerConfig, lr: float, weight_decay: float
) -> optax.GradientTransformation:
    schedule = warmup_linear_decay(lr, cfg.total_steps, cfg.warmup_fraction, cfg.final_lr_fraction)
    if cfg.name == "decoupled":
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(weight_decay / lr if lr else 0.0),
            optax.scale_by_learning_rate(schedule),
        )
    if cfg.name == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer name must be 'decoupled' or 'adamw', got {cfg.name!r}")


def make_optimizer(cfg: OptimizerConfig, params: nnx.State) -> optax.GradientTransformation:
    """Clipping, then the AdamW variant per parameter group (see module docstring)."""
    groups = {"default": _adam_variant(cfg, cfg.lr, cfg.weight_decay)}
    if cfg.param_groups == "filter_groups":
        groups["filter"] = _adam_variant(cfg, cfg.filter_lr, cfg.filter_weight_decay)
        groups["z"] = _adam_variant(cfg, cfg.z_lr, cfg.z_weight_decay)
    labels = param_group_labels(params, cfg.param_groups)
    tx = optax.multi_transform(groups, labels)
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def learning_rate_at(cfg: OptimizerConfig, step: int) -> float:
    """The default group's learning rate at `step` (for logging)."""
    return float(
        warmup_linear_decay(cfg.lr, cfg.total_steps, cfg.warmup_fraction, cfg.final_lr_fraction)(
            step
        )
    )
