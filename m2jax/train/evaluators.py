"""Evaluators: objects built once from a model, its held-out data and the mesh, with one method,
`evaluate(params) -> {metric: value}` (big_vision's `evaluators/`, nanodo's `evaluate.py`).

The training loop calls `evaluate` with its current parameters; an evaluator never calls back
into the loop or the job that built it, and works as well on a loaded model:
`MlmEvaluator(model, ...).evaluate(nnx.state(model, nnx.Param))`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
from flax import nnx

from m2jax import sharding as shd
from m2jax.train.distributed import gather_to_host
from m2jax.train.step import jit_eval_step


class Evaluator(Protocol):
    def evaluate(self, params: nnx.State) -> dict[str, float]: ...


class MlmEvaluator:
    """Masked-LM loss and accuracy over the first `num_batches` batches of a held-out stream.

    `make_batches()` returns a fresh iterator of host-local MLM batches (the same batches every
    time, so evaluations compare)."""

    def __init__(
        self,
        model: nnx.Module,
        make_batches: Callable[[], Iterator[dict[str, np.ndarray]]],
        num_batches: int,
        mesh: Any,
    ):
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self._graphdef, _, self._consts = nnx.split(model, nnx.Param, ...)
        self._make_batches, self._num_batches, self._mesh = make_batches, num_batches, mesh

    def evaluate(self, params: nnx.State) -> dict[str, float]:
        step = jit_eval_step(self._graphdef, "mlm")
        batches = self._make_batches()
        loss = count = correct = 0.0
        for _ in range(self._num_batches):
            out = step(params, self._consts, shd.global_batch(next(batches), self._mesh))
            loss += float(out["loss_sum"])
            count += float(out["count"])
            correct += float(out["correct"])
        if count == 0:
            raise ValueError(f"{self._num_batches} evaluation batches hold no masked token")
        return {"mlm_loss": loss / count, "mlm_accuracy": correct / count}


class GlueEvaluator:
    """A GLUE task's metrics on its dev split(s), and its score (`m2jax.data.metrics`).

    `splits` maps a split name to its encoded data (`m2jax.data.glue.GlueSplit`); every row is
    scored: the last batch is padded and the padding dropped before the metrics."""

    def __init__(
        self,
        model: nnx.Module,
        task: str,
        splits: Mapping[str, Any],
        batch_size: int,
        mesh: Any,
        process_index: int = 0,
        process_count: int = 1,
    ):
        empty = [f"{name} ({data.skip_log.name})" for name, data in splits.items() if not len(data)]
        if empty:
            raise ValueError(f"GLUE {task}: no examples to evaluate in {', '.join(empty)}")
        self._graphdef, _, self._consts = nnx.split(model, nnx.Param, ...)
        self._task, self._splits, self._batch_size, self._mesh = task, splits, batch_size, mesh
        self._host = dict(process_index=process_index, process_count=process_count)

    def evaluate(self, params: nnx.State) -> dict[str, float]:
        from m2jax.data import glue_metrics, glue_task_score

        step = jit_eval_step(self._graphdef, "classification")
        split_metrics = {}
        for split, data in self._splits.items():
            preds, labels = [], []
            for local in data.batches(self._batch_size, pad_remainder=True, **self._host):
                batch = shd.global_batch(local, self._mesh)
                logits = gather_to_host(step(params, self._consts, batch)["logits"])
                keep = gather_to_host(batch["example_mask"]) == 1
                preds.append(logits[keep])
                labels.append(gather_to_host(batch["labels"])[keep])
            split_metrics[split] = glue_metrics(
                self._task, np.concatenate(preds), np.concatenate(labels)
            )
        flat = {f"{split}/{k}": v for split, m in split_metrics.items() for k, v in m.items()}
        flat["score"] = glue_task_score(self._task, split_metrics)
        return flat
