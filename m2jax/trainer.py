"""The training loop for MLM pretraining and GLUE fine-tuning.

The loop only moves data, logs and saves: the math is `train_step.make_train_step`, jitted once
with explicit shardings from `sharding.py`; checkpoints go through `checkpointing.Checkpointer`.
Config fields are documented in `configs/pretrain.py` and `configs/glue.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m2jax import sharding as shd
from m2jax.checkpointing import Checkpointer
from m2jax.config import get_model_config
from m2jax.model import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    abstract_model,
    count_params,
)
from m2jax.optim import OptimizerConfig, learning_rate_at, make_optimizer
from m2jax.pretrained import from_pretrained
from m2jax.run_logging import MetricWriter, ProgressLine, training_flops_per_token, write_results
from m2jax.train_step import TrainState, make_eval_step, make_train_step

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels", "example_mask")


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; the last good checkpoint is kept."""


class StatefulBatches(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class RunSpec:
    """What differs between pretraining and fine-tuning, handed to `train_loop`."""

    task: str  # "mlm" or "classification"
    model: nnx.Module
    train_batches: StatefulBatches
    total_steps: int
    global_batch_size: int
    seq_len: int
    evaluate: Callable[[Callable, Any], dict[str, float]]  # (eval_step, params) -> metrics


def _optimizer_config(config: Any, total_steps: int) -> OptimizerConfig:
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    values = {k: v for k, v in dict(config.optimizer).items() if k in fields}
    unknown = set(dict(config.optimizer)) - fields
    if unknown:
        raise ValueError(f"unknown optimizer config fields: {sorted(unknown)}")
    return OptimizerConfig(**{**values, "total_steps": total_steps})


def _install_sigterm_flag() -> dict:
    flag = {"stop": False}

    def handler(signum, frame):
        logging.warning("signal %d received: saving a checkpoint and stopping", signum)
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return flag


def _check_finite(pending: list[tuple[int, jax.Array]]) -> None:
    for step, loss in pending:
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at step {step}; stopping. The last checkpoint saved "
                "before this step is kept; lower the learning rate or check the data, then resume."
            )
    pending.clear()


