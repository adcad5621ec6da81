"""Range checks of every config value, run before anything is built or compiled.

Each problem names its field (`config.checkpoint.every: must be an integer >= 1, got 0`); all of
them are reported at once, as one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from m2jax.optim import OptimizerConfig
from m2jax.sharding import MESH_AXES
from m2jax.train.errors import ConfigError

_OPTIMIZER_FIELDS = {f.name for f in dataclasses.fields(OptimizerConfig)} - {"total_steps"}


class _Checks:
    """Collects problems of one config, each as `config.<field>: <what is wrong>`."""

    def __init__(self, config: Any):
        self.config, self.problems = config, []

    def value(self, name: str) -> Any:
        node = self.config
        for part in name.split("."):
            node = node[part]
        return node

    def require(self, name: str, ok: Callable[[Any], bool], expected: str) -> None:
        try:
            value = self.value(name)
        except (KeyError, AttributeError):
            self.problems.append(f"config.{name}: missing (expected {expected})")
            return
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            self.problems.append(f"config.{name}: must be {expected}, got {value!r}")

    def integer(self, name: str, minimum: int) -> None:
        self.require(name, lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")

    def number(
        self,
        name: str,
        low: float,
        high: float,
        *,
        open_low=False,
        open_high=False,
        optional: bool = False,
    ) -> None:
        def ok(v):
            if v is None:
                return optional
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return False
            return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        self.require(name, ok, f"a number in {interval}" + (" or None" if optional else ""))

    def boolean(self, name: str) -> None:
        self.require(name, lambda v: isinstance(v, bool), "True or False")

    def text(self, name: str, *, empty: bool = True) -> None:
        self.require(
            name,
            lambda v: isinstance(v, str) and (empty or bool(v)),
            "a string" if empty else "a non-empty string",
        )

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(self.problems))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _common(c: _Checks) -> None:
    c.integer("accum_steps", 1)
    c.integer("log_every", 1)
    c.integer("eval_every", 0)
    c.integer("checkpoint.every", 1)
    c.integer("checkpoint.keep", 1)
    c.boolean("checkpoint.async_save")
    c.boolean("export_final")
    c.boolean("tensorboard")
    c.text("init_from")
    c.text("long_conv_on_sharded_cpu")
    _mesh(c)
    _axis_rules(c)
    _optimizer(c, "optimizer")


def _mesh(c: _Checks) -> None:
    mesh = c.value("mesh")
    if set(mesh) != set(MESH_AXES):
        c.problems.append(
            f"config.mesh: needs exactly the axes {list(MESH_AXES)}, got {dict(mesh)}"
        )
        return
    for axis in MESH_AXES:
        c.require(
            f"mesh.{axis}",
            lambda v: _is_int(v) and (v >= 1 or v == -1),
            "an integer >= 1, or -1 (the rest of the devices)",
        )
    if list(mesh.values()).count(-1) > 1:
        c.problems.append(f"config.mesh: at most one axis may be -1, got {dict(mesh)}")


def _axis_rules(c: _Checks) -> None:
    def ok(rules):
        return all(
            len(pair) == 2
            and isinstance(pair[0], str)
            and (pair[1] is None or pair[1] in MESH_AXES)
            for pair in rules
        )

    c.require("axis_rules", ok, f"pairs (logical axis, one of {list(MESH_AXES)} or None)")


def _optimizer(c: _Checks, name: str) -> None:
    fields = set(c.value(name))
    unknown = sorted(fields - _OPTIMIZER_FIELDS)
    if unknown:
        c.problems.append(
            f"config.{name}: unknown fields {unknown}; the fields: " f"{sorted(_OPTIMIZER_FIELDS)}"
        )
    checks = {
        "name": lambda n: c.text(n, empty=False),
        "lr": lambda n: c.number(n, 0, math.inf, open_low=True, open_high=True),
        "b1": lambda n: c.number(n, 0, 1, open_high=True),
        "b2": lambda n: c.number(n, 0, 1, open_high=True),
        "eps": lambda n: c.number(n, 0, math.inf, open_low=True, open_high=True),
        "weight_decay": lambda n: c.number(n, 0, math.inf, open_high=True),
        "clip_norm": lambda n: c.number(
            n, 0, math.inf, open_low=True, open_high=True, optional=True
        ),
        "warmup_fraction": lambda n: c.number(n, 0, 1),
        "final_lr_fraction": lambda n: c.number(n, 0, 1),
        "param_groups": lambda n: c.text(n, empty=False),
        "filter_lr": lambda n: c.number(n, 0, math.inf, open_low=True, open_high=True),
        "filter_weight_decay": lambda n: c.number(n, 0, math.inf, open_high=True),
        "z_lr": lambda n: c.number(n, 0, math.inf, open_low=True, open_high=True),
        "z_weight_decay": lambda n: c.number(n, 0, math.inf, open_high=True),
    }
    for field, check in checks.items():
        if field in fields:
            check(f"{name}.{field}")


def _data_source(c: _Checks, name: str, kinds: tuple[str, ...], *, allow_empty=False) -> None:
    def ok(v):
        if v == "" and allow_empty:
            return True
        kind, sep, arg = v.partition(":")
        return v in kinds or (kind + ":" in kinds and bool(sep and arg))

    c.require(
        name,
        ok,
        "one of "
        + ", ".join(f"'{k}<...>'" if k.endswith(":") else f"'{k}'" for k in kinds)
        + (" or ''" if allow_empty else ""),
    )


def check_pretraining_config(config: Any) -> None:
    """Raises ConfigError naming every out-of-range field of a configs/pretrain.py config."""
    c = _Checks(config)
    _common(c)
    c.integer("seed", 0)
    c.integer("global_batch_size", 1)
    c.integer("total_steps", 1)
    c.integer("eval_steps", 0)
    _data_source(c, "data.source", ("tfds:", "files:", "embedded"))
    _data_source(c, "data.eval_source", ("tfds:", "files:", "embedded"), allow_empty=True)
    c.text("data.data_dir")
    c.text("data.text_field", empty=False)
    c.text("data.train_split", empty=False)
    c.text("data.eval_split", empty=False)
    c.number("data.mlm_probability", 0, 1, open_low=True)
    c.number("data.eval_mlm_probability", 0, 1, open_low=True)
    c.boolean("data.shuffle")
    c.boolean("data.packing")
    c.integer("data.num_threads", 0)
    c.integer("data.prefetch_batches", 0)
    if not c.problems:
        if config.global_batch_size % config.accum_steps:
            c.problems.append(
                f"config.accum_steps: {config.accum_steps} microbatches do not divide "
                f"config.global_batch_size {config.global_batch_size}"
            )
        evaluating = config.eval_steps > 0
        if evaluating and config.data.source.startswith("files:") and not config.data.eval_source:
            c.problems.append(
                "config.data.eval_source: empty, but config.data.source "
                f"{config.data.source!r} has no '{config.data.eval_split}' split to evaluate on: "
                "set config.data.eval_source='files:<held-out glob>', or config.eval_steps=0"
            )
    c.raise_if_any()


def check_glue_config(config: Any) -> None:
    """Raises ConfigError naming every out-of-range field of a configs/glue.py config."""
    from m2jax.data.glue_tasks import GLUE_TASKS

    c = _Checks(config)
    _common(c)
    c.integer("eval_batch_size", 1)
    c.integer("max_steps", 0)
    _data_source(c, "data.source", ("tfds", "tsv:", "embedded"))
    c.text("data.data_dir")
    c.boolean("data.shuffle")
    if not config.init_from:
        c.problems.append(
            "config.init_from is empty: GLUE fine-tuning starts from pretrained weights; set "
            "--config.init_from to a pretraining work directory, a final/ export or a released "
            "checkpoint, or to 'scratch' to fine-tune a randomly initialised model"
        )
    order = list(config.task_order)
    if not order or len(set(order)) != len(order) or any(t not in config.tasks for t in order):
        c.problems.append(
            f"config.task_order: must list tasks of config.tasks "
            f"({sorted(config.tasks)}) once each, got {order}"
        )
    for task, t in config.tasks.items():
        where = f"tasks.{task}"
        if task.lower().replace("-", "") not in GLUE_TASKS:
            c.problems.append(f"config.{where}: unknown GLUE task; known: {sorted(GLUE_TASKS)}")
        c.integer(f"{where}.epochs", 1)
        c.integer(f"{where}.batch_size", 1)
        c.boolean(f"{where}.pool_all")
        c.require(
            f"{where}.seeds",
            lambda s: len(s) > 0
            and all(_is_int(x) and x >= 0 for x in s)
            and len(set(s)) == len(s),
            "a non-empty list of distinct integers >= 0",
        )
        _optimizer(c, f"{where}.optimizer")
        parent = t.start_from_task
        if parent and task in order:
            if parent not in order or task not in order or order.index(parent) > order.index(task):
                c.problems.append(
                    f"config.{where}.start_from_task: {parent!r} must be a task "
                    f"run before {task!r} in config.task_order {order}"
                )
            elif not config.export_final:
                c.problems.append(
                    f"config.export_final: False, but {task} starts from "
                    f"{parent}'s exported model"
                )
        if (
            _is_int(t.batch_size)
            and _is_int(config.accum_steps)
            and config.accum_steps >= 1
            and t.batch_size % config.accum_steps
        ):
            c.problems.append(
                f"config.accum_steps: {config.accum_steps} microbatches do not "
                f"divide config.{where}.batch_size {t.batch_size}"
            )
    c.raise_if_any()


def check_batch_fits(name: str, batch_size: int, mesh: Any, process_count: int) -> None:
    """Rows of a global batch must split evenly over the hosts and the batch's mesh axes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for parts, what in ((process_count, "processes"), (shards, "batch shards (data x fsdp)")):
        if batch_size % parts:
            raise ConfigError(
                f"config.{name}: {batch_size} rows do not split over the "
                f"{parts} {what} of this run"
            )
