"""Shared tests of the long-convolution block: every implementation against the direct O(L^2) sum.

The tokamax pattern: `LongConvBlockTestBase` holds the cases and the checks; each implementation
has a subclass in `tests/kernels/test_<implementation>.py` that names it (and may narrow the cases
to the lengths it supports). The judge is the plain definition of spec 3.1/3.3, written here as a
dense (H, L, L) convolution matrix: float64 NumPy for forward values, float32 JAX at HIGHEST
precision for gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels.long_conv_block import (ConvFilter, FilterSpectrum, implementation_module,
                                     long_conv_block, prepare_filter)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    h: int
    l: int
    residual: bool = True
    reverse: bool = True
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return (f"B{self.b}H{self.h}L{self.l}" + ("-res" if self.residual else "")
                + ("-rev" if self.reverse else "") + f"-{self.dtype}")


# Several B, H, L; with and without the residual convolution and the reverse kernel; f32/bf16.
ALL_CASES = (
    Case(2, 3, 128),
    Case(1, 2, 256, reverse=False),
    Case(3, 2, 128, residual=False),
    Case(2, 3, 100),                                   # L not a power of two
    Case(2, 2, 7, residual=False, reverse=False),      # odd, tiny
    Case(3, 2, 1),                                     # the shortest sequence
    Case(2, 3, 128, dtype="bfloat16"),
    Case(1, 2, 96, reverse=False, dtype="bfloat16"),
)


# What the filter-spectrum variants run (a spectrum only replaces the filter's transform): both
# filter kinds, odd and shortest L, bf16.
SPECTRUM_CASES = tuple(c for c in ALL_CASES if c.id in (
    "B2H3L128-res-rev-float32", "B2H2L7-float32", "B3H2L1-res-rev-float32", "B1H2L96-res-bfloat16"))


def rel_err(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def make_inputs(case: Case, seed: int = 0):
    """(x1, x2, v, gate, u or None, residual or None), the entry point's argument order;
    Hyena-like decaying kernels, float32."""
    ks = jax.random.split(jax.random.key(seed), 10)
    sig = [jax.random.normal(ks[i], (case.b, case.h, case.l)).astype(case.dtype)
           for i in range(4)]
    scale = max(case.l / 8, 1.0)
    decay = jnp.exp(-jnp.arange(case.l) / scale)[None, :] / np.sqrt(scale)
    k = lambda i: jax.random.normal(ks[i], (case.h, case.l)) * decay
    gate = ConvFilter(k(4), k(5) if case.reverse else None, jax.random.normal(ks[6], (case.h,)))
    res = ConvFilter(k(7), k(8), jax.random.normal(ks[9], (case.h,))) if case.residual else None
    return sig[0], sig[1], sig[2], gate, (sig[3] if case.residual else None), res


# ------------------------------------------------------------------ the judge: direct O(L^2) sum

def conv_matrix(k_fwd_HxL, k_rev_HxL, xp=jnp):
    """``T[h, t, s] = k_fwd[h, t-s]`` for s <= t, ``k_rev[h, s-t-1]`` for s > t (spec 3.3)."""
    l = k_fwd_HxL.shape[-1]
    lag = np.arange(l)[:, None] - np.arange(l)[None, :]
    t = xp.where(lag >= 0, k_fwd_HxL[:, np.clip(lag, 0, l - 1)], 0)
    if k_rev_HxL is not None:
        t = t + xp.where(lag < 0, k_rev_HxL[:, np.clip(-lag - 1, 0, l - 1)], 0)
    return t


def direct_block(x1, x2, v, gate, u, res):
    """The block by its definition, float32 at HIGHEST precision; output in v's dtype."""
    f32 = lambda a: a.astype(jnp.float32)

    def conv_skip(x, filt):
        t = conv_matrix(f32(filt.k_fwd_HxL),
                        None if filt.k_rev_HxL is None else f32(filt.k_rev_HxL))
        y = jnp.einsum("hts,bhs->bht", t, x, precision=jax.lax.Precision.HIGHEST)
        return y + f32(filt.d_H)[None, :, None] * x

    y = conv_skip(f32(v) * f32(x1), gate) * f32(x2)
    if u is not None:
        y = y + conv_skip(f32(u), res)
    return y.astype(v.dtype)


def direct_block_np(x1, x2, v, gate, u, res) -> np.ndarray:
    """The same in float64 NumPy, for forward values."""
    f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)

    def conv_skip(x, filt):
        t = conv_matrix(f64(filt.k_fwd_HxL), f64(filt.k_rev_HxL), xp=np)
        return np.einsum("hts,bhs->bht", t, x) + f64(filt.d_H)[None, :, None] * x

    y = conv_skip(f64(v) * f64(x1), gate) * f64(x2)
    if u is not None:
        y = y + conv_skip(f64(u), res)
    return y


def _loss_grads(block, args):
    x1, x2, v, gate, u, res = args
    weight = jnp.cos(0.37 * jnp.arange(v.shape[-1]))  # a non-uniform cotangent

    def loss(x1, x2, v, u, gate, res):
        return jnp.sum(block(x1, x2, v, gate, u, res).astype(jnp.float32) * weight)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x1, x2, v, u, gate, res)