def train_loop(config: Any, workdir: str, spec: RunSpec, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Trains `spec.model` to `spec.total_steps`, resuming from `workdir` if it holds checkpoints."""
    os.makedirs(workdir, exist_ok=True)
    graphdef, params, consts = nnx.split(spec.model, nnx.Param, ...)
    opt_cfg = _optimizer_config(config, spec.total_steps)
    tx = make_optimizer(opt_cfg, params)

    param_shardings = shd.state_shardings(params, mesh)
    const_shardings = shd.state_shardings(consts, mesh)
    params = jax.device_put(params, param_shardings)
    consts = jax.device_put(consts, const_shardings)
    # Optimizer moments are laid out like their parameters; counters are replicated.
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        transform_non_params=lambda _: shd.replicated(mesh),
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state_shardings = TrainState(
        step=shd.replicated(mesh),
        params=param_shardings,
        opt_state=opt_shardings,
        rng=shd.replicated(mesh),
    )
    state = jax.device_put(
        TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=jax.random.PRNGKey(config.seed),
        ),
        state_shardings,
    )

    step_fn = make_train_step(graphdef, consts, tx, spec.task, config.accum_steps)
    batch_shardings = {k: shd.batch_sharding(mesh) for k in BATCH_KEYS}
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(graphdef, consts, spec.task))

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    try:
        # A checkpoint that does not fit this config raises (CheckpointMismatchError) rather
        # than restarting the run from step 0 over it.
        restored = ckpt.restore_latest(abstract)
    except Exception:
        ckpt.close()
        raise
    if restored is not None:
        start, state, data_state = restored
        spec.train_batches.set_state(data_state)
        logging.info("resumed from step %d in %s", start, workdir)
        print(f"resumed from step {start}", flush=True)

    writer = MetricWriter(workdir)
    n_params = count_params(spec.model)
    progress = ProgressLine(
        spec.total_steps,
        spec.global_batch_size * spec.seq_len,
        training_flops_per_token(spec.model, spec.seq_len, spec.global_batch_size),
    )
    stop = _install_sigterm_flag()
    pending: list[tuple[int, jax.Array]] = []
    history: list[dict[str, float]] = []
    eval_history: list[dict[str, float]] = []
    step = int(state.step)
    status = "completed"
    t0 = time.perf_counter()
    try:
        while step < spec.total_steps:
            local = next(spec.train_batches)
            if "example_mask" not in local:
                local = {**local, "example_mask": np.ones(len(local["input_ids"]), np.int32)}
            batch = shd.global_batch({k: local[k] for k in BATCH_KEYS}, mesh)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics["loss"]))
            last = step == spec.total_steps
            if step % config.log_every == 0 or last:
                _check_finite(pending)
                scalars = {k: float(v) for k, v in metrics.items()}
                scalars.update(
                    progress.update(step, scalars["loss"], learning_rate_at(opt_cfg, step - 1))
                )
                writer.write(step, scalars)
                history.append({"step": step, **scalars})
            if config.eval_steps and (
                last or (config.eval_every and step % config.eval_every == 0)
            ):
                ev = spec.evaluate(eval_step, state.params)
                writer.write(step, {f"eval_{k}": v for k, v in ev.items()})
                eval_history.append({"step": step, **ev})
                print(
                    f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                    flush=True,
                )
            preempted = stop["stop"] or ckpt.reached_preemption(step)
            if step % config.checkpoint.every == 0 or last or preempted:
                _check_finite(pending)
                ckpt.save(step, state, spec.train_batches.get_state(), force=True)
            if preempted and not last:
                status = "preempted"
                break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    results = {
        "status": status,
        "step": step,
        "total_steps": spec.total_steps,
        "task": spec.task,
        "num_params": n_params,
        "train": history,
        "eval": eval_history,
        "final_eval": eval_history[-1] if eval_history else None,
        "wall_seconds": time.perf_counter() - t0,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
    }
    write_results(workdir, results)
    spec.model = nnx.merge(graphdef, state.params, consts)
    return results


# ---------------------------------------------------------------------------------------------
# Model construction and initialisation.

# `init_from` value that asks for a random initialisation explicitly (GLUE requires init_from;
# pretraining also takes "" for it).
FROM_SCRATCH = "scratch"


def _check_model_name(model: Any) -> None:
    """Recipes list every field under `model.overrides`, filled from the model named when the
    config was made (`recipes.model_section`): changing `model.name` alone would change nothing."""
    filled_from = model.get("overrides_from") or model.name
    if model.name != filled_from:
        raise ValueError(
            f"config.model.name is {model.name!r} but config.model.overrides lists every field "
            f"of {filled_from!r}, so the name would be ignored: pick the recipe variant of "
            f"{model.name!r}, or change the fields themselves (--config.model.overrides.<field>)"
        )


def build_model(
    config: Any, task: str, mesh: jax.sharding.Mesh | None = None, **model_overrides: Any
) -> nnx.Module:
    """A fresh model from the config's named model and overrides, or initialised from
    `config.init_from` (a checkpoint directory or weights file that `from_pretrained` reads;
    "" or "scratch": a random initialisation)."""
    _check_model_name(config.model)
    overrides = {**dict(config.model.overrides), **model_overrides}
    if (
        mesh is not None
        and jax.default_backend() == "cpu"
        and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1
        and overrides.get("long_conv_implementation", "auto") in ("auto", "xla_fft")
    ):
        # XLA:CPU's FFT rejects the operand layouts that fsdp/tensor partitioning produces
        # (RET_CHECK in fft_thunk.cc); the Monarch-DFT path is all matmuls and gives the same
        # numbers (tests/test_long_conv.py), so CPU model-parallel runs use it.
        logging.warning("CPU mesh with fsdp/tensor axes: using the 'xla_monarch' long convolution")
        overrides["long_conv_implementation"] = "xla_monarch"
    cfg = get_model_config(config.model.name, **overrides)
    cls = M2BertForMaskedLM if task == "mlm" else M2BertForSequenceClassification
    model = cls(cfg, rngs=nnx.Rngs(config.seed))
    init_from = config.get("init_from") or FROM_SCRATCH
    if init_from != FROM_SCRATCH:
        copy_encoder(load_init_source(init_from, cfg), model)
    return model


def load_init_source(path: str, cfg: Any) -> nnx.Module:
    """The model to initialise from: an m2jax work directory (its newest readable orbax
    checkpoint), or anything `from_pretrained` reads (a `final/` export, a released checkpoint)."""
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        return from_pretrained(path, dtype=cfg.dtype)
    found = Checkpointer(
        os.path.join(path, "checkpoints"), save_every=1, keep=1, async_save=False
    ).restore_latest_params()
    if found is None:
        raise ValueError(f"{path} is a work directory without a readable checkpoint")
    step, raw = found
    pure = _pure_dict(raw)
    if "cls" in pure:
        source = abstract_model(M2BertForMaskedLM, cfg)
    else:
        num_labels = pure["classifier"]["kernel"].shape[-1]
        source = abstract_model(M2BertForSequenceClassification, cfg.replace(num_labels=num_labels))
    params = nnx.state(source, nnx.Param)
    try:
        nnx.replace_by_pure_dict(params, pure)
    except (KeyError, ValueError) as e:
        raise ValueError(f"checkpoint in {path} does not fit the configured model: {e}") from None
    nnx.update(source, params)
    logging.info("initialising from %s, step %d", path, step)
    return source


def _pure_dict(tree: Any) -> Any:
    """orbax's restored nnx.State (`{..., 'kernel': {'value': array}}`, list indices as strings)
    as an nnx pure dict (`{..., 'kernel': array}`, integer list indices)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {int(k) if str(k).isdigit() else k: _pure_dict(v) for k, v in tree.items()}
    return tree


def copy_encoder(source: nnx.Module, target: nnx.Module) -> None:
    """Copies embeddings and layers (and the pooler when both have one); heads stay as built.

    Used to start fine-tuning from a pretrained MLM model, or from another task's fine-tuned
    model (MNLI -> RTE/MRPC/STS-B), whose classifier has a different number of labels.
    """
    src, dst = source.bert, target.bert
    problems = [
        f"{name}: {getattr(src.cfg, name)} != {getattr(dst.cfg, name)}"
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "vocab_size",
            "max_position_embeddings",
            "hyena_filter_order",
            "hyena_training_additions",
            "residual_long_conv",
        )
        if getattr(src.cfg, name) != getattr(dst.cfg, name)
    ]
    if problems:
        raise ValueError(
            "cannot initialise from a checkpoint of another architecture: " + "; ".join(problems)
        )
    # Params only: the constants (t, deltas) are the same closed forms in both models.
    nnx.update(dst.embeddings, nnx.state(src.embeddings, nnx.Param))
    nnx.update(dst.layers, nnx.state(src.layers, nnx.Param))
    if src.pooler is not None and dst.pooler is not None:
        nnx.update(dst.pooler, nnx.state(src.pooler, nnx.Param))


