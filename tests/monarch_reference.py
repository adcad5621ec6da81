"""Test-only Monarch helpers: dense materialisations and the order-2 Monarch product.

They state spec sections 3.4 and 7 in the most literal form (explicit permutations, dense
matrices), so the fast code paths (`m2jax.monarch.blockdiag_matmul`,
`kernels.long_conv_block.xla_monarch`) can be checked against them.

* ``transpose_permute(x, a, b)`` is P_(a,b): the last axis (length a*b) read row-major as (a, b),
  transposed and flattened, ``out[j*a + i] = x[i*b + j]``.
* An order-2 Monarch product with ``w1_KxQxP``, ``w2_LxSxR`` (L*R == K*Q) is
  ``M = P_(L,S) . BD(w2) . P_(R,L) . BD(w1)``; the N = N1*N2 point DFT is
  ``F_N = M(w1, w2) . P_(N1,N2)`` with w1 = N2 copies of F_N1 (twiddles folded into their rows)
  and w2 = N1 copies of F_N2.
"""

from __future__ import annotations

import numpy as np

from kernels.long_conv_block import xla_monarch


def blockdiag_to_dense(w_KxQxP) -> np.ndarray:
    """Dense (K*Q, K*P) matrix D of a block-diagonal weight: ``blockdiag_matmul(x, w) == x @ D.T``."""
    w = np.asarray(w_KxQxP)
    k, q, p = w.shape
    dense = np.zeros((k * q, k * p), w.dtype)
    for b in range(k):
        dense[b * q:(b + 1) * q, b * p:(b + 1) * p] = w[b]
    return dense


def transpose_permute(x, a: int, b: int) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[-1] != a * b:
        raise ValueError(f"transpose_permute needs a last axis of length a*b = {a}*{b}")
    lead = x.shape[:-1]
    return np.swapaxes(x.reshape(*lead, a, b), -1, -2).reshape(*lead, a * b)


def perm_matrix(a: int, b: int) -> np.ndarray:
    """Dense P_(a,b) written from the definition out[j*a + i] = x[i*b + j]; x_out = P @ x."""
    perm = np.zeros((a * b, a * b))
    for i in range(a):
        for j in range(b):
            perm[j * a + i, i * b + j] = 1.0
    return perm


def monarch_matmul(x, w1_KxQxP, w2_LxSxR) -> np.ndarray:
    """``y = P_(L,S) BD(w2) P_(R,L) BD(w1) x`` along the last axis, in NumPy."""
    _, q, _ = np.shape(w1_KxQxP)
    l, s, r = np.shape(w2_LxSxR)
    y1 = np.asarray(x) @ blockdiag_to_dense(w1_KxQxP).T
    y2 = transpose_permute(y1, r, l) @ blockdiag_to_dense(w2_LxSxR).T
    return transpose_permute(y2, l, s)


def monarch_to_dense(w1_KxQxP, w2_LxSxR) -> np.ndarray:
    """Dense (L*S, K*P) matrix M of the Monarch product: ``monarch_matmul(x) == x @ M.T``."""
    n_in = np.shape(w1_KxQxP)[0] * np.shape(w1_KxQxP)[2]
    return monarch_matmul(np.eye(n_in), w1_KxQxP, w2_LxSxR).T


def dft_matrix(n: int, inverse: bool = False) -> np.ndarray:
    """``F[k, m] = exp(-2 pi i k m / n)`` (complex128); inverse: ``conj(F) / n``."""
    idx = np.arange(n)
    f = np.exp(-2j * np.pi * np.mod(np.outer(idx, idx), n) / n)
    return np.conj(f) / n if inverse else f


def dft_monarch_weights(n1: int, n2: int, inverse: bool = False):
    """(w1, w2) with ``DFT(x) == monarch_matmul(transpose_permute(x, n1, n2), w1, w2)``, built
    from `xla_monarch.np_dft_factors`."""
    f1, f2, tw = xla_monarch.np_dft_factors(n1, n2, inverse)
    w1 = f1[None, :, :] * tw.T[:, :, None]
    w2 = np.broadcast_to(f2[None, :, :], (n1, n2, n2))
    return w1, w2
