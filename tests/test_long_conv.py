"""Tests for m2jax.long_conv: the bidirectional long convolution of spec section 3.3."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2jax import long_conv

B, H = 2, 3


def _rel_l2(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _inputs(l: int, seed: int = 0, b: int = B, h: int = H):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, l)).astype(np.float32)
    kf = rng.standard_normal((h, l)).astype(np.float32)
    kr = rng.standard_normal((h, l)).astype(np.float32)
    return x, kf, kr


def _np_reference(x, kf, kr) -> np.ndarray:
    """float64 ground truth from np.convolve, independent of the matrix and FFT constructions.

    Causal half: np.convolve(x, kf)[:L]. Anti-causal half: with time reversed (u = x[::-1]),
    sum_{s>t} kr[s-t-1] x[s] becomes a causal convolution of u with [0, kr] (one step of delay:
    kr[0] sits at lag 1), read back reversed.
    """
    x = np.asarray(x, np.float64)
    b, h, l = x.shape
    y = np.zeros((b, h, l))
    for i in range(b):
        for c in range(h):
            y[i, c] = np.convolve(x[i, c], np.asarray(kf[c], np.float64))[:l]
            if kr is not None:
                delayed = np.concatenate([[0.0], np.asarray(kr[c], np.float64)])
                y[i, c] += np.convolve(x[i, c, ::-1], delayed)[:l][::-1]
    return y


def test_direct_matches_brute_force_double_loop():
    x, kf, kr = (a.astype(np.float64) for a in _inputs(5, seed=1))
    b, h, l = x.shape
    expected = np.zeros((b, h, l))
    for t in range(l):
        for s in range(l):
            if s <= t:
                expected[:, :, t] += kf[:, t - s] * x[:, :, s]
            else:
                expected[:, :, t] += kr[:, s - t - 1] * x[:, :, s]
    y = long_conv.bidirectional_long_conv(x.astype(np.float32), kf.astype(np.float32),
                                          kr.astype(np.float32), implementation="direct")
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np_reference(x, kf, kr), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", long_conv.IMPLEMENTATIONS)
def test_lag_zero_belongs_to_forward_kernel_only(implementation):
    # Spec 3.3 pitfall: kr[0] acts at lag 1 (y[t] += kr[0] x[t+1]), never at lag 0.
    l = 6
    x = np.random.default_rng(2).standard_normal((1, 1, l)).astype(np.float32)
    delta = np.zeros((1, l), np.float32)
    delta[0, 0] = 1.0
    zeros = np.zeros((1, l), np.float32)
    y_rev = long_conv.bidirectional_long_conv(x, zeros, delta, implementation=implementation)
    np.testing.assert_allclose(np.asarray(y_rev)[0, 0], np.append(x[0, 0, 1:], 0.0), atol=1e-6)
    y_fwd = long_conv.bidirectional_long_conv(x, delta, zeros, implementation=implementation)
    np.testing.assert_allclose(np.asarray(y_fwd), x, atol=1e-6)


def test_doubled_kernel_layout():
    kf = jnp.arange(4.0)[None]
    kr = 10.0 + jnp.arange(4.0)[None]
    np.testing.assert_array_equal(np.asarray(long_conv.doubled_kernel(kf, kr)),
                                  [[0, 1, 2, 3, 13, 12, 11, 10]])
    np.testing.assert_array_equal(np.asarray(long_conv.doubled_kernel(kf, None)),
                                  [[0, 1, 2, 3, 0, 0, 0, 0]])


LENGTHS = [1, 2, 3, 7, 64, 100, 128, 257]


@pytest.mark.parametrize("l", LENGTHS)
def test_all_implementations_match_reference(l):
    x, kf, kr = _inputs(l, seed=l)
    expected = _np_reference(x, kf, kr)
    direct = long_conv.bidirectional_long_conv(x, kf, kr, implementation="direct")
    assert direct.shape == (B, H, l) and direct.dtype == jnp.float32
    assert _rel_l2(direct, expected) < 1e-5
    fft = long_conv.bidirectional_long_conv(x, kf, kr, implementation="fft")
    assert _rel_l2(fft, direct) < 1e-5
    assert _rel_l2(fft, expected) < 1e-5
    if l == 1:
        with pytest.raises(ValueError, match="L >= 2; got L = 1"):
            long_conv.bidirectional_long_conv(x, kf, kr, implementation="monarch")
        return
    mon = long_conv.bidirectional_long_conv(x, kf, kr, implementation="monarch")
    assert mon.shape == (B, H, l) and mon.dtype == jnp.float32
    assert _rel_l2(mon, direct) < 1e-5
    assert _rel_l2(mon, expected) < 1e-5


@pytest.mark.parametrize("implementation", long_conv.IMPLEMENTATIONS)
def test_causal_when_reverse_kernel_is_none(implementation):
    l = 12
    x, kf, _ = _inputs(l, seed=3)
    y = long_conv.bidirectional_long_conv(x, kf, None, implementation=implementation)
    assert _rel_l2(y, _np_reference(x, kf, None)) < 1e-5
    zeros = np.zeros_like(kf)
    y_zero_rev = long_conv.bidirectional_long_conv(x, kf, zeros, implementation=implementation)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_zero_rev), atol=1e-5)
    # Changing the future (t >= 8) leaves the past outputs (t < 8) unchanged.
    x_future = x.copy()
    x_future[..., 8:] += 5.0
    y_future = long_conv.bidirectional_long_conv(x_future, kf, None, implementation=implementation)
    np.testing.assert_allclose(np.asarray(y_future)[..., :8], np.asarray(y)[..., :8], atol=1e-5)
    assert np.max(np.abs(np.asarray(y_future)[..., 8:] - np.asarray(y)[..., 8:])) > 1e-2


@pytest.mark.parametrize("implementation", long_conv.IMPLEMENTATIONS)
def test_bf16_input_returns_bf16_close_to_float32(implementation):
    x, kf, kr = _inputs(16, seed=4)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    y = long_conv.bidirectional_long_conv(x_bf16, jnp.asarray(kf, jnp.bfloat16),
                                          jnp.asarray(kr, jnp.bfloat16),
                                          implementation=implementation)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    # Same bf16-rounded inputs in float32: only the final cast to bf16 differs (2^-8 relative).
    y32 = long_conv.bidirectional_long_conv(
        x_bf16.astype(jnp.float32), jnp.asarray(kf, jnp.bfloat16).astype(jnp.float32),
        jnp.asarray(kr, jnp.bfloat16).astype(jnp.float32), implementation=implementation)
    assert _rel_l2(y.astype(jnp.float32), y32) < 4e-3
    # And against the unrounded float32 problem: input rounding adds about as much again.
    assert _rel_l2(y.astype(jnp.float32), _np_reference(x, kf, kr)) < 1e-2


@pytest.mark.parametrize("implementation", ["fft", "monarch"])
def test_grad_matches_direct(implementation):
    x, kf, kr = _inputs(12, seed=5)
    w = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)

    def loss(impl, x_, kf_, kr_):
        return jnp.sum(long_conv.bidirectional_long_conv(x_, kf_, kr_, implementation=impl) * w)

    # One jit around each whole gradient: one compile instead of one per backward primitive.
    grads = jax.jit(jax.grad(functools.partial(loss, implementation), argnums=(0, 1, 2)))(
        x, kf, kr)
    grads_direct = jax.jit(jax.grad(functools.partial(loss, "direct"), argnums=(0, 1, 2)))(
        x, kf, kr)
    for g, g_ref in zip(grads, grads_direct):
        assert g.shape == g_ref.shape
        assert _rel_l2(g, g_ref) < 1e-5
    # The x-gradient of sum(w * T x) is T^T w: the adjoint correlates w with the kernels.
    t = np.asarray(long_conv.conv_matrix(kf, kr), np.float64)
    np.testing.assert_allclose(np.asarray(grads[0]), np.einsum("hts,bht->bhs", t, w),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", long_conv.IMPLEMENTATIONS)
def test_jit_matches_eager(implementation):
    x, kf, kr = _inputs(10, seed=7)
    fn = jax.jit(functools.partial(long_conv.bidirectional_long_conv,
                                   implementation=implementation))
    y_jit = fn(x, kf, kr)
    assert _rel_l2(y_jit, _np_reference(x, kf, kr)) < 1e-5
    y_jit_causal = fn(x, kf, None)
    assert _rel_l2(y_jit_causal, _np_reference(x, kf, None)) < 1e-5


def test_conv_matrix_entries():
    kf = np.array([[1.0, 2.0, 3.0]], np.float32)
    kr = np.array([[10.0, 20.0, 30.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(long_conv.conv_matrix(kf, kr))[0],
                                  [[1, 10, 20], [2, 1, 10], [3, 2, 1]])
    np.testing.assert_array_equal(np.asarray(long_conv.conv_matrix(kf, None))[0],
                                  [[1, 0, 0], [2, 1, 0], [3, 2, 1]])


def test_rejects_bad_arguments():
    x, kf, kr = _inputs(8)
    with pytest.raises(ValueError, match=r"'fast'.*\('fft', 'monarch', 'direct'\)"):
        long_conv.bidirectional_long_conv(x, kf, kr, implementation="fast")
    with pytest.raises(ValueError, match=r"k_fwd must have shape \(H, L\) = \(3, 8\).*\(3, 7\)"):
        long_conv.bidirectional_long_conv(x, kf[:, :7], kr)
    with pytest.raises(ValueError, match=r"k_rev must have shape .*\(2, 8\)"):
        long_conv.bidirectional_long_conv(x, kf, kr[:2])
    with pytest.raises(ValueError, match=r"\(B, H, L\); got shape \(3, 8\)"):
        long_conv.bidirectional_long_conv(x[0], kf, kr)
    with pytest.raises(ValueError, match="L >= 1"):
        long_conv.bidirectional_long_conv(x[..., :0], kf[:, :0], kr[:, :0])
    with pytest.raises(ValueError, match="floating-point"):
        long_conv.bidirectional_long_conv(x.astype(np.int32), kf, kr)
