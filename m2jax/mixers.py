"""The two mixers of an M2 layer: the sequence mixer (spec 3.1) and the GLU dimension mixer (3.4)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.long_conv_block import ConvFilter, long_conv_block
from m2jax.config import M2BertConfig
from m2jax.filters import HyenaFilterSet
from m2jax.monarch import blockdiag_matmul

# The reference's `hyena_training_additions` LayerNorm is a default torch LayerNorm (spec section 0).
ADDITIONS_LAYER_NORM_EPS = 1e-5


# Dropout draws 16 random bits per element: the keep probability is 1 - rate rounded to 1/65536.
_DROPOUT_BITS = 16


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (evaluation) or `rate` is 0.

    Each element is kept when a 16-bit random number is below ``round((1 - rate) * 2^16)``, so
    the keep probability is within 2^-17 of ``1 - rate``; kept elements are scaled by
    ``1 / (1 - rate)``. Two elements share one 32-bit draw: on CPU the threefry draws cost as
    much as a large matmul per GLU activation, and half as many draws run 3x faster.
    """
    if rng is None or rate == 0.0:
        return x
    threshold = round((1.0 - rate) * 2**_DROPOUT_BITS)
    if threshold == 0:
        return jnp.zeros_like(x)
    n = x.size
    bits_N = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    u16 = jnp.concatenate([bits_N & 0xFFFF, bits_N >> _DROPOUT_BITS])[:n].reshape(x.shape)
    return jnp.where(u16 < threshold, x / (1.0 - rate), jnp.zeros_like(x))


@jax.custom_vjp
def short_causal_conv(p_BxLxC: jax.Array, w_Cx3: jax.Array, b_C: jax.Array) -> jax.Array:
    """Depthwise causal conv of width 3: `s[t, c] = b[c] + sum_j w[c, j] p[t - 2 + j, c]`.

    Equals the reference's Conv1d(groups=C, kernel 3, padding 2) keeping the first L outputs.
    Shapes: p (B, L, C), w (C, 3), b (C,) -> (B, L, C) in p's dtype. The backward is written out
    (`_short_causal_conv_bwd`): autodiff of the shifted slices materialises one padded copy of
    the cotangent per tap, a few percent of a CPU train step.
    """
    L = p_BxLxC.shape[1]
    padded = jnp.pad(p_BxLxC, ((0, 0), (2, 0), (0, 0)))
    w = w_Cx3.astype(p_BxLxC.dtype)
    out = b_C.astype(p_BxLxC.dtype)
    for j in range(3):
        out = out + w[:, j] * padded[:, j : j + L, :]
    return out


def _short_causal_conv_fwd(p_BxLxC, w_Cx3, b_C):
    return short_causal_conv(p_BxLxC, w_Cx3, b_C), (p_BxLxC, w_Cx3, b_C)


def _short_causal_conv_bwd(res, ds_BxLxC):
    """dp[s] = sum_j w[j] ds[s + 2 - j] (zero past L); dw[j] = sum ds[t] p[t - 2 + j]; db = sum ds."""
    p_BxLxC, w_Cx3, b_C = res
    L = p_BxLxC.shape[1]
    w = w_Cx3.astype(ds_BxLxC.dtype)
    ds_pad = jnp.pad(ds_BxLxC, ((0, 0), (0, 2), (0, 0)))
    dp = sum(w[:, j] * ds_pad[:, 2 - j : 2 - j + L, :] for j in range(3))
    p_pad = jnp.pad(p_BxLxC, ((0, 0), (2, 0), (0, 0)))
    dw_Cx3 = jnp.stack(
        [jnp.sum(ds_BxLxC * p_pad[:, j : j + L, :], axis=(0, 1)) for j in range(3)], axis=-1
    )
    db = jnp.sum(ds_BxLxC, axis=(0, 1))
    return dp.astype(p_BxLxC.dtype), dw_Cx3.astype(w_Cx3.dtype), db.astype(b_C.dtype)


short_causal_conv.defvjp(_short_causal_conv_fwd, _short_causal_conv_bwd)


