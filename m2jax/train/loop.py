"""The training loop: moves batches to the devices, runs the jitted step, logs, evaluates, saves.

    results, model = train_loop(model, batches, optimizer, evaluator, settings, mesh)

Plain inputs, nothing called back: `model` (an nnx module, not changed: the trained one is
returned), `batches` (a grain iterator of host-local batches, checkpointed with the state),
`optimizer` (an `OptimizerConfig`), `evaluator` (an object with `evaluate(params)`, or None),
`settings` (`LoopSettings`, plain data) and the device mesh. The run resumes from the newest
checkpoint in `settings.workdir`; results.json records every attempt (m2jax/train/results.py).

Guarantees (docs/training.md): a step with a NaN or infinite loss or gradient is not applied and
stops the run with `NonFiniteError` naming it; a state is saved only after its loss on the step's
batch was checked finite, so the newest checkpoint always resumes cleanly; a save that fails
stops the run at once (`WorkdirError`); SIGTERM or an orbax preemption notice saves and returns
with status "preempted".
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx

from m2jax import sharding as shd
from m2jax.model import count_params
from m2jax.optim import OptimizerConfig, learning_rate_at, make_optimizer
from m2jax.train import workdir as wd
from m2jax.train.checkpointing import Checkpointer
from m2jax.train.console import ProgressLine, format_metrics, say
from m2jax.train.errors import NonFiniteError, WorkdirError
from m2jax.train.evaluators import Evaluator
from m2jax.train.flops import training_flops_per_token
from m2jax.train.results import MetricWriter, RunRecord
from m2jax.train.state import abstract_state, create_train_state
from m2jax.train.step import BATCH_KEYS, jit_eval_step, jit_train_step


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know besides the model, data, optimizer and evaluator."""

    workdir: epath.Path
    task: str  # "mlm" or "classification"
    total_steps: int
    global_batch_size: int  # rows per step, all hosts together
    log_every: int  # steps between progress lines (and the first step of every attempt)
    eval_every: int  # steps between evaluations; 0: only after the last step
    checkpoint_every: int
    checkpoint_keep: int
    async_save: bool
    accum_steps: int = 1
    seed: int = 0  # dropout
    axis_rules: Sequence[tuple[str, str | None]] | None = None  # None: m2jax.sharding's
    restart: bool = False  # no readable checkpoint: set them aside and start over
    tensorboard: bool = True  # event files (clu, TensorFlow); False: metrics.jsonl
    record: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # for results.json


class _Preemption:
    """Notes SIGTERM (a scheduler's preemption) for the loop to save and stop; the previous
    handler is back once the loop ends."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _with_example_mask(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "example_mask" not in local:
        local = {**local, "example_mask": np.ones(len(local["input_ids"]), np.int32)}
    return {k: local[k] for k in BATCH_KEYS}


def _check_finite(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Raises NonFiniteError at the first pending step whose loss or gradient was not finite;
    else returns the last step's scalars. Empties `pending`."""
    if not pending:
        return {}
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending.clear()
    for step, metrics in zip(steps, fetched):
        if not bool(metrics["finite"]):
            raise NonFiniteError(
                f"the loss or gradient is not finite at step {step} (loss "
                f"{float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}): that "
                "update was not applied and nothing after the last checkpoint was saved. Lower "
                "the learning rate (or check the data), then re-run: it resumes from the newest "
                "checkpoint"
            )
    return {k: float(v) for k, v in fetched[-1].items() if k != "finite"}


def _check_state(check_step, state, consts, batch, step: int) -> None:
    """Refuses to save a state whose loss on its own step's batch is not finite: an update can
    be finite and still diverge (a huge learning rate), which only the next forward pass shows."""
    loss = float(check_step(state.params, consts, batch)["loss_sum"])
    if not np.isfinite(loss):
        raise NonFiniteError(
            f"the parameters after step {step} give a non-finite loss ({loss}) on that step's "
            "batch: the update diverged, so they were not saved and nothing after the last "
            "checkpoint was. Lower the learning rate, then re-run: it resumes from the newest "
            "checkpoint"
        )


