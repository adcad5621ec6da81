"""The sequence mixer routed through the fused long-conv block equals the per-conv path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
import m2jax
from m2jax.mixers import SequenceMixer

L = 128  # the kernel's shortest sequence
# Interpreted (CPU) the kernel is plain float32; compiled on a GPU its dots are 3xTF32.
F32_RTOL = 1e-5 if kernels.use_interpreter() else 1e-4


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cfg(impl: str, **kw):
    return m2jax.get_model_config("tiny", max_position_embeddings=L, long_conv_l_max=L,
                                  long_conv_implementation=impl, **kw)


@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_mixer_fused_block_equals_fft_path(impl):
    u = jax.random.normal(jax.random.key(1), (3, L, 32))
    ref = SequenceMixer(_cfg("fft"), rngs=nnx.Rngs(0))
    fused = SequenceMixer(_cfg(impl), rngs=nnx.Rngs(0))
    assert _rel(fused(u), ref(u)) < F32_RTOL


def test_mixer_fused_block_dropout_matches_unfused():
    cfg_kw = dict(hyena_training_additions=True, sequence_mixer_dropout_prob=0.3)
    u = jax.random.normal(jax.random.key(2), (2, L, 32))
    rng = jax.random.key(9)
    y_ref = SequenceMixer(_cfg("fft", **cfg_kw), rngs=nnx.Rngs(0))(u, dropout_rng=rng)
    y_fused = SequenceMixer(_cfg("pallas", **cfg_kw), rngs=nnx.Rngs(0))(u, dropout_rng=rng)
    y_no_drop = SequenceMixer(_cfg("pallas", **cfg_kw), rngs=nnx.Rngs(0))(u)
    assert _rel(y_fused, y_ref) < F32_RTOL
    assert _rel(y_no_drop, y_ref) > 1e-2  # the mask really acted


def test_model_gradients_through_the_kernel_match():
    ids = jax.random.randint(jax.random.key(3), (1, L), 0, 128)
    types = jnp.zeros_like(ids)

    def grads(impl):
        model = m2jax.M2BertForMaskedLM(_cfg(impl, num_hidden_layers=1), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(ids, types)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

        return jax.grad(loss)(params)

    g_fft, g_kernel = grads("fft"), grads("pallas")
    leaves_f = jax.tree.leaves(g_fft)
    leaves_k = jax.tree.leaves(g_kernel)
    assert len(leaves_f) == len(leaves_k) > 10
    for gf, gk in zip(leaves_f, leaves_k):
        if np.linalg.norm(np.asarray(gf)) > 0:
            assert _rel(gk, gf) < 10 * F32_RTOL
