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
from m2jax.sharding import logical_axes

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
def short_causal_conv(p_BxCxL: jax.Array, w_Cx3: jax.Array, b_C: jax.Array) -> jax.Array:
    """Depthwise causal conv of width 3 along L: `s[c, t] = b[c] + sum_j w[c, j] p[c, t - 2 + j]`.

    Equals the reference's Conv1d(groups=C, kernel 3, padding 2) keeping the first L outputs.
    Channels-first: p (B, C, L), w (C, 3), b (C,) -> (B, C, L) in p's dtype. The backward is
    written out (`_short_causal_conv_bwd`): autodiff of the shifted slices materialises one padded
    copy of the cotangent per tap, a few percent of a CPU train step.
    """
    L = p_BxCxL.shape[-1]
    padded = jnp.pad(p_BxCxL, ((0, 0), (0, 0), (2, 0)))
    w = w_Cx3.astype(p_BxCxL.dtype)
    out = b_C.astype(p_BxCxL.dtype)[:, None]
    for j in range(3):
        out = out + w[:, j, None] * padded[..., j : j + L]
    return out


def _short_causal_conv_fwd(p_BxCxL, w_Cx3, b_C):
    return short_causal_conv(p_BxCxL, w_Cx3, b_C), (p_BxCxL, w_Cx3, b_C)


def _short_causal_conv_bwd(res, ds_BxCxL):
    """dp[s] = sum_j w[j] ds[s + 2 - j] (zero past L); dw[j] = sum ds[t] p[t - 2 + j]; db = sum ds."""
    p_BxCxL, w_Cx3, b_C = res
    L = p_BxCxL.shape[-1]
    w = w_Cx3.astype(ds_BxCxL.dtype)
    ds_pad = jnp.pad(ds_BxCxL, ((0, 0), (0, 0), (0, 2)))
    dp = sum(w[:, j, None] * ds_pad[..., 2 - j : 2 - j + L] for j in range(3))
    p_pad = jnp.pad(p_BxCxL, ((0, 0), (0, 0), (2, 0)))
    dw_Cx3 = jnp.stack(
        [jnp.sum(ds_BxCxL * p_pad[..., j : j + L], axis=(0, 2)) for j in range(3)], axis=-1
    )
    db = jnp.sum(ds_BxCxL, axis=(0, 2))
    return dp.astype(p_BxCxL.dtype), dw_Cx3.astype(w_Cx3.dtype), db.astype(b_C.dtype)


short_causal_conv.defvjp(_short_causal_conv_fwd, _short_causal_conv_bwd)


def layer_norm(eps: float, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # LayerNorm always computes in float32 (spec section 8), whatever the compute dtype. Every
    # LayerNorm of the model normalises the width H.
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_metadata=logical_axes("embed"),
        bias_metadata=logical_axes("embed"),
        rngs=rngs,
    )


def dense(
    cfg: M2BertConfig,
    d_in: int,
    d_out: int,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    *,
    kernel_axes: tuple[str | None, str | None],
    bias_axis: str | None = None,
) -> nnx.Linear:
    """A Linear with the HF BERT init (N(0, initializer_range), zero bias) and the compute dtype.

    `kernel_axes` are the logical axes of the (d_in, d_out) kernel; the bias is replicated unless
    `bias_axis` names one.
    """
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        bias_init=nnx.initializers.zeros,
        kernel_metadata=logical_axes(*kernel_axes),
        bias_metadata=logical_axes(bias_axis),
        rngs=rngs,
    )


