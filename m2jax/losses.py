"""Training losses of the two heads (spec section 3.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mlm_loss(logits_BxLxV: jax.Array, labels_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over predicted positions, and their count.

    A position is predicted when its label is a real token id; unmasked positions carry -100.
    Like the reference (`labels > 0`), label 0 ([PAD]) is never predicted. Returns float32 scalars;
    the loss is 0 when no position is predicted.
    """
    predicted_BxL = labels_BxL > 0
    safe_labels = jnp.where(predicted_BxL, labels_BxL, 0)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), safe_labels
    )
    count = predicted_BxL.sum().astype(jnp.float32)
    loss = jnp.where(predicted_BxL, ce_BxL, 0.0).sum() / jnp.maximum(count, 1.0)
    return loss, count


def classification_loss(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Cross-entropy for C > 1 classes (integer labels); mean squared error when C == 1 (float
    labels, regression such as STS-B). Float32 scalar."""
    logits_BxC = logits_BxC.astype(jnp.float32)
    if logits_BxC.shape[-1] == 1:
        return jnp.mean((logits_BxC[:, 0] - labels_B.astype(jnp.float32)) ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxC, labels_B.astype(jnp.int32)
    ).mean()