class LongConvBlockTestBase:
    """The cases and checks every implementation passes. Subclasses set IMPLEMENTATION."""

    IMPLEMENTATION = ""
    F32_RTOL = 1e-5
    # Output rounding to bf16 alone is up to 2^-8 relative per element.
    BF16_RTOL = 1e-2

    @classmethod
    def cases(cls) -> list[Case]:
        module = implementation_module(cls.IMPLEMENTATION)
        return [c for c in ALL_CASES if module.supports(c.l, jnp.dtype(c.dtype))]

    def block(self, x1, x2, v, gate, u=None, res=None):
        return long_conv_block(x1, x2, v, gate, u, res, implementation=self.IMPLEMENTATION)

    def rtol(self, case: Case) -> float:
        return self.F32_RTOL if case.dtype == "float32" else self.BF16_RTOL

    def test_forward_matches_direct(self, case):
        args = make_inputs(case, seed=case.l + case.b)
        y = self.block(*args)
        assert y.shape == (case.b, case.h, case.l) and y.dtype == jnp.dtype(case.dtype)
        assert np.all(np.isfinite(np.asarray(y, np.float32)))
        assert rel_err(y, direct_block_np(*args)) < self.rtol(case)

    def test_gradients_match_direct(self, case):
        args = make_inputs(case, seed=7 * case.l + case.b)
        got = _loss_grads(self.block, args)
        want = _loss_grads(direct_block, args)
        # x1, x2, v, u and every array of both filters (kernels, D).
        names = ["x1", "x2", "v", "u", "gate.k_fwd", "gate.k_rev", "gate.d", "res.k_fwd",
                 "res.k_rev", "res.d"]  # the order of _loss_grads' argnums
        flat_got, flat_want = [], []
        for g, w in zip(got, want):
            flat_got += list(g) if isinstance(g, ConvFilter) else [g]
            flat_want += list(w) if isinstance(w, ConvFilter) else [w]
        checked = 0
        for name, g, w in zip(names, flat_got, flat_want):
            if w is None:  # no u / residual / reverse kernel in this case
                assert g is None, name
                continue
            assert g.shape == w.shape and g.dtype == w.dtype, name
            if case.l == 1 and name.endswith("k_rev"):  # L = 1 has no lag -1: no effect
                assert np.max(np.abs(np.asarray(g, np.float32))) == 0, name
            else:
                assert np.linalg.norm(np.asarray(w, np.float32)) > 0, name
                assert rel_err(g, w) < self.rtol(case), name
            checked += 1
        assert checked == 3 + 2 + (1 if case.reverse else 0) + (4 if case.residual else 0)

    def test_lag_zero_belongs_to_the_forward_kernel(self):
        # Spec 3.3 pitfall: k_rev[0] acts at lag -1 (y[t] += k_rev[0] v[t + 1]), never at lag 0.
        case = min(self.cases(), key=lambda c: (c.l < 2, c.l))
        l = case.l
        v = jax.random.normal(jax.random.key(1), (1, 2, l))
        ones, zeros_h = jnp.ones_like(v), jnp.zeros((2,))
        delta = jnp.zeros((2, l)).at[:, 0].set(1.0)
        rev_only = ConvFilter(jnp.zeros((2, l)), delta, zeros_h)
        fwd_only = ConvFilter(delta, jnp.zeros((2, l)), zeros_h)
        # The gate path gives the anti-causal shift; the residual path the identity (+ D = 2).
        y = self.block(ones, ones, v, rev_only, v, fwd_only._replace(d_H=zeros_h + 2.0))
        shifted = jnp.concatenate([v[..., 1:], jnp.zeros_like(v[..., :1])], axis=-1)
        np.testing.assert_allclose(np.asarray(y), np.asarray(shifted + 3.0 * v), atol=1e-5)


class FilterSpectrumTestBase(LongConvBlockTestBase):
    """The same checks with the filters passed as their spectra (`prepare_filter`, what the
    memoised inference call keeps) on `SPECTRUM_CASES`: forward values and gradients, the
    filters' included. Subclasses set IMPLEMENTATION, a path that takes spectra; it is named in
    the call (under `auto` a spectrum runs `spectrum_choice`'s path)."""

    @classmethod
    def cases(cls) -> list[Case]:
        return list(SPECTRUM_CASES)

    def block(self, x1, x2, v, gate, u=None, res=None):
        prepare = lambda f: prepare_filter(f, platform="cpu", dtype=v.dtype,
                                           implementation=self.IMPLEMENTATION)
        gate_hat = prepare(gate)
        assert isinstance(gate_hat, FilterSpectrum)
        assert gate_hat.khat_HxF.shape == (v.shape[1], v.shape[2] + 1)
        assert gate_hat.khat_HxF.dtype == jnp.complex64
        return long_conv_block(x1, x2, v, gate_hat, u, None if res is None else prepare(res),
                               implementation=self.IMPLEMENTATION)
