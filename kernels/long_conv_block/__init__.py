"""The M2 gated long-convolution block: one op, several implementations (tokamax layout).

    from kernels.long_conv_block import ConvFilter, long_conv_block
    y = long_conv_block(x1, x2, v, ConvFilter(k_fwd, k_rev, d), u, ConvFilter(...))

`api` holds the entry point and the per-platform dispatch of ``implementation="auto"``; `base`
the arguments and the gating shared by the XLA paths; one module per implementation
(`xla_fft`, `xla_monarch`, `xla_dense_dft`, `pallas_triton`, `pallas_mosaic_tpu`).
Importing this package needs jax only; the Pallas modules load when their path runs.
"""

from kernels.long_conv_block.api import (
    AUTO_PREFERENCES,
    IMPLEMENTATIONS,
    SPECTRUM_IMPLEMENTATIONS,
    SPECTRUM_PREFERENCES,
    auto_choice,
    implementation_module,
    long_conv_block,
    prepare_filter,
    spectrum_choice,
)
from kernels.long_conv_block.base import ConvFilter, FilterSpectrum

__all__ = [
    "AUTO_PREFERENCES",
    "ConvFilter",
    "FilterSpectrum",
    "IMPLEMENTATIONS",
    "SPECTRUM_IMPLEMENTATIONS",
    "SPECTRUM_PREFERENCES",
    "auto_choice",
    "implementation_module",
    "long_conv_block",
    "prepare_filter",
    "spectrum_choice",
]
