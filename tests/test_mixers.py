"""Sequence mixer and GLU dimension mixer pieces (spec 3.1, 3.4, 3.6)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

import m2jax
from kernels.long_conv_block import FilterSpectrum, prepare_filter
from m2jax.mixers import (
    GLUDimensionMixer, MixerFilters, SequenceMixer, dropout, short_causal_conv)
from monarch_reference import blockdiag_to_dense


def test_short_conv_equals_torch_conv1d_semantics():
    """Conv1d(groups=C, kernel 3, padding 2), first L outputs, written as a plain loop."""
    rng = np.random.default_rng(0)
    B, L, C = 2, 7, 5
    p = rng.standard_normal((B, L, C)).astype(np.float32)
    w = rng.standard_normal((C, 3)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    expected = np.zeros_like(p)
    for t in range(L):
        for j in range(3):
            src = t - 2 + j
            if src >= 0:
                expected[:, t] += w[:, j] * p[:, src]
    expected += b
    # short_causal_conv is channels-first: (B, C, L).
    got = short_causal_conv(jnp.asarray(p).transpose(0, 2, 1), w, b).transpose(0, 2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_short_conv_gradients_equal_autodiff_of_its_definition():
    rng = np.random.default_rng(3)
    p, ds = (jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(4), jnp.float32)

    def plain(p, w, b):  # the forward of short_causal_conv, differentiated by JAX
        padded = jnp.pad(p, ((0, 0), (0, 0), (2, 0)))
        return b[:, None] + sum(w[:, j, None] * padded[..., j : j + p.shape[-1]] for j in range(3))

    _, vjp_plain = jax.vjp(plain, p, w, b)
    out, vjp_custom = jax.vjp(short_causal_conv, p, w, b)
    np.testing.assert_allclose(out, plain(p, w, b), rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp_custom(ds), vjp_plain(ds)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _dense_glu(mlp, cfg, x, gelu):
    """The GLU mixer written out with dense matrices, in float64, with a given GELU."""
    W1 = blockdiag_to_dense(np.asarray(mlp.gated_layers.weight[...], np.float64))  # (2I, H)
    W2 = blockdiag_to_dense(np.asarray(mlp.wo.weight[...], np.float64))  # (H, I)
    g = x @ W1.T
    I = cfg.intermediate_size
    o = (gelu(g[..., :I]) * g[..., I:]) @ W2.T + np.asarray(mlp.wo.bias[...]) + x
    mu, var = o.mean(-1, keepdims=True), o.var(-1, keepdims=True)
    return (o - mu) / np.sqrt(var + cfg.layer_norm_eps)


def _erf_gelu(a):
    return 0.5 * a * (1 + scipy.special.erf(a / np.sqrt(2)))


def _tanh_gelu(a):
    return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))


def test_glu_mixer_equals_dense_computation_with_exact_gelu():
    cfg = m2jax.get_model_config("tiny")
    mlp = GLUDimensionMixer(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((2, 16, cfg.hidden_size))
    out = np.asarray(mlp(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(out, _dense_glu(mlp, cfg, x, _erf_gelu), rtol=1e-5, atol=1e-5)
    # The tolerance above tells the two GELUs apart: the tanh form fails it.
    assert not np.allclose(out, _dense_glu(mlp, cfg, x, _tanh_gelu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("additions", [False, True])
def test_sequence_mixer_same_output_for_every_long_conv_implementation(additions):
    base = m2jax.get_model_config("tiny", hyena_training_additions=additions)
    u = jax.random.normal(jax.random.key(0), (2, 16, base.hidden_size))
    outs = {}
    for impl in ("auto", "xla_fft", "xla_monarch"):
        mixer = SequenceMixer(base.replace(long_conv_implementation=impl), rngs=nnx.Rngs(0))
        outs[impl] = np.asarray(mixer(u))
    ref = outs["xla_fft"]
    for impl in ("auto", "xla_monarch"):
        assert np.linalg.norm(outs[impl] - ref) / np.linalg.norm(ref) < 1e-5, impl


def test_sequence_mixer_through_the_triton_kernel_with_dropout():
    # L = 128, the kernel's shortest sequence (interpreted here); dropout on v * x1 and y.
    cfg = m2jax.get_model_config(
        "tiny", hidden_size=16, intermediate_size=32, max_position_embeddings=128,
        long_conv_l_max=128, hyena_training_additions=True, sequence_mixer_dropout_prob=0.3)
    u = jax.random.normal(jax.random.key(2), (2, 128, 16))
    rng = jax.random.key(9)
    mixer = {i: SequenceMixer(cfg.replace(long_conv_implementation=i), rngs=nnx.Rngs(0))
             for i in ("xla_fft", "pallas_triton")}
    y_ref, y_kernel = (np.asarray(mixer[i](u, dropout_rng=rng)) for i in mixer)
    # Interpreted (CPU) the kernel is plain float32; compiled on a GPU its dots are 3xTF32.
    rtol = 1e-5 if jax.default_backend() == "cpu" else 1e-4
    assert np.linalg.norm(y_kernel - y_ref) / np.linalg.norm(y_ref) < rtol
    y_no_drop = np.asarray(mixer["xla_fft"](u))
    assert np.linalg.norm(y_no_drop - y_ref) / np.linalg.norm(y_ref) > 1e-2  # the mask acted


def test_sequence_mixer_residual_long_conv_and_additions_change_the_output():
    cfg = m2jax.get_model_config("tiny")
    u = jax.random.normal(jax.random.key(0), (1, 16, cfg.hidden_size))
    plain = SequenceMixer(cfg.replace(residual_long_conv=False), rngs=nnx.Rngs(0))(u)
    residual = SequenceMixer(cfg, rngs=nnx.Rngs(0))(u)
    additions = SequenceMixer(cfg.replace(hyena_training_additions=True), rngs=nnx.Rngs(0))(u)
    assert not np.allclose(plain, residual) and not np.allclose(residual, additions)


def test_sequence_mixer_is_causal_when_unidirectional():
    # A wide init so the filters are not near zero (HF init leaves them ~1e-6).
    cfg = m2jax.get_model_config("tiny", bidirectional=False, residual_long_conv=False,
                                 initializer_range=0.5)
    mixer = SequenceMixer(cfg, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(0), (1, 16, cfg.hidden_size))
    u2 = u.at[:, 10:].set(0.0)
    y, y2 = np.asarray(mixer(u)), np.asarray(mixer(u2))
    # The FFT's round-off scales with the whole output (entries up to ~5 here), not per entry:
    # an absolute bound well below the bidirectional leak checked next (> 1e-4).
    np.testing.assert_allclose(y[:, :10], y2[:, :10], rtol=1e-5, atol=1e-6 * np.abs(y).max() * 10)
    bi = SequenceMixer(cfg.replace(bidirectional=True), rngs=nnx.Rngs(0))
    assert not np.allclose(bi(u)[:, :10], bi(u2)[:, :10], atol=1e-4)


def test_dropout_is_identity_without_rng_and_scales_kept_units():
    x = jnp.ones((1000,))
    assert dropout(x, 0.3, None) is x
    y = np.asarray(dropout(x, 0.3, jax.random.key(0)))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.05
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)


def test_mixer_dropout_only_when_rate_and_rng_given():
    cfg = m2jax.get_model_config("tiny", hyena_training_additions=True)
    u = jax.random.normal(jax.random.key(0), (1, 16, cfg.hidden_size))
    inert = SequenceMixer(cfg, rngs=nnx.Rngs(0))  # the reference's rate: 0.0
    np.testing.assert_array_equal(inert(u), inert(u, dropout_rng=jax.random.key(1)))
    active = SequenceMixer(cfg.replace(sequence_mixer_dropout_prob=0.5), rngs=nnx.Rngs(0))
    assert not np.allclose(active(u), active(u, dropout_rng=jax.random.key(1)))
    np.testing.assert_array_equal(active(u), inert(u))


def test_layer_norm_over_channels_is_the_layer_norm_along_axis_1():
    ln = nnx.LayerNorm(6, epsilon=1e-5, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ln.scale[...] = jnp.asarray(rng.standard_normal(6), jnp.float32)
    ln.bias[...] = jnp.asarray(rng.standard_normal(6), jnp.float32)
    x_BxHxL = jnp.asarray(3.0 + rng.standard_normal((2, 6, 5)), jnp.float32)
    y = m2jax.mixers.layer_norm_over_channels(ln, x_BxHxL)
    expected = jnp.swapaxes(ln(jnp.swapaxes(x_BxHxL, 1, 2)), 1, 2)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("additions", [False, True])
def test_the_channels_first_layout_computes_the_same_mixers(additions):
    """The encoder's layout at batch size 1, (B, H, L), against the sequence-major one."""
    cfg = m2jax.get_model_config("tiny").replace(hyena_training_additions=additions)
    rng = np.random.default_rng(1)
    u_BxLxH = jnp.asarray(rng.standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
    mixer, mlp = SequenceMixer(cfg, rngs=nnx.Rngs(0)), GLUDimensionMixer(cfg, rngs=nnx.Rngs(1))
    for module in (mixer, mlp):
        cf = module(jnp.swapaxes(u_BxLxH, 1, 2), channels_first=True)
        np.testing.assert_allclose(jnp.swapaxes(cf, 1, 2), module(u_BxLxH), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("additions", [False, True])
@pytest.mark.parametrize("spectra", [False, True])
def test_the_token_major_layout_computes_the_same_sequence_mixer(additions, spectra):
    """(1, H, S * L), S sequences back to back with `seq_len=L` (the encoder's layout for the
    compiled call), against each sequence alone; filters as `ConvFilter`s or their spectra."""
    S, L = 3, 16
    # Filters S * L long: the last check reads the tokens as one sequence.
    cfg = m2jax.get_model_config("tiny", hyena_training_additions=additions,
                                 long_conv_l_max=S * L, max_position_embeddings=S * L)
    assert cfg.residual_long_conv  # both convolutions, both filters repeated per sequence
    H = cfg.hidden_size
    u_SxLxH = jax.random.normal(jax.random.key(4), (S, L, H))
    mixer = SequenceMixer(cfg, rngs=nnx.Rngs(0))
    filters = mixer.filters(L)
    if spectra:
        prepare = functools.partial(prepare_filter, platform="cpu", dtype=jnp.float32,
                                    implementation="xla_fft")
        filters = MixerFilters(prepare(filters.gate), prepare(filters.residual))
        assert isinstance(filters.gate, FilterSpectrum)
    tokens_1xHxN = jnp.swapaxes(u_SxLxH.reshape(1, S * L, H), 1, 2)
    y_1xHxN = mixer(tokens_1xHxN, filters=filters, channels_first=True, seq_len=L)
    y_SxLxH = jnp.swapaxes(y_1xHxN, 1, 2).reshape(S, L, H)
    for s in range(S):
        alone = mixer(u_SxLxH[s:s + 1])
        np.testing.assert_allclose(y_SxLxH[s:s + 1], alone, rtol=2e-5, atol=2e-5)
    # Read as one sequence of S * L tokens instead, the convolutions mix the sequences.
    joined = mixer(tokens_1xHxN, channels_first=True)
    assert not np.allclose(joined, y_1xHxN, rtol=1e-3, atol=1e-3)


def test_token_major_input_of_the_wrong_shape_is_refused():
    cfg = m2jax.get_model_config("tiny")
    mixer = SequenceMixer(cfg, rngs=nnx.Rngs(0))
    H = cfg.hidden_size
    for u, channels_first in (
        (jnp.zeros((2, H, 16)), True),  # more than one row
        (jnp.zeros((1, H, 24)), True),  # not a whole number of sequences of 16
        (jnp.zeros((1, 32, H)), False),  # sequence-major
    ):
        with pytest.raises(ValueError, match="token-major"):
            mixer(u, channels_first=channels_first, seq_len=16)
