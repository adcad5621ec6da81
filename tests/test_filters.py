"""Implicit Hyena filters (spec 3.2): constants, the sine MLP, modulation, the shared freq."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m2jax
from m2jax.filters import (
    FilterConstant,
    FilterGroupParam,
    FilterPositionParam,
    HyenaFilterSet,
    decay_rates,
    positional_features,
    time_grid,
)
from m2jax.sharding import AXES_METADATA


def test_positional_features_are_time_then_cos_then_minus_sin():
    z = positional_features(8, 5)
    assert z.shape == (8, 5) and z.dtype == np.float32
    np.testing.assert_allclose(z[:, 0], np.arange(8) / 7, rtol=1e-6)
    w = 2 * np.pi * np.arange(8) / 8
    for band, f in enumerate([1e-4, 1.0]):
        np.testing.assert_allclose(z[:, 1 + band], np.cos(f * w), atol=1e-6)
        np.testing.assert_allclose(z[:, 3 + band], -np.sin(f * w), atol=1e-6)


def test_decay_rates_span_slow_to_fast():
    d = decay_rates(768)
    np.testing.assert_allclose([d[0], d[-1]], [np.log(1e-2) / 1.5, np.log(1e-2) / 0.3], rtol=1e-6)
    assert np.all(np.diff(d) < 0)


def _numpy_kernel(f: HyenaFilterSet, mlp, L: int) -> np.ndarray:
    h = np.asarray(f.z[...])[:L].astype(np.float64)
    freq = np.asarray(f.freq[...], np.float64)
    for i, lin in enumerate(mlp):
        h = h @ np.asarray(lin.kernel[...], np.float64)
        if lin.bias is not None:
            h = h + np.asarray(lin.bias[...])
        if i < 3:
            h = np.sin(f.w_mod * freq * h)
    t = time_grid(f.t.shape[0])[:L, None]
    return (h * np.exp(-t * np.abs(decay_rates(h.shape[1]))[None])).T


@pytest.mark.parametrize("L", [16, 9])
def test_kernels_match_a_numpy_evaluation_for_full_and_shorter_lengths(L):
    cfg = m2jax.get_model_config("tiny", hyena_w_mod=1.5)
    f = HyenaFilterSet(cfg, rngs=nnx.Rngs(3))
    # Perturb freq and z so the test sees them.
    f.freq[...] = f.freq[...] + jax.random.normal(jax.random.key(0), f.freq.shape)
    f.z[...] = f.z[...] + 0.1 * jax.random.normal(jax.random.key(1), f.z.shape)
    k_fwd, k_rev = f(L)
    assert k_fwd.shape == k_rev.shape == (cfg.hidden_size, L)
    np.testing.assert_allclose(k_fwd, _numpy_kernel(f, f.mlp_fwd, L), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(k_rev, _numpy_kernel(f, f.mlp_rev, L), rtol=2e-5, atol=1e-6)
    assert not np.allclose(k_fwd, k_rev)


def test_one_freq_per_filter_set_and_constants_are_not_params():
    cfg = m2jax.get_model_config("tiny")
    f = HyenaFilterSet(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(f, nnx.Param)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
    assert [k for k in flat if "freq" in k] == ["freq"]
    assert "t" not in flat and "deltas" not in flat
    consts = nnx.state(f, FilterConstant)
    assert sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(consts)) == ["deltas", "t"]
    np.testing.assert_allclose(f.freq[...], cfg.hyena_w)


def test_optimizer_groups_are_parameter_types_and_every_variable_has_axes():
    """The yaml's filter group is the forward MLP and `freq` (not the reverse MLP), `z` its own
    (spec sections 0 and 5); both types are still `nnx.Param`."""
    f = HyenaFilterSet(m2jax.get_model_config("tiny"), rngs=nnx.Rngs(0))
    def weights(mlp):
        return [v for lin in mlp for v in (lin.kernel, lin.bias) if v is not None]

    assert {type(v) for v in weights(f.mlp_fwd)} == {FilterGroupParam}
    assert {type(v) for v in weights(f.mlp_rev)} == {nnx.Param}
    assert type(f.freq) is FilterGroupParam and type(f.z) is FilterPositionParam
    assert type(f.bias_D) is nnx.Param
    flat = dict(nnx.to_flat_state(nnx.state(f)))
    assert len(flat) == 2 + 2 + 1 + 2 * 7  # t, deltas; z, freq; D; two MLPs
    axes = {"/".join(map(str, k)): v.get_metadata(AXES_METADATA) for k, v in flat.items()}
    assert axes["z"] == ("length", "filter") and axes["t"] == ("length",)
    assert axes["deltas"] == axes["bias_D"] == ("embed",)
    assert axes["mlp_fwd/3/kernel"] == axes["mlp_rev/3/kernel"] == ("filter", "embed")
    assert axes["mlp_fwd/0/bias"] == ("filter",) and axes["freq"] == ("filter",)
    assert len(jax.tree.leaves(nnx.state(f, nnx.Param))) == 1 + 1 + 1 + 2 * 7


def test_unidirectional_filter_has_no_reverse_kernel():
    f = HyenaFilterSet(m2jax.get_model_config("tiny", bidirectional=False), rngs=nnx.Rngs(0))
    k_fwd, k_rev = f(16)
    assert k_rev is None and k_fwd.shape == (32, 16)


def test_too_long_a_kernel_is_an_error():
    f = HyenaFilterSet(m2jax.get_model_config("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds"):
        f(17)


def test_bf16_compute_keeps_kernels_float32_and_close():
    cfg = m2jax.get_model_config("tiny")
    f32 = HyenaFilterSet(cfg, rngs=nnx.Rngs(0))
    bf16 = HyenaFilterSet(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    a, _ = f32(16)
    b, _ = bf16(16)
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 3e-2
