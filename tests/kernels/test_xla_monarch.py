"""The Monarch-DFT (matmul) long-conv block: shared cases, and the DFT factors of spec 7."""

import jax.numpy as jnp
import numpy as np
import pytest

import monarch_reference as mref
import test_base
from kernels.long_conv_block import xla_monarch


class TestXlaMonarch(test_base.LongConvBlockTestBase):
    IMPLEMENTATION = "xla_monarch"


def test_not_supported_below_two():
    assert not xla_monarch.supports(1, jnp.float32) and xla_monarch.supports(2, jnp.bfloat16)


@pytest.mark.parametrize("n,expected", [(4, (2, 2)), (6, (2, 3)), (256, (16, 16)),
                                        (512, (16, 32)), (240, (15, 16)), (514, (2, 257)),
                                        (4096, (64, 64)), (65536, (256, 256))])
def test_factor_fft_size(n, expected):
    assert xla_monarch.factor_fft_size(n) == expected


@pytest.mark.parametrize("n", [0, 2, 3, 7, 257])
def test_factor_fft_size_rejects_small_and_prime(n):
    with pytest.raises(ValueError, match="prime" if n >= 4 else ">= 4"):
        xla_monarch.factor_fft_size(n)


# --- the DFT as an order-2 Monarch product (spec 7), against literal dense constructions -----

def _rel_l2(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.complex128)
    expected = np.asarray(expected, dtype=np.complex128)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_transpose_permute_definition_and_inverse():
    x = np.arange(6)
    # View (2, 3) = [[0, 1, 2], [3, 4, 5]], transposed and flattened.
    np.testing.assert_array_equal(mref.transpose_permute(x, 2, 3), [0, 3, 1, 4, 2, 5])
    np.testing.assert_array_equal(mref.perm_matrix(2, 3) @ x, [0, 3, 1, 4, 2, 5])


def test_monarch_product_mixes_every_input():
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((4, 4, 4)), rng.standard_normal((4, 4, 4))
    dense = mref.monarch_to_dense(w1, w2)
    # Written out from dense factors and permutation matrices.
    expected = (mref.perm_matrix(4, 4) @ mref.blockdiag_to_dense(w2) @ mref.perm_matrix(4, 4)
                @ mref.blockdiag_to_dense(w1))
    assert _rel_l2(dense, expected) < 1e-12
    # With the permutations every output mixes every input; without them it stays block diagonal.
    assert np.all(np.abs(dense) > 0)
    no_perm = mref.blockdiag_to_dense(w2) @ mref.blockdiag_to_dense(w1)
    assert np.all(no_perm[~np.kron(np.eye(4), np.ones((4, 4))).astype(bool)] == 0)


FFT_SHAPES = [(3, 5), (16, 16), (8, 32), (12, 20)]


@pytest.mark.parametrize("n1,n2", FFT_SHAPES)
def test_dft_factors_form_the_dft_as_a_monarch_matrix(n1, n2):
    n = n1 * n2
    for inverse in (False, True):
        w1, w2 = mref.dft_monarch_weights(n1, n2, inverse=inverse)
        assert w1.shape == (n2, n1, n1) and w2.shape == (n1, n2, n2)
        dense = mref.monarch_to_dense(w1, w2) @ mref.perm_matrix(n1, n2)
        assert _rel_l2(dense, mref.dft_matrix(n, inverse)) < 1e-12


def test_twiddles_accurate_for_large_n():
    # N = 65536 (the 32k model): phases k1*n2/N reach ~65000/65536 of a turn; they must come out
    # at complex64 rounding, which exact integer phase reduction in float64 guarantees.
    n1 = n2 = 256
    _, _, tw = xla_monarch.dft_factors(n1, n2)
    k1, m2 = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    expected = np.exp(-2j * np.pi * k1 * m2 / (n1 * n2))
    assert np.max(np.abs(np.asarray(tw, np.complex128) - expected)) < 1e-7


@pytest.mark.parametrize("n1,n2", [(3, 5), (16, 16)])
def test_transposed_layout_pair(n1, n2):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, n1 * n2)), jnp.float32)
    b = xla_monarch.dft_transposed(x, n1, n2)
    assert b.shape == (2, n1, n2) and b.dtype == jnp.complex64
    # b[k1, k2] is frequency k1 + n1*k2.
    spectrum = np.fft.fft(np.asarray(x, np.float64))
    assert _rel_l2(np.swapaxes(np.asarray(b), -1, -2).reshape(2, -1), spectrum) < 1e-5
    assert _rel_l2(xla_monarch.idft_transposed(b), x) < 1e-5
