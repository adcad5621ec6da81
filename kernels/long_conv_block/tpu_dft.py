"""The DFT stages of the TPU kernels, on values already in VMEM (used inside Pallas bodies).

A transform maps a real tile x to a pair of float32 planes X = forward(x); `product` multiplies by
the kernel spectrum (or by its conjugate: the adjoint convolution); `inverse` maps back to the
real tile; `cotangent(X, G)` is ``d(sum g * y) / d(spectrum planes)`` for one batch row, where
G = forward(g). The forms and constants are described in `tpu_plan`.

Matmuls take operands in the configured dtype (float32 with ``Precision.HIGHEST`` or bf16 with
one MXU pass) and accumulate in float32; everything elementwise runs in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
_F32 = jnp.float32


def _dot(a: Array, b: Array, *, dtype: jnp.dtype, precision) -> Array:
    return jnp.dot(a.astype(dtype), b, precision=precision, preferred_element_type=_F32)


class DenseDft:
    """Real-input DFT of (C, T) tiles as (C, T) @ (T, L) matmuls.

    Constants (by name): forward ``ar, ai`` (block) or ``er, ei`` (filter taps); inverse
    ``ar, ai_t`` (block) or ``er_t, ei_t`` (filter taps). Spectrum planes (kr, ki, kn).
    """

    def __init__(self, consts: dict[str, Array], dtype: jnp.dtype, precision):
        self.c = consts
        self.dot = functools.partial(_dot, dtype=dtype, precision=precision)

    def forward(self, x: Array) -> tuple[Array, Array]:
        fr, fi = (self.c["ar"], self.c["ai"]) if "ar" in self.c else (self.c["er"], self.c["ei"])
        return self.dot(x, fr), self.dot(x, fi)

    def inverse(self, zs: tuple[Array, Array]) -> Array:
        gr, gi = ((self.c["ar"], self.c["ai_t"]) if "ai_t" in self.c
                  else (self.c["er_t"], self.c["ei_t"]))
        return self.dot(zs[0], gr) + self.dot(zs[1], gi)

    @staticmethod
    def product(xs: tuple[Array, Array], spec: tuple[Array, ...], adjoint: bool):
        (xr, xi), (kr, ki, kn) = xs, spec
        ki = -ki if adjoint else ki
        return xr * kr - xi * ki, xr * ki + xi * kn

    @staticmethod
    def cotangent(xs, gs) -> tuple[Array, ...]:
        (xr, xi), (gr, gi) = xs, gs
        return xr * gr, xr * gi - xi * gr, xi * gi


class MonarchDft:
    """Order-2 Monarch DFT of (C, Q, 128) tiles (sequence index 128 * q + lane).

    Stage 1 contracts the sublane axis with ``f1`` (N1, Q) for every channel (a batched matmul
    whose batch is the channel axis); stage 2 contracts the lanes with F_128 as one
    (C * N1, 128) @ (128, 128) matmul; B[k1, k2] holds frequency k1 + N1 * k2 (spec section 7).
    The inverse runs conj(F_128), the conjugate twiddles and ``g1`` (P, N1), or ``conj(f1)^T``
    when no g1 is given, and keeps the real part. Block kernel: Q = P = R (zero input rows skipped,
    only the L outputs computed); filter taps: Q = P = N1. Spectrum planes (kr, ki), (C, N1, 128).
    """

    def __init__(self, consts: dict[str, Array], dtype: jnp.dtype, precision):
        self.c = consts
        self.dtype, self.precision = dtype, precision
        self.dot = functools.partial(_dot, dtype=dtype, precision=precision)

    def _left(self, m: Array, x: Array) -> Array:
        """``m @ x[c]`` for every channel c: (P, Q) and (C, Q, 128) -> (C, P, 128)."""
        m_b = jnp.broadcast_to(m, (x.shape[0],) + m.shape)
        return jax.lax.dot_general(
            m_b, x.astype(self.dtype), (((2,), (1,)), ((0,), (0,))),
            precision=self.precision, preferred_element_type=_F32)

    def _left_t(self, m: Array, x: Array) -> Array:
        """``m^T @ x[c]`` for every channel c: (Q, P) and (C, Q, 128) -> (C, P, 128)."""
        m_b = jnp.broadcast_to(m, (x.shape[0],) + m.shape)
        return jax.lax.dot_general(
            m_b, x.astype(self.dtype), (((1,), (1,)), ((0,), (0,))),
            precision=self.precision, preferred_element_type=_F32)

    def _right(self, x: Array, m: Array) -> Array:
        """``x[c] @ m`` for every channel c, as one 2D matmul."""
        c, p, lanes = x.shape
        return self.dot(x.reshape(c * p, lanes), m).reshape(c, p, lanes)

    def forward(self, x: Array) -> tuple[Array, Array]:
        c = self.c
        ar, ai = self._left(c["f1r"], x), self._left(c["f1i"], x)
        ar, ai = ar * c["twr"] - ai * c["twi"], ar * c["twi"] + ai * c["twr"]
        br = self._right(ar, c["f2r"]) - self._right(ai, c["f2i"])
        bi = self._right(ar, c["f2i"]) + self._right(ai, c["f2r"])
        return br, bi

    def inverse(self, zs: tuple[Array, Array]) -> Array:
        c, (pr, pi) = self.c, zs
        cr = self._right(pr, c["f2r"]) + self._right(pi, c["f2i"])
        ci = self._right(pi, c["f2r"]) - self._right(pr, c["f2i"])
        cr, ci = cr * c["twr"] + ci * c["twi"], ci * c["twr"] - cr * c["twi"]
        if "g1r" in c:
            return self._left(c["g1r"], cr) - self._left(c["g1i"], ci)
        # Block kernel: conj(F_N1)[:R, :] = conj(f1)^T (F_N1 is symmetric), so the forward's f1
        # serves the inverse too and VMEM holds one copy.
        return self._left_t(c["f1r"], cr) + self._left_t(c["f1i"], ci)

    @staticmethod
    def product(xs: tuple[Array, Array], spec: tuple[Array, ...], adjoint: bool):
        (xr, xi), (kr, ki) = xs, spec
        ki = -ki if adjoint else ki
        return xr * kr - xi * ki, xr * ki + xi * kr

    @staticmethod
    def cotangent(xs, gs) -> tuple[Array, ...]:
        # Re / Im of conj(X) * G: the inverse is the adjoint of the forward stages.
        (xr, xi), (gr, gi) = xs, gs
        return xr * gr + xi * gi, xr * gi - xi * gr


def make(kind: str, names: tuple[str, ...], const_refs, dtype: jnp.dtype, precision):
    """The transform of a plan kind over constants loaded from ``const_refs`` (same order as
    ``names``)."""
    consts = {name: ref[...] for name, ref in zip(names, const_refs)}
    cls = DenseDft if kind == "dense" else MonarchDft
    return cls(consts, dtype, precision)
