"""The two mixers of an M2 layer: the sequence mixer (spec 3.1) and the GLU dimension mixer (3.4)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.long_conv_block import ConvFilter, FilterSpectrum, long_conv_block
from m2jax.config import M2BertConfig
from m2jax.filters import HyenaFilterSet
from m2jax.monarch import blockdiag_matmul, blockdiag_matmul_channels_first
from m2jax.sharding import logical_axes

class MixerFilters(NamedTuple):
    """The long-convolution filters of one sequence mixer (`SequenceMixer.filters`), or their
    spectra where those are reused across calls (`M2BertModel.reusable_filters`)."""

    gate: ConvFilter | FilterSpectrum
    residual: ConvFilter | FilterSpectrum | None


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

    def __call__(self, x: jax.Array, *, channels_first: bool = False) -> jax.Array:
        """(..., in) -> (..., out); with `channels_first`, (B, in, L) -> (B, out, L)."""
        w = self.weight[...].astype(self.dtype)
        if channels_first:
            y = blockdiag_matmul_channels_first(x.astype(self.dtype), w)
        else:
            y = blockdiag_matmul(x.astype(self.dtype), w)
        if self.bias is not None:
            bias = self.bias[...].astype(self.dtype)
            y = y + (bias[:, None] if channels_first else bias)
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

    def __call__(
        self,
        u: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
        filters: MixerFilters | None = None,
        channels_first: bool = False,
        seq_len: int | None = None,
    ) -> jax.Array:
        """u (B, L, H) -> (B, L, H), or with `channels_first` (B, H, L) -> (B, H, L); compute dtype.

        `filters`: this mixer's `filters(L)`, computed beforehand (the compiled inference call
        reuses them across calls, `m2jax.filter_cache`); None computes them here.
        `seq_len`: token-major input, channels-first (1, H, S * seq_len) holding S sequences of
        `seq_len` tokens back to back (`M2BertModel.encode`); None: each row is one sequence.

        Channels-first from the input projection to the output projection in both layouts: the
        long convolutions run along L (the last axis) and x1, x2 and v are contiguous slices.
        With channels-first input (the encoder's layout at batch size 1, `M2BertModel.encode`)
        the projections are plain (out, in) x (in, L) matmuls and nothing is transposed.
        Parameters keep their stored layouts.
        """
        if seq_len is not None and not (
            channels_first and u.shape[0] == 1 and u.shape[2] % seq_len == 0):
            raise ValueError(
                f"seq_len={seq_len} asks for token-major input, channels-first (1, H, S * "
                f"seq_len); got {'channels-first' if channels_first else 'sequence-major'} "
                f"input of shape {tuple(u.shape)}")
        compute = jnp.dtype(self.cfg.dtype)
        rate = self.cfg.sequence_mixer_dropout_prob
        rng_v, rng_y = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        if self.layernorm is not None:
            u = _layer_norm(self.layernorm, u, channels_first)
        u = u.astype(compute)
        H = self.cfg.hidden_size
        p_Bx3HxL = _project(u, self.in_linear, "bil,io->bol" if channels_first else "blh,hc->bcl",
                            compute)
        conv_weight, conv_bias = self.short_conv_weight[...], self.short_conv_bias[...]
        if filters is None:
            filters = self.filters(p_Bx3HxL.shape[2] if seq_len is None else seq_len)
        u_BxHxL = None
        if filters.residual is not None:
            u_BxHxL = u if channels_first else jnp.swapaxes(u, 1, 2)
        seqs = 1 if seq_len is None else p_Bx3HxL.shape[2] // seq_len
        if seqs > 1:
            # Token-major: (1, C, S * L) read as (1, C * S, L) (a reshape, no copy), one row per
            # (channel, sequence), so both convolutions run along the rows as in the (B, C, L)
            # layout; each channel's parameters are repeated for its S rows.
            p_Bx3HxL, u_BxHxL = (
                None if a is None else a.reshape(1, -1, seq_len) for a in (p_Bx3HxL, u_BxHxL))
            conv_weight, conv_bias, filters = jax.tree.map(
                lambda a: jnp.repeat(a, seqs, axis=0), (conv_weight, conv_bias, filters))
        s_Bx3HxL = short_causal_conv(p_Bx3HxL, conv_weight, conv_bias)
        Hs = H * seqs
        x1, x2, v = s_Bx3HxL[:, :Hs], s_Bx3HxL[:, Hs : 2 * Hs], s_Bx3HxL[:, 2 * Hs :]
        if self.cfg.hyena_training_additions:
            # dropout(v * x1) == v * dropout(x1): same shape and rng, hence the same mask.
            x1 = dropout(x1, rate, rng_v)
        y_BxHxL = long_conv_block(
            x1, x2, v, filters.gate, u_BxHxL, filters.residual,
            implementation=self.cfg.long_conv_implementation,
        ).astype(compute)
        if self.cfg.hyena_training_additions:
            y_BxHxL = dropout(y_BxHxL, rate, rng_y)
        if seqs > 1:
            y_BxHxL = y_BxHxL.reshape(1, H, seqs * seq_len)
        return _project(y_BxHxL, self.out_linear,
                        "bil,io->bol" if channels_first else "bhl,hk->blk", compute)

    def filters(self, seq_len: int) -> MixerFilters:
        """The block's filters for length L: the gate's `ConvFilter` (kernels (H, L) float32, D
        (H,)) and the residual's (None without `residual_long_conv`). A function of the
        parameters and L only, not of the input."""
        k_fwd, k_rev = self.filter_fn(seq_len)
        gate = ConvFilter(k_fwd, k_rev, self.filter_fn.bias_D[...])
        if self.filter_fn2 is None:
            return MixerFilters(gate, None)
        g_fwd, g_rev = self.filter_fn2(seq_len)
        return MixerFilters(gate, ConvFilter(g_fwd, g_rev, self.filter_fn2.bias_D[...]))


def _project(x: jax.Array, linear: nnx.Linear, subscripts: str, dtype: jnp.dtype) -> jax.Array:
    """`linear` (kernel (in, out), bias (out,)) applied along `subscripts`: into channels-first
    ("blh,hc->bcl"), back from it ("bhl,hk->blk") or within it ("bil,io->bol")."""
    # Activations as the first operand: then XLA:CPU runs "bil,io->bol" at B = 1 as a plain
    # (out, in) x (in, L) matmul; with the weight first it inserted a transposing copy of x.
    y = jnp.einsum(subscripts, x.astype(dtype), linear.kernel[...].astype(dtype))
    bias = linear.bias[...].astype(dtype)
    return y + (bias[:, None] if subscripts.endswith("l") else bias)


def _layer_norm(ln: nnx.LayerNorm, x: jax.Array, channels_first: bool) -> jax.Array:
    """`ln` over the channel axis: the last one, or axis 1 of (B, H, L); float32."""
    return layer_norm_over_channels(ln, x) if channels_first else ln(x.astype(jnp.float32))


def layer_norm_over_channels(ln: nnx.LayerNorm, x_BxHxL: jax.Array) -> jax.Array:
    """`ln` (its scale, bias and epsilon) normalising axis 1 of (B, H, L): float32 (B, H, L).

    Mean and variance in float32, the variance as the mean squared deviation (two passes, as
    torch's LayerNorm), spec section 8.
    """
    x = x_BxHxL.astype(jnp.float32)
    mean = jnp.mean(x, axis=1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + ln.epsilon)
    return y * ln.scale[...].astype(jnp.float32)[:, None] + ln.bias[...].astype(jnp.float32)[:, None]


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

    def __call__(
        self, x: jax.Array, *, dropout_rng: jax.Array | None = None, channels_first: bool = False
    ) -> jax.Array:
        """(B, L, H) -> float32 (B, L, H), or with `channels_first` (B, H, L) -> (B, H, L).

        Channels-first, each block of both block-diagonal layers is a plain (out, in) x (in, L)
        matmul on a contiguous slab of rows and the GELU and gate halves are contiguous.
        """
        I = self.cfg.intermediate_size
        g = self.gated_layers(x, channels_first=channels_first)
        # The split is on the flattened output: blocks 0..nb/2-1 feed the gelu branch.
        gelu_half, gate_half = (g[:, :I], g[:, I:]) if channels_first else (g[..., :I], g[..., I:])
        a = jax.nn.gelu(gelu_half, approximate=False) * gate_half
        a = dropout(a, self.cfg.hidden_dropout_prob, dropout_rng)
        o = self.wo(a, channels_first=channels_first)
        return _layer_norm(self.layernorm, o.astype(jnp.float32) + x.astype(jnp.float32),
                           channels_first)
