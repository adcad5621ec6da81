"""Tests for m2jax.monarch: block-diagonal and Monarch products, the Monarch DFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2jax import monarch

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
    dense = np.asarray(monarch.blockdiag_to_dense(w))
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


# --- permutation and Monarch product --------------------------------------------------------


def test_transpose_permute_definition_and_inverse():
    x = jnp.arange(6)
    # View (2, 3) = [[0, 1, 2], [3, 4, 5]], transposed and flattened.
    np.testing.assert_array_equal(np.asarray(monarch.transpose_permute(x, 2, 3)),
                                  [0, 3, 1, 4, 2, 5])
    y = jnp.arange(24).reshape(2, 12)
    back = monarch.transpose_permute(monarch.transpose_permute(y, 3, 4), 4, 3)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(y))
    with pytest.raises(ValueError, match="a\\*b"):
        monarch.transpose_permute(x, 4, 2)


def _perm_matrix(a: int, b: int) -> np.ndarray:
    """Dense P_(a,b) written from the definition out[j*a + i] = x[i*b + j]; x_out = P @ x."""
    perm = np.zeros((a * b, a * b))
    for i in range(a):
        for j in range(b):
            perm[j * a + i, i * b + j] = 1.0
    return perm


@pytest.mark.parametrize(
    "w1_shape,w2_shape",
    [((4, 4, 4), (4, 4, 4)),   # square, the paper's sqrt(n) case
     ((2, 6, 3), (3, 5, 4)),   # rectangular blocks, 6 -> 12 -> 15
     ((8, 2, 4), (4, 4, 4)),   # more blocks in the first factor
     ((3, 4, 5), (6, 2, 2))])
def test_monarch_matmul_matches_dense(w1_shape, w2_shape):
    rng = np.random.default_rng(2)
    w1 = _normal(rng, w1_shape)
    w2 = _normal(rng, w2_shape)
    n_in = w1_shape[0] * w1_shape[2]
    x = _normal(rng, (3, 2, n_in))
    dense = np.asarray(monarch.monarch_to_dense(w1, w2))
    assert dense.shape == (w2_shape[0] * w2_shape[1], n_in)
    y = monarch.monarch_matmul(x, w1, w2, precision=HIGHEST)
    assert y.shape == (3, 2, dense.shape[0])
    expected_y = np.asarray(x, np.float64) @ dense.T.astype(np.float64)
    assert np.linalg.norm(np.asarray(y) - expected_y) / np.linalg.norm(expected_y) < 1e-5
    # Independent of monarch_to_dense: the written-out product of dense factors.
    l, s, r = w2_shape
    expected = (_perm_matrix(l, s) @ np.asarray(monarch.blockdiag_to_dense(w2))
                @ _perm_matrix(r, l) @ np.asarray(monarch.blockdiag_to_dense(w1)))
    assert np.linalg.norm(dense - expected) / np.linalg.norm(expected) < 1e-5


def test_monarch_product_is_not_block_diagonal():
    rng = np.random.default_rng(3)
    w1 = _normal(rng, (4, 4, 4))
    w2 = _normal(rng, (4, 4, 4))
    dense = np.asarray(monarch.monarch_to_dense(w1, w2))
    off_block = ~np.kron(np.eye(4), np.ones((4, 4))).astype(bool)
    # With the permutations every output mixes every input: no zero entries at all.
    assert np.all(np.abs(dense[off_block]) > 0)
    assert np.all(np.abs(dense) > 0)
    # Without them it would be a product of block diagonals, which stays block diagonal.
    no_perm = np.asarray(monarch.blockdiag_to_dense(w2)) @ np.asarray(
        monarch.blockdiag_to_dense(w1))
    assert np.all(no_perm[off_block] == 0)


def test_monarch_matmul_rejects_incompatible_factors():
    with pytest.raises(ValueError, match=r"3\*3 = 9.*4\*2 = 8"):
        monarch.monarch_matmul(jnp.ones((2, 8)), jnp.ones((4, 2, 2)), jnp.ones((3, 1, 3)))


# --- factorisation of FFT sizes -------------------------------------------------------------


@pytest.mark.parametrize("n,expected", [(4, (2, 2)), (6, (2, 3)), (256, (16, 16)),
                                        (512, (16, 32)), (240, (15, 16)), (514, (2, 257)),
                                        (4096, (64, 64)), (65536, (256, 256))])
def test_factor_fft_size(n, expected):
    assert monarch.factor_fft_size(n) == expected


@pytest.mark.parametrize("n", [0, 2, 3, 7, 257])
def test_factor_fft_size_rejects_small_and_prime(n):
    with pytest.raises(ValueError, match="prime" if n >= 4 else ">= 4"):
        monarch.factor_fft_size(n)


# --- DFT --------------------------------------------------------------------------------------


def test_dft_matrix_entries_and_inverse():
    f = np.asarray(monarch.dft_matrix(6))
    assert f.dtype == np.complex64
    np.testing.assert_allclose(f[2, 5], np.exp(-2j * np.pi * 10 / 6), atol=1e-7)
    np.testing.assert_allclose(f, np.fft.fft(np.eye(6), axis=0), atol=1e-6)
    f_inv = np.asarray(monarch.dft_matrix(6, inverse=True))
    np.testing.assert_allclose(f_inv @ f, np.eye(6), atol=1e-6)


def test_twiddles_accurate_for_large_n():
    # N = 65536 (the 32k model): phases k1*n2/N reach ~65000/65536 of a turn; they must come out
    # at complex64 rounding, which exact integer phase reduction in float64 guarantees.
    n1 = n2 = 256
    _, _, tw = monarch.dft_factors(n1, n2)
    k1, m2 = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    expected = np.exp(-2j * np.pi * k1 * m2 / (n1 * n2))
    assert np.max(np.abs(np.asarray(tw, np.complex128) - expected)) < 1e-7


FFT_SHAPES = [(3, 5), (16, 16), (8, 32), (12, 20)]


@pytest.mark.parametrize("n1,n2", FFT_SHAPES)
def test_monarch_dft_matches_jnp_fft(n1, n2):
    rng = np.random.default_rng(4)
    n = n1 * n2
    x_real = _normal(rng, (3, n))
    x_cplx = jnp.asarray(rng.standard_normal((3, n)) + 1j * rng.standard_normal((3, n)),
                         jnp.complex64)
    for x in (x_real, x_cplx):
        y = monarch.monarch_dft(x, n1, n2)
        assert y.dtype == jnp.complex64 and y.shape == x.shape
        assert _rel_l2(y, jnp.fft.fft(x)) < 1e-5
        # Also against a float64 ground truth, so a shared jnp.fft error cannot hide.
        assert _rel_l2(y, np.fft.fft(np.asarray(x, np.complex128))) < 1e-5
        y_inv = monarch.monarch_dft(x, n1, n2, inverse=True)
        assert _rel_l2(y_inv, jnp.fft.ifft(x)) < 1e-5


@pytest.mark.parametrize("n1,n2", FFT_SHAPES)
def test_dft_as_monarch_matrix_equals_dft_matrix(n1, n2):
    n = n1 * n2
    expected = np.asarray(monarch.dft_matrix(n))
    for inverse, want in ((False, expected), (True, np.conj(expected) / n)):
        w1, w2 = monarch.dft_monarch_weights(n1, n2, inverse=inverse)
        assert w1.shape == (n2, n1, n1) and w2.shape == (n1, n2, n2)
        dense = np.asarray(monarch.monarch_to_dense(w1, w2)) @ _perm_matrix(n1, n2)
        assert _rel_l2(dense, want) < 1e-5
    # The reshape form, materialised by applying it to the identity.
    materialised = np.asarray(monarch.monarch_dft(jnp.eye(n, dtype=jnp.complex64), n1, n2)).T
    assert _rel_l2(materialised, expected) < 1e-5


def test_dft_factors_reshape_form():
    n1, n2 = 4, 6
    f1, f2, tw = monarch.dft_factors(n1, n2)
    assert f1.shape == (4, 4) and f2.shape == (6, 6) and tw.shape == (4, 6)
    np.testing.assert_allclose(complex(tw[3, 5]), np.exp(-2j * np.pi * 15 / 24), atol=1e-7)
    x = np.random.default_rng(5).standard_normal(24)
    b = (np.asarray(f1) @ x.reshape(n1, n2)) * np.asarray(tw) @ np.asarray(f2)
    assert _rel_l2(b.T.reshape(-1), np.fft.fft(x)) < 1e-5
    _, _, tw_inv = monarch.dft_factors(n1, n2, inverse=True)
    np.testing.assert_allclose(np.asarray(tw_inv), np.conj(np.asarray(tw)) / 24, atol=1e-7)


@pytest.mark.parametrize("n1,n2", [(3, 5), (16, 16)])
def test_transposed_layout_pair(n1, n2):
    rng = np.random.default_rng(6)
    x = _normal(rng, (2, n1 * n2))
    b = monarch.monarch_dft_transposed(x, n1, n2)
    assert b.shape == (2, n1, n2)
    spectrum = np.fft.fft(np.asarray(x, np.float64))
    # b[k1, k2] is frequency k1 + n1*k2.
    assert _rel_l2(np.swapaxes(np.asarray(b), -1, -2).reshape(2, -1), spectrum) < 1e-5
    assert _rel_l2(monarch.monarch_idft_transposed(b), x) < 1e-5


def test_monarch_dft_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"3\*5 = 15"):
        monarch.monarch_dft(jnp.ones((2, 16)), 3, 5)
    with pytest.raises(ValueError, match="n1 must be a positive int"):
        monarch.monarch_dft(jnp.ones((2, 16)), 0, 16)


def test_monarch_dft_jit_and_grad_match_fft():
    rng = np.random.default_rng(7)
    x = _normal(rng, (2, 24))
    w = _normal(rng, (2, 24))
    dft = jax.jit(monarch.monarch_dft, static_argnums=(1, 2))
    assert _rel_l2(dft(x, 4, 6), jnp.fft.fft(x)) < 1e-5

    def loss(fn, v):
        return jnp.sum(jnp.real(fn(v)) * w + jnp.imag(fn(v)) * w[:, ::-1])

    g_monarch = jax.jit(jax.grad(lambda v: loss(lambda u: monarch.monarch_dft(u, 4, 6), v)))(x)
    g_fft = jax.jit(jax.grad(lambda v: loss(jnp.fft.fft, v)))(x)
    assert _rel_l2(g_monarch, g_fft) < 1e-5
