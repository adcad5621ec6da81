"""GLUE metrics in NumPy (no scikit-learn/scipy at run time; the tests check them against both).

All values are fractions in [0, 1] (correlations in [-1, 1]); multiply by 100 for GLUE tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from m2jax.data.glue_tasks import GLUE_SCORE_TASKS, get_task


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(pred == label))


def binary_f1(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of the positive class 1 (sklearn `f1_score` default; 0 when undefined)."""
    tp = np.sum((pred == 1) & (label == 1))
    fp = np.sum((pred == 1) & (label != 1))
    fn = np.sum((pred != 1) & (label == 1))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(pred: np.ndarray, label: np.ndarray) -> float:
    """Binary MCC from the confusion matrix; 0 when a marginal is empty (as sklearn)."""
    tp = float(np.sum((pred == 1) & (label == 1)))
    tn = float(np.sum((pred != 1) & (label != 1)))
    fp = float(np.sum((pred == 1) & (label != 1)))
    fn = float(np.sum((pred != 1) & (label == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (scipy `rankdata(method='average')`)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values; each run gets the mean of its positions.
    new_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.concatenate([run_start[1:], [len(x)]])
    mean_rank = (run_start + run_end + 1) / 2.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(x), _average_ranks(y))


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics plus 'score', its headline number.

    Args:
      task: GLUE task name (see `GLUE_TASKS`).
      predictions: class ids (N,), or logits (N, num_labels) which are arg-maxed; for STS-B
        scores (N,) or (N, 1).
      labels: (N,) class ids or STS-B scores.
    Returns e.g. {'matthews_corrcoef': 0.52, 'score': 0.52} for CoLA; QQP adds
    'accuracy_and_f1' (their mean, the score); MNLI gives one split's accuracy (combine the
    matched and mismatched results with `glue_task_score`).
    """
    spec = get_task(task)
    pred = np.asarray(predictions)
    label = np.asarray(labels)
    if spec.is_regression:
        pred = pred.reshape(len(pred), -1)[:, 0] if pred.ndim == 2 else pred
    elif pred.ndim == 2:
        pred = np.argmax(pred, axis=-1)
    if pred.shape != label.shape:
        raise ValueError(f"{task}: predictions {pred.shape} and labels {label.shape} differ in shape")
    if len(label) == 0:
        raise ValueError(f"{task}: no examples to score")
    if not spec.is_regression and np.any(label < 0):
        raise ValueError(f"{task}: labels contain -1 (unlabelled test data or padding); "
                         "score the validation split or drop padded rows")
    out: dict[str, float] = {}
    if spec.is_regression:
        out["pearson"] = pearson(pred, label)
        out["spearman"] = spearman(pred, label)
    else:
        out["accuracy"] = accuracy(pred, label)
        if "f1" in spec.metric_names:
            out["f1"] = binary_f1(pred, label)
        if "matthews_corrcoef" in spec.metric_names:
            out = {"matthews_corrcoef": matthews_corrcoef(pred, label)}
        if "accuracy_and_f1" in spec.metric_names:
            out["accuracy_and_f1"] = (out["accuracy"] + out["f1"]) / 2
    out["score"] = out[spec.headline]
    return out


def glue_task_score(task: str, split_metrics: Mapping[str, Mapping[str, float]]) -> float:
    """A task's score from `glue_metrics` of its eval splits: the mean over them (MNLI: matched
    and mismatched accuracy), the single split's score otherwise."""
    spec = get_task(task)
    missing = [s for s in spec.eval_splits if s not in split_metrics]
    if missing:
        raise ValueError(f"{task}: metrics for eval split(s) {missing} are missing")
    return float(np.mean([split_metrics[s]["score"] for s in spec.eval_splits]))


def glue_average(task_scores: Mapping[str, float]) -> float:
    """The GLUE score: mean over the eight tasks other than WNLI."""
    missing = [t for t in GLUE_SCORE_TASKS if t not in task_scores]
    if missing:
        raise ValueError(f"GLUE average needs scores for {missing}")
    return float(np.mean([task_scores[t] for t in GLUE_SCORE_TASKS]))
