"""MLM and classification losses against direct NumPy computations."""

import jax.numpy as jnp
import numpy as np

from m2jax.losses import classification_loss, mlm_loss


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_averages_only_predicted_positions():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
    labels = np.full((2, 5), -100, np.int32)
    labels[0, 1], labels[1, 3], labels[1, 4] = 7, 2, 10
    labels[0, 2] = 0  # [PAD] as a label: the reference does not predict it
    loss, count = mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
    lp = _log_softmax(logits.astype(np.float64))
    expected = -np.mean([lp[0, 1, 7], lp[1, 3, 2], lp[1, 4, 10]])
    assert int(count) == 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_mlm_loss_is_zero_with_nothing_to_predict():
    loss, count = mlm_loss(jnp.ones((1, 3, 4)), jnp.full((1, 3), -100))
    assert float(loss) == 0.0 and float(count) == 0.0


def test_classification_cross_entropy_and_regression_mse():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
    labels = np.array([1, 2])
    lp = _log_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(float(classification_loss(jnp.asarray(logits), jnp.asarray(labels))),
                               -(lp[0, 1] + lp[1, 2]) / 2, rtol=1e-6)
    reg = np.array([[0.5], [2.0]], np.float32)
    target = np.array([1.0, 1.5], np.float32)
    np.testing.assert_allclose(float(classification_loss(jnp.asarray(reg), jnp.asarray(target))),
                               ((0.5 - 1.0) ** 2 + (2.0 - 1.5) ** 2) / 2, rtol=1e-6)
