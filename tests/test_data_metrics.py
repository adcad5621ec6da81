"""GLUE metrics against scikit-learn and scipy."""

import numpy as np
import pytest

from m2jax.data import glue_average, glue_metrics, glue_task_score
from m2jax.data.metrics import _average_ranks

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _noisy_labels(rng, n, classes, agree):
    labels = rng.integers(0, classes, n)
    pred = np.where(rng.random(n) < agree, labels, rng.integers(0, classes, n))
    return pred, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    pred, labels = _noisy_labels(rng, 997, 2, 0.7)
    cola = glue_metrics("cola", pred, labels)
    assert cola == pytest.approx({"matthews_corrcoef": sklearn_metrics.matthews_corrcoef(labels, pred),
                                  "score": sklearn_metrics.matthews_corrcoef(labels, pred)}, abs=1e-12)
    acc, f1 = sklearn_metrics.accuracy_score(labels, pred), sklearn_metrics.f1_score(labels, pred)
    assert glue_metrics("mrpc", pred, labels) == pytest.approx({"f1": f1, "accuracy": acc, "score": f1}, abs=1e-12)
    qqp = glue_metrics("qqp", pred, labels)
    assert qqp == pytest.approx({"accuracy": acc, "f1": f1, "accuracy_and_f1": (acc + f1) / 2,
                                 "score": (acc + f1) / 2}, abs=1e-12)
    for task in ("sst2", "qnli", "rte", "wnli"):
        assert glue_metrics(task, pred, labels) == pytest.approx({"accuracy": acc, "score": acc}, abs=1e-12)
    pred3, labels3 = _noisy_labels(rng, 500, 3, 0.6)
    mnli = glue_metrics("mnli", pred3, labels3)
    assert mnli["score"] == pytest.approx(sklearn_metrics.accuracy_score(labels3, pred3), abs=1e-12)


def test_logits_are_argmaxed_and_degenerate_cases_match_sklearn():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, 3))
    labels = rng.integers(0, 3, 64)
    assert glue_metrics("mnli", logits, labels)["accuracy"] == pytest.approx(
        sklearn_metrics.accuracy_score(labels, logits.argmax(-1)))
    constant = np.zeros(50, int)
    labels2 = rng.integers(0, 2, 50)
    assert glue_metrics("cola", constant, labels2)["score"] == sklearn_metrics.matthews_corrcoef(labels2, constant) == 0.0
    assert glue_metrics("mrpc", constant, labels2)["f1"] == sklearn_metrics.f1_score(labels2, constant, zero_division=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_stsb_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    # Scores on the 0-5 grid in steps of 0.2, as in STS-B, so there are many ties.
    labels = np.round(rng.uniform(0, 5, 1500) * 5) / 5
    pred = np.round((labels + rng.normal(0, 1.2, 1500)) * 2) / 2
    out = glue_metrics("stsb", pred[:, None], labels)
    assert out["pearson"] == pytest.approx(stats.pearsonr(pred, labels)[0], abs=1e-12)
    assert out["spearman"] == pytest.approx(stats.spearmanr(pred, labels)[0], abs=1e-12)
    assert out["score"] == out["spearman"]
    np.testing.assert_array_equal(_average_ranks(pred), stats.rankdata(pred))


def test_task_scores_and_glue_average():
    m = {"validation_matched": {"score": 0.80}, "validation_mismatched": {"score": 0.82}}
    assert glue_task_score("mnli", m) == pytest.approx(0.81)
    assert glue_task_score("rte", {"validation": {"score": 0.6}}) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="validation_mismatched"):
        glue_task_score("mnli", {"validation_matched": {"score": 0.8}})
    scores = dict(mnli=0.8, qnli=0.9, qqp=0.85, rte=0.7, sst2=0.92, mrpc=0.88, cola=0.5, stsb=0.87, wnli=0.1)
    assert glue_average(scores) == pytest.approx(np.mean([0.8, 0.9, 0.85, 0.7, 0.92, 0.88, 0.5, 0.87]))
    with pytest.raises(ValueError, match=r"\['cola'\]"):
        glue_average({k: v for k, v in scores.items() if k != "cola"})


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="labels contain -1"):
        glue_metrics("rte", np.array([0, 1]), np.array([0, -1]))
    with pytest.raises(ValueError, match=r"predictions \(3,\) and labels \(2,\)"):
        glue_metrics("rte", np.array([0, 1, 1]), np.array([0, 1]))