def layer_norm(eps: float, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # LayerNorm always computes in float32 (spec section 8), whatever the compute dtype.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


def dense(
    cfg: M2BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Linear:
    """A Linear with the HF BERT init (N(0, initializer_range), zero bias) and the compute dtype."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


class BlockDiagLinear(nnx.Module):
    """y = blockdiag(W) x (+ b), weight (nb, out/nb, in/nb) as the reference stores it.

    With `nblocks=1` this is a dense layer stored as (1, out, in).
    """

    def __init__(
        self, d_in: int, d_out: int, nblocks: int, *, use_bias: bool, dtype: str, rngs: nnx.Rngs
    ):
        in_blk, out_blk = d_in // nblocks, d_out // nblocks
        # The reference initialises the dense equivalent with kaiming-uniform(a=sqrt(5)), i.e.
        # U(+-1/sqrt(in)), then scales by sqrt(nblocks) because the matrix is sparse.
        bound = 1.0 / math.sqrt(in_blk)
        self.weight = nnx.Param(
            jax.random.uniform(
                rngs.params(), (nblocks, out_blk, in_blk), jnp.float32, -bound, bound
            )
        )
        bias_bound = 1.0 / math.sqrt(d_out)
        self.bias = (
            nnx.Param(
                jax.random.uniform(rngs.params(), (d_out,), jnp.float32, -bias_bound, bias_bound)
            )
            if use_bias
            else None
        )
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        y = blockdiag_matmul(x_NxI.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class SequenceMixer(nnx.Module):
    """Gated bidirectional long convolution with a residual long convolution (spec 3.1, 3.6)."""

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        H = cfg.hidden_size
        self.cfg = cfg
        self.layernorm = (
            layer_norm(ADDITIONS_LAYER_NORM_EPS, H, rngs) if cfg.hyena_training_additions else None
        )
        self.in_linear = dense(cfg, H, 3 * H, rngs)
        # torch Conv1d default init: U(+-1/sqrt(fan_in)), fan_in = kernel width 3 (depthwise).
        bound = 1.0 / math.sqrt(3.0)
        self.short_conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (3 * H, 3), jnp.float32, -bound, bound)
        )
        self.short_conv_bias = nnx.Param(
            jax.random.uniform(rngs.params(), (3 * H,), jnp.float32, -bound, bound)
        )
        self.filter_fn = HyenaFilterSet(cfg, rngs=rngs)
        self.filter_fn2 = HyenaFilterSet(cfg, rngs=rngs) if cfg.residual_long_conv else None
        self.out_linear = dense(cfg, H, H, rngs)

    def __call__(self, u_BxLxH: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        compute = jnp.dtype(self.cfg.dtype)
        rate = self.cfg.sequence_mixer_dropout_prob
        rng_v, rng_y = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        if self.layernorm is not None:
            u_BxLxH = self.layernorm(u_BxLxH.astype(jnp.float32))
        u_BxLxH = u_BxLxH.astype(compute)
        p_BxLx3H = self.in_linear(u_BxLxH)
        s_BxLx3H = short_causal_conv(
            p_BxLx3H, self.short_conv_weight[...], self.short_conv_bias[...]
        )
        x1, x2, v = jnp.split(s_BxLx3H, 3, axis=-1)
        if self.cfg.hyena_training_additions:
            # dropout(v * x1) == v * dropout(x1): same shape and rng, hence the same mask.
            x1 = dropout(x1, rate, rng_v)
        y = self._long_conv_block(x1, x2, v, u_BxLxH).astype(compute)
        if self.cfg.hyena_training_additions:
            y = dropout(y, rate, rng_y)
        return self.out_linear(y)

    def _long_conv_block(
        self, x1: jax.Array, x2: jax.Array, v: jax.Array, u_BxLxH: jax.Array
    ) -> jax.Array:
        """Steps 4-7 of spec 3.1 in one `kernels.long_conv_block` call; (B, L, H) in and out."""
        L = v.shape[1]
        cf = lambda t: jnp.swapaxes(t, 1, 2)  # the kernels are channels-first
        k_fwd, k_rev = self.filter_fn(L)
        gate = ConvFilter(k_fwd, k_rev, self.filter_fn.bias_D[...])
        u, residual = None, None
        if self.filter_fn2 is not None:
            g_fwd, g_rev = self.filter_fn2(L)
            u, residual = cf(u_BxLxH), ConvFilter(g_fwd, g_rev, self.filter_fn2.bias_D[...])
        y_BxHxL = long_conv_block(
            cf(x1), cf(x2), cf(v), gate, u, residual,
            implementation=self.cfg.long_conv_implementation,
        )
        return cf(y_BxHxL)


class GLUDimensionMixer(nnx.Module):
    """Block-diagonal GLU MLP with a residual and post-LayerNorm (spec 3.4)."""

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        H, I = cfg.hidden_size, cfg.intermediate_size
        nb = cfg.monarch_mlp_nblocks if cfg.use_monarch_mlp else 1
        self.cfg = cfg
        self.gated_layers = BlockDiagLinear(
            H, 2 * I, nb, use_bias=False, dtype=cfg.dtype, rngs=rngs
        )
        self.wo = BlockDiagLinear(I, H, nb, use_bias=True, dtype=cfg.dtype, rngs=rngs)
        self.layernorm = layer_norm(cfg.layer_norm_eps, H, rngs)

    def __call__(self, x_BxLxH: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        I = self.cfg.intermediate_size
        g_BxLx2I = self.gated_layers(x_BxLxH)
        # The split is on the flattened output: blocks 0..nb/2-1 feed the gelu branch.
        a_BxLxI = jax.nn.gelu(g_BxLx2I[..., :I], approximate=False) * g_BxLx2I[..., I:]
        a_BxLxI = dropout(a_BxLxI, self.cfg.hidden_dropout_prob, dropout_rng)
        o_BxLxH = self.wo(a_BxLxI)
        return self.layernorm(o_BxLxH.astype(jnp.float32) + x_BxLxH.astype(jnp.float32))
