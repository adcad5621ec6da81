"""Tests for m2jax.monarch: the block-diagonal product (spec 3.4).

The DFT as a Monarch product (spec 7) is tested with the long convolution:
tests/kernels/test_xla_monarch.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2jax import monarch
from monarch_reference import blockdiag_to_dense

HIGHEST = jax.lax.Precision.HIGHEST


def _rel_l2(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.complex128)
    expected = np.asarray(expected, dtype=np.complex128)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _normal(rng, shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(dtype))


# --- block-diagonal -------------------------------------------------------------------------


@pytest.mark.parametrize("k,q,p,lead", [(4, 3, 2, (5,)), (1, 6, 6, (2, 3)), (4, 8, 16, ())])
def test_blockdiag_matmul_matches_per_block_numpy(k, q, p, lead):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, k * p))
    w = rng.standard_normal((k, q, p))
    expected = np.concatenate(
        [x[..., b * p:(b + 1) * p] @ w[b].T for b in range(k)], axis=-1)
    y = monarch.blockdiag_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                 precision=HIGHEST)
    assert y.shape == (*lead, k * q)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_blockdiag_to_dense_is_block_diagonal_and_matches_matmul():
    rng = np.random.default_rng(1)
    w = _normal(rng, (3, 4, 2))
    dense = np.asarray(blockdiag_to_dense(w))
    assert dense.shape == (12, 6)
    np.testing.assert_array_equal(dense[4:8, 2:4], np.asarray(w[1]))
    mask = np.kron(np.eye(3), np.ones((4, 2))).astype(bool)
    assert np.all(dense[~mask] == 0)
    x = _normal(rng, (7, 6))
    y = monarch.blockdiag_matmul(x, w, precision=HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ dense.T, rtol=1e-5, atol=1e-5)


def test_blockdiag_matmul_rejects_mismatched_input():
    w = jnp.ones((4, 3, 2))
    with pytest.raises(ValueError, match=r"4\*2 = 8"):
        monarch.blockdiag_matmul(jnp.ones((5, 9)), w)
    with pytest.raises(ValueError, match="blocks, out_per_block, in_per_block"):
        monarch.blockdiag_matmul(jnp.ones((5, 8)), jnp.ones((8, 2)))


@pytest.mark.parametrize("k,q,p,b,l", [(4, 3, 2, 2, 5), (1, 6, 6, 1, 7), (4, 8, 16, 3, 1)])
def test_blockdiag_matmul_channels_first_is_the_same_map_along_axis_1(k, q, p, b, l):
    rng = np.random.default_rng(2)
    x_BxIxL = _normal(rng, (b, k * p, l))
    w = _normal(rng, (k, q, p))
    y = monarch.blockdiag_matmul_channels_first(x_BxIxL, w)
    assert y.shape == (b, k * q, l) and y.dtype == jnp.float32
    expected = monarch.blockdiag_matmul(jnp.swapaxes(x_BxIxL, 1, 2), w, precision=HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.swapaxes(np.asarray(expected), 1, 2),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=rf"{k}\*{p} = {k * p}"):
        monarch.blockdiag_matmul_channels_first(_normal(rng, (b, k * p + 1, l)), w)
