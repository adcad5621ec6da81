"""The dense-DFT long-conv block: shared cases (ConvFilters and spectra), its DFT matrices, and
where `auto` runs it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_base
from kernels.long_conv_block import long_conv_block, prepare_filter, spectrum_choice, xla_dense_dft


class TestXlaDenseDft(test_base.LongConvBlockTestBase):
    IMPLEMENTATION = "xla_dense_dft"


class TestXlaDenseDftWithFilterSpectra(test_base.FilterSpectrumTestBase):
    IMPLEMENTATION = "xla_dense_dft"


class TestAutoWithFilterSpectra(test_base.FilterSpectrumTestBase):
    """What the compiled inference call does: spectra under the default `auto` (on CPU the
    dense DFT at these lengths, `test_auto_runs_spectra_on_cpu_with_the_dense_dft...`)."""

    IMPLEMENTATION = "auto"


def test_supports_up_to_its_longest_sequence():
    assert xla_dense_dft.MAX_SEQ_LEN == 128
    assert xla_dense_dft.supports(1, jnp.float32) and xla_dense_dft.supports(128, jnp.bfloat16)
    assert not xla_dense_dft.supports(0, jnp.float32)
    assert not xla_dense_dft.supports(129, jnp.float32)
    args = test_base.make_inputs(test_base.Case(1, 2, 129))
    with pytest.raises(ValueError, match=r"'xla_dense_dft' takes 1 <= L <= 128.*got L = 129"):
        long_conv_block(*args, implementation="xla_dense_dft")


@pytest.mark.parametrize("l", [1, 2, 7, 128])
def test_the_dft_matrices_are_the_real_fft_and_its_inverse(l):
    # Planes [Re X_0..X_L, Im X_0..X_L] of the size-2L spectrum of the zero-padded signal, and the
    # first L samples of the inverse real FFT (which ignores Im at DC and Nyquist).
    rng = np.random.default_rng(l)
    x = rng.standard_normal((3, l))
    want = np.fft.rfft(x, n=2 * l)
    got = x @ xla_dense_dft.np_forward_planes(l, l)
    np.testing.assert_allclose(got, np.concatenate([want.real, want.imag], -1), atol=1e-12)
    full = rng.standard_normal((3, 2 * l))  # the forward matrix over all 2L samples (kernels)
    want_full = np.fft.rfft(full)
    np.testing.assert_allclose(full @ xla_dense_dft.np_forward_planes(2 * l, l),
                               np.concatenate([want_full.real, want_full.imag], -1), atol=1e-12)
    spec = rng.standard_normal((3, l + 1)) + 1j * rng.standard_normal((3, l + 1))
    planes = np.concatenate([spec.real, spec.imag], -1)
    np.testing.assert_allclose(planes @ xla_dense_dft.np_inverse_planes(l),
                               np.fft.irfft(spec, n=2 * l)[:, :l], atol=1e-12)


def test_auto_runs_spectra_on_cpu_with_the_dense_dft_up_to_its_longest_sequence():
    f32 = jnp.float32
    assert spectrum_choice("cpu", 128, f32) == "xla_dense_dft"
    assert spectrum_choice("cpu", 129, f32) == "xla_fft"
    assert spectrum_choice("cuda", 128, f32) == "xla_fft"
    assert spectrum_choice("tpu", 64, f32) == "xla_fft"

    def lowered_text(l):
        x1, x2, v, gate, u, res = test_base.make_inputs(test_base.Case(2, 3, l))
        prep = lambda f: prepare_filter(f, platform="cpu", dtype=f32)
        return jax.jit(long_conv_block).lower(x1, x2, v, prep(gate), u, prep(res)).as_text()

    # No FFT in the compiled block at L = 128 (two matmuls per convolution); FFTs beyond.
    assert "fft" not in lowered_text(128) and "dot_general" in lowered_text(128)
    assert "fft" in lowered_text(129)