class BlockDiagLinear(nnx.Module):
    """y = blockdiag(W) x (+ b), weight (nb, out/nb, in/nb) as the reference stores it.

    With `nblocks=1` this is a dense layer stored as (1, out, in). `weight_axes` are the weight's
    logical axes; the bias is replicated.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        nblocks: int,
        *,
        use_bias: bool,
        dtype: str,
        weight_axes: tuple[str, str, str],
        rngs: nnx.Rngs,
    ):
        in_blk, out_blk = d_in // nblocks, d_out // nblocks
        # The reference initialises the dense equivalent with kaiming-uniform(a=sqrt(5)), i.e.
        # U(+-1/sqrt(in)), then scales by sqrt(nblocks) because the matrix is sparse.
        bound = 1.0 / math.sqrt(in_blk)
        self.weight = nnx.Param(
            jax.random.uniform(
                rngs.params(), (nblocks, out_blk, in_blk), jnp.float32, -bound, bound
            ),
            **logical_axes(*weight_axes),
        )
        bias_bound = 1.0 / math.sqrt(d_out)
        self.bias = (
            nnx.Param(
                jax.random.uniform(rngs.params(), (d_out,), jnp.float32, -bias_bound, bias_bound),
                **logical_axes(None),
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
        self.in_linear = dense(cfg, H, 3 * H, rngs, kernel_axes=("embed", "mlp"), bias_axis="mlp")
        # torch Conv1d default init: U(+-1/sqrt(fan_in)), fan_in = kernel width 3 (depthwise).
        bound = 1.0 / math.sqrt(3.0)
        self.short_conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (3 * H, 3), jnp.float32, -bound, bound),
            **logical_axes("mlp", None),
        )
        self.short_conv_bias = nnx.Param(
            jax.random.uniform(rngs.params(), (3 * H,), jnp.float32, -bound, bound),
            **logical_axes("mlp"),
        )
        self.filter_fn = HyenaFilterSet(cfg, rngs=rngs)
        self.filter_fn2 = HyenaFilterSet(cfg, rngs=rngs) if cfg.residual_long_conv else None
        self.out_linear = dense(cfg, H, H, rngs, kernel_axes=("mlp", "embed"))

    def __call__(self, u_BxLxH: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """(B, L, H) -> (B, L, H) in the compute dtype.

        Computed channels-first from the input projection to the output projection: the long
        convolutions run along L (the last axis), x1, x2 and v are contiguous slices, and no
        transposing copy of the 3H-wide activations is made (about 5% of a CPU forward at
        L = 2048). Parameters keep their stored layouts.
        """
        compute = jnp.dtype(self.cfg.dtype)
        rate = self.cfg.sequence_mixer_dropout_prob
        rng_v, rng_y = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        if self.layernorm is not None:
            u_BxLxH = self.layernorm(u_BxLxH.astype(jnp.float32))
        u_BxLxH = u_BxLxH.astype(compute)
        H = u_BxLxH.shape[-1]
        p_Bx3HxL = _project(u_BxLxH, self.in_linear, "blh,hc->bcl", compute)
        s_Bx3HxL = short_causal_conv(
            p_Bx3HxL, self.short_conv_weight[...], self.short_conv_bias[...]
        )
        x1, x2, v = s_Bx3HxL[:, :H], s_Bx3HxL[:, H : 2 * H], s_Bx3HxL[:, 2 * H :]
        if self.cfg.hyena_training_additions:
            # dropout(v * x1) == v * dropout(x1): same shape and rng, hence the same mask.
            x1 = dropout(x1, rate, rng_v)
        y_BxHxL = self._long_conv_block(x1, x2, v, u_BxLxH).astype(compute)
        if self.cfg.hyena_training_additions:
            y_BxHxL = dropout(y_BxHxL, rate, rng_y)
        return _project(y_BxHxL, self.out_linear, "bhl,hk->blk", compute)

    def _long_conv_block(
        self, x1_BxHxL: jax.Array, x2_BxHxL: jax.Array, v_BxHxL: jax.Array, u_BxLxH: jax.Array
    ) -> jax.Array:
        """Steps 4-7 of spec 3.1 in one `kernels.long_conv_block` call; (B, H, L) out."""
        L = v_BxHxL.shape[-1]
        k_fwd, k_rev = self.filter_fn(L)
        gate = ConvFilter(k_fwd, k_rev, self.filter_fn.bias_D[...])
        u_BxHxL, residual = None, None
        if self.filter_fn2 is not None:
            g_fwd, g_rev = self.filter_fn2(L)
            u_BxHxL = jnp.swapaxes(u_BxLxH, 1, 2)
            residual = ConvFilter(g_fwd, g_rev, self.filter_fn2.bias_D[...])
        return long_conv_block(
            x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual,
            implementation=self.cfg.long_conv_implementation,
        )


def _project(x: jax.Array, linear: nnx.Linear, subscripts: str, dtype: jnp.dtype) -> jax.Array:
    """`linear` (kernel (in, out), bias (out,)) applied along `subscripts`, so that the output
    can be channels-first ("blh,hc->bcl") or come back from it ("bhl,hk->blk")."""
    y = jnp.einsum(subscripts, x.astype(dtype), linear.kernel[...].astype(dtype))
    bias = linear.bias[...].astype(dtype)
    return y + (bias[:, None] if subscripts.endswith("cl") else bias)


class GLUDimensionMixer(nnx.Module):
    """Block-diagonal GLU MLP with a residual and post-LayerNorm (spec 3.4)."""

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        H, I = cfg.hidden_size, cfg.intermediate_size
        nb = cfg.monarch_mlp_nblocks if cfg.use_monarch_mlp else 1
        self.cfg = cfg
        # Weights are (nb, out/nb, in/nb): "block_in" is the model-width (H) side of both.
        self.gated_layers = BlockDiagLinear(
            H,
            2 * I,
            nb,
            use_bias=False,
            dtype=cfg.dtype,
            weight_axes=("blocks", "block_out", "block_in"),
            rngs=rngs,
        )
        self.wo = BlockDiagLinear(
            I,
            H,
            nb,
            use_bias=True,
            dtype=cfg.dtype,
            weight_axes=("blocks", "block_in", "block_out"),
            rngs=rngs,
        )
        self.layernorm = layer_norm(cfg.layer_norm_eps, H, rngs)

    def __call__(self, x_BxLxH: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        I = self.cfg.intermediate_size
        g_BxLx2I = self.gated_layers(x_BxLxH)
        # The split is on the flattened output: blocks 0..nb/2-1 feed the gelu branch.
        a_BxLxI = jax.nn.gelu(g_BxLx2I[..., :I], approximate=False) * g_BxLx2I[..., I:]
        a_BxLxI = dropout(a_BxLxI, self.cfg.hidden_dropout_prob, dropout_rng)
        o_BxLxH = self.wo(a_BxLxI)
        return self.layernorm(o_BxLxH.astype(jnp.float32) + x_BxLxH.astype(jnp.float32))