# Environment variables of the launchers whose settings `jax.distributed.initialize()` reads
# itself (its cluster auto-detection).
CLUSTER_ENV_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "TPU_WORKER_HOSTNAMES",
    "OMPI_COMM_WORLD_SIZE",
)


def check_distributed_args(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Raises ValueError naming the problem unless the three settings are all unset (one process,
    or the cluster environment) or all set and consistent."""
    given = {
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if len(missing) == len(given):
        return
    if missing:
        raise ValueError(
            f"{', '.join(missing)} missing: joining a multi-process run by flags needs all of "
            "--coordinator_address, --num_processes and --process_id (or none of them on "
            "SLURM, TPU pods or Open MPI, whose environment jax.distributed reads)"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address must be host:port, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
            f"got {process_id}"
        )


def init_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """`jax.distributed.initialize` when this is one of several processes (all three settings
    given, or the usual cluster environment variables); a no-op for a single process. Returns
    whether it initialised."""
    check_distributed_args(coordinator, num_processes, process_id)
    if coordinator is not None:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
        return True
    if any(v in os.environ for v in CLUSTER_ENV_VARS):
        jax.distributed.initialize()
        return True
    return False


class EpochBatches:
    """Endless batches from `make_epoch(epoch)`, checkpointable as (epoch, index in epoch)."""

    def __init__(self, make_epoch: Callable[[int], Iterator[dict]]):
        self._make_epoch = make_epoch
        self._epoch, self._index = 0, 0
        self._it = make_epoch(0)

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            try:
                batch = next(self._it)
                self._index += 1
                return batch
            except StopIteration:
                self._epoch, self._index = self._epoch + 1, 0
                self._it = self._make_epoch(self._epoch)

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: dict) -> None:
        self._epoch, self._index = int(state["epoch"]), 0
        self._it = self._make_epoch(self._epoch)
        for _ in range(int(state["index"])):
            next(self._it)
        self._index = int(state["index"])
