"""The XLA-FFT long-conv block against the direct sum (shared cases in test_base.py)."""

import test_base


class TestXlaFft(test_base.LongConvBlockTestBase):
    IMPLEMENTATION = "xla_fft"
