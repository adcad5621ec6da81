"""`results.json`: what a run did, kept across every attempt (resumes, preemptions, failures).

    status       "running", "completed", "preempted" or "failed" (the latest attempt's)
    step         the last step whose state is known (trained, evaluated, saved)
    train        one entry per logged step: loss, lr, accuracy, grad_norm, tokens_per_s, ...
    eval         one entry per evaluation
    final_eval   the last evaluation (None before the first)
    attempts     one entry per launch: start and end step, status, wall seconds, devices, mesh,
                 the error that stopped it
A resumed attempt keeps the history up to the step it resumed from; the steps after it (an
attempt killed before its next checkpoint) are trained again with the same batches and recorded
once, from the attempt that kept them. The file is only ever replaced whole (atomically).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from etils import epath

from m2jax.train import workdir as wd


def stored_results(workdir: epath.Path) -> dict[str, Any] | None:
    """The work directory's results.json, or None."""
    return wd.read_json(workdir / wd.RESULTS)


def finished_results(workdir: epath.Path, total_steps: int) -> dict[str, Any] | None:
    """The stored results when the run already completed `total_steps` steps, else None."""
    stored = stored_results(workdir)
    if stored and stored.get("status") == "completed" and stored.get("step", 0) >= total_steps:
        return stored
    return None


class RunRecord:
    """The results of one run, written to `<workdir>/results.json` as it goes."""

    def __init__(self, workdir: epath.Path, fields: dict[str, Any], resumed_step: int | None):
        """`fields`: what the run is (task, total_steps, num_params, ...); `resumed_step`: the
        checkpoint step this attempt starts from (None: from scratch)."""
        self._path = workdir / wd.RESULTS
        previous = wd.read_json(self._path) or {}
        start = resumed_step or 0
        self.data: dict[str, Any] = {
            **fields,
            "status": "running",
            "step": start,
            "train": [e for e in previous.get("train", []) if e["step"] <= start],
            "eval": [e for e in previous.get("eval", []) if e["step"] <= start],
            "attempts": list(previous.get("attempts", [])),
        }
        self.data["final_eval"] = self.data["eval"][-1] if self.data["eval"] else None
        self._attempt = {
            "start_step": start,
            "resumed": resumed_step is not None,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
        }
        self._index = len(self.data["attempts"])  # this attempt's entry, replaced on each save
        self._t0 = time.perf_counter()

    def set_mesh(self, mesh: dict[str, int]) -> None:
        self._attempt["mesh"] = dict(mesh)

    def log_train(self, step: int, scalars: dict[str, float]) -> None:
        self.data["train"].append({"step": step, **scalars})
        self.data["step"] = step

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        entry = {"step": step, **metrics}
        self.data["eval"].append(entry)
        self.data["final_eval"] = entry

    def save(self, status: str, step: int, error: str | None = None) -> None:
        """Writes results.json with this attempt's state so far (`status`, at `step`)."""
        attempt = {
            **self._attempt,
            "status": status,
            "end_step": step,
            "wall_seconds": time.perf_counter() - self._t0,
        }
        if error:
            attempt["error"] = error
        self.data.update(
            status=status,
            step=step,
            wall_seconds=attempt["wall_seconds"],
            devices=attempt["devices"],
            mesh=attempt.get("mesh"),
        )
        self.data["attempts"] = [*self.data["attempts"][: self._index], attempt]
        wd.write_json(self._path, self.data)


class MetricWriter:
    """Scalars for TensorBoard: event files through clu when `tensorboard` and clu is installed
    (it needs TensorFlow, whose file layer also writes gs://), else `metrics.jsonl` through epath.
    Only process 0 writes."""

    def __init__(self, workdir: epath.Path, tensorboard: bool = True):
        self._active = jax.process_index() == 0
        self._clu = None
        self._jsonl: epath.Path | None = None
        self._lines: list[str] = []
        if not self._active:
            return
        try:
            if not tensorboard:
                raise ImportError("TensorBoard events not asked for")
            from clu import metric_writers
        except ImportError:
            self._jsonl = workdir / "metrics.jsonl"
            if self._jsonl.exists():
                self._lines = self._jsonl.read_text().splitlines(keepends=True)
            return
        self._clu = metric_writers.SummaryWriter(os.fspath(workdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._active:
            return
        if self._clu is not None:
            self._clu.write_scalars(step, dict(scalars))
        else:
            self._lines.append(json.dumps({"step": step, **scalars}) + "\n")

    def flush(self) -> None:
        if self._clu is not None:
            self._clu.flush()
        elif self._jsonl is not None:
            # Rewritten whole: object stores (gs://) have no append.
            self._jsonl.write_text("".join(self._lines))

    def close(self) -> None:
        self.flush()
        if self._clu is not None:
            self._clu.close()