def train_loop(
    model: nnx.Module,
    batches: Iterator[dict[str, np.ndarray]],
    optimizer: OptimizerConfig,
    evaluator: Evaluator | None,
    settings: LoopSettings,
    mesh: jax.sharding.Mesh,
) -> tuple[dict[str, Any], nnx.Module]:
    """Trains to `settings.total_steps`; returns (results, the trained model)."""
    s = settings
    wd.ensure_writable(s.workdir)
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(optimizer, params)
    state, shardings, consts = create_train_state(params, consts, tx, mesh, s.axis_rules, s.seed)
    train_step = jit_train_step(
        graphdef,
        tx,
        s.task,
        s.accum_steps,
        shardings,
        jax.tree_util.tree_map(lambda x: x.sharding, consts),
        shd.batch_sharding(mesh),
        shd.replicated(mesh),
        cache_key=(optimizer, mesh, None if s.axis_rules is None else tuple(s.axis_rules)),
    )
    check_step = jit_eval_step(graphdef, s.task)
    seq_len = model.config.max_position_embeddings
    fields = {
        "task": s.task,
        "total_steps": s.total_steps,
        "num_params": count_params(model),
        **s.record,
    }

    ckpt = Checkpointer(s.workdir / wd.CHECKPOINTS, keep=s.checkpoint_keep, async_save=s.async_save)
    writer = None
    record = None
    step = 0
    try:
        restored = ckpt.restore_latest(abstract_state(state), batches, restart=s.restart)
        if restored is not None:
            step, state = restored
            say(f"resumed from step {step} ({ckpt.directory / str(step)})")
        record = RunRecord(s.workdir, fields, step if restored is not None else None)
        record.set_mesh(mesh.shape)
        record.save("running", step)
        writer = MetricWriter(s.workdir, s.tensorboard)
        progress = ProgressLine(
            s.total_steps,
            s.global_batch_size * seq_len,
            training_flops_per_token(model, seq_len, s.global_batch_size),
        )
        start, status, pending = step, "completed", []
        with _Preemption() as preemption:
            while step < s.total_steps:
                batch = shd.global_batch(_with_example_mask(next(batches)), mesh)
                state, metrics = train_step(state, consts, batch)
                step += 1
                pending.append((step, metrics))
                last = step == s.total_steps
                if step == start + 1 or step % s.log_every == 0 or last:
                    scalars = _check_finite(pending)
                    lr = learning_rate_at(optimizer, step - 1)
                    scalars.update(progress.update(step, scalars["loss"], lr))
                    writer.write(step, scalars)
                    record.log_train(step, scalars)
                    record.save("running", step)  # a killed run keeps its history up to here
                if evaluator is not None and (last or (s.eval_every and step % s.eval_every == 0)):
                    t0 = time.perf_counter()
                    scores = evaluator.evaluate(state.params)
                    progress.exclude(time.perf_counter() - t0)
                    say(f"eval at step {step}: {format_metrics(scores)}")
                    writer.write(step, {f"eval_{k}": v for k, v in scores.items()})
                    record.log_eval(step, scores)
                preempted = preemption.requested or ckpt.reached_preemption(step)
                if step % s.checkpoint_every == 0 or last or preempted:
                    t0 = time.perf_counter()
                    _check_finite(pending)
                    _check_state(check_step, state, consts, batch, step)
                    ckpt.save(step, state, batches)
                    writer.flush()
                    record.save("running", step)
                    progress.exclude(time.perf_counter() - t0)
                else:
                    ckpt.check_for_errors()
                if preempted and not last:
                    status = "preempted"
                    break
        ckpt.wait()
        record.save(status, step)
    except BaseException as e:
        # Recorded when the work directory still takes it; the original error is what counts.
        if record is not None and not isinstance(e, WorkdirError):
            try:
                ckpt.wait()
                record.save("failed", ckpt.last_saved or 0, error=f"{type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - a full disk is reported by the checkpoint
                pass
        ckpt.close()
    return record.data, nnx.merge(graphdef, state.params, consts)
