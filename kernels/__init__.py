"""Kernels of m2jax, one package per op (tokamax layout); imports nothing from m2jax.

`kernels.long_conv_block`: the gated bidirectional long-convolution block of the M2 sequence
mixer, with XLA (FFT, Monarch-DFT matmuls) and Pallas (Triton; TPU slot) implementations.
"""

from kernels.long_conv_block import ConvFilter, long_conv_block

__all__ = ["ConvFilter", "long_conv_block"]
