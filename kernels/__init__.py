"""Fused kernels for m2jax: the M2 long-convolution block (Pallas/Triton) and its XLA reference.

Importing this package pulls in jax only; the Pallas modules load when the kernel path runs.
"""

from kernels.dft_plan import MAX_KERNEL_SEQ_LEN, MIN_KERNEL_SEQ_LEN, kernel_supports
from kernels.m2_block import (
    IMPLEMENTATIONS,
    INTERPRET_ENV_VAR,
    m2_long_conv_block,
    resolve_implementation,
    use_interpreter,
)
from kernels.reference import ConvFilter, m2_block_reference

__all__ = [
    "ConvFilter",
    "IMPLEMENTATIONS",
    "INTERPRET_ENV_VAR",
    "MAX_KERNEL_SEQ_LEN",
    "MIN_KERNEL_SEQ_LEN",
    "kernel_supports",
    "m2_block_reference",
    "m2_long_conv_block",
    "resolve_implementation",
    "use_interpreter",
]
