"""The block-diagonal product of the Monarch MLP (spec 3.4), in the layout backends run fastest.

A block-diagonal weight ``w_KxQxP`` (the reference's stored layout) has K blocks, each mapping P
inputs to Q outputs. The input's last axis (length K*P) is read row-major as (K, P); the output
(length K*Q) as (K, Q).

The product runs as a batched matmul with the block axis LEADING, ``'knp,kpq->knq'``: XLA:CPU
runs that at about 3x the rate of the same contraction with the block axis in the middle
(``'nkp,kqp->nkq'``, 174 vs 59-66 GFLOP/s on the 2-core dev machine, docs/perf.md), and it is
the canonical batch-major layout of a GPU/TPU batched GEMM. The transposes of the activations
live inside the jitted computation; the stored weight layout does not change.

In its token-major layout (one sequence, and the compiled inference call, `M2BertModel.encode`)
the encoder runs `blockdiag_matmul_channels_first` on channels-first activations
(1, K*P, tokens): there each block is a contiguous slab of rows and nothing is copied.

The DFT as a Monarch product (spec section 7) lives with the long convolution:
`kernels.long_conv_block.xla_monarch`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("precision",))
def blockdiag_matmul(x_NxI: Array, w_KxQxP: Array,
                     precision: jax.lax.PrecisionLike = None) -> Array:
    """Block-diagonal linear map (no bias), spec 3.4.

    Args:
        x_NxI: input, shape (..., I) with I = K*P; any number of leading batch axes.
        w_KxQxP: weight, shape (K, Q, P): K blocks, Q outputs and P inputs per block.
        precision: passed to the matmul.

    Returns:
        y, shape (..., K*Q), with ``y[..., k*Q + q] = sum_p w[k, q, p] * x[..., k*P + p]``; dtype is
        the promotion of the input dtypes. Jitted, so that eager calls compile once per shape;
        inlined inside a caller's jit.
    """
    if w_KxQxP.ndim != 3:
        raise ValueError(
            f"w_KxQxP must have shape (blocks, out_per_block, in_per_block); got shape "
            f"{tuple(w_KxQxP.shape)}.")
    k, q, p = w_KxQxP.shape
    if x_NxI.ndim < 1 or x_NxI.shape[-1] != k * p:
        raise ValueError(
            f"x's last axis must be blocks*in_per_block = {k}*{p} = {k * p} for a weight of shape "
            f"{tuple(w_KxQxP.shape)}; got x of shape {tuple(x_NxI.shape)}.")
    lead = x_NxI.shape[:-1]
    x_KxNxP = jnp.moveaxis(x_NxI.reshape(-1, k, p), 1, 0)
    y_KxNxQ = jnp.einsum("knp,kqp->knq", x_KxNxP, w_KxQxP, precision=precision)
    return jnp.moveaxis(y_KxNxQ, 0, 1).reshape(*lead, k * q)


def blockdiag_matmul_channels_first(x_BxIxL: Array, w_KxQxP: Array) -> Array:
    """`blockdiag_matmul` on channels-first activations: (B, K*P, L) -> (B, K*Q, L).

    ``y[b, k*Q + q, l] = sum_p w[k, q, p] * x[b, k*P + p, l]``, dtype the promotion of the
    inputs. Block k of the input is the contiguous slab of rows ``k*P .. k*P + P - 1``, so each
    block is a plain (Q, P) x (P, L) matmul with no transposing copy of the activations (with
    B = 1 none at all; with B > 1 XLA moves whole length-L rows).
    """
    k, q, p = w_KxQxP.shape
    b, i, l = x_BxIxL.shape
    if i != k * p:
        raise ValueError(
            f"x's channel axis must be blocks*in_per_block = {k}*{p} = {k * p} for a weight of "
            f"shape {tuple(w_KxQxP.shape)}; got x of shape {tuple(x_BxIxL.shape)}.")
    # Activations as the first operand: with the weight first XLA:CPU transposed x to (K, L, P).
    y_BxKxQxL = jnp.einsum("bkpl,kqp->bkql", x_BxIxL.reshape(b, k, p, l), w_KxQxP)
    return y_BxKxQxL.reshape(b, k * q, l)
