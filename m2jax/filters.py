"""Implicit (Hyena) long-convolution filters, spec section 3.2.

A filter set produces, for any length L <= Lmax, a forward and a reverse kernel of shape (H, L) from
a small MLP with sine activations evaluated at L positions. The positional input `z` is trained;
the time grid `t` and the decay rates `deltas` are fixed constants, held in `FilterConstant`
variables so optimizers skip them. The parameters the reference's yaml gives their own optimizer
settings (spec sections 0 and 5) have their own types, `FilterGroupParam` and
`FilterPositionParam`, which `m2jax.optim` reads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2jax.config import M2BertConfig
from m2jax.sharding import logical_axes


class FilterConstant(nnx.Variable):
    """A fixed array that checkpoints carry as a buffer (`t`, `deltas`); never trained."""


class FilterGroupParam(nnx.Param):
    """The yaml's filter group: the forward MLP's Linear kernels and biases and the shared `freq`.

    Under `param_groups="filter_groups"` these train with `filter_lr` and `filter_weight_decay`.
    The reverse MLP's weights are plain `nnx.Param`: the reference's yaml names only the forward
    MLP (spec section 0).
    """


class FilterPositionParam(nnx.Param):
    """The filters' trained positional input `z`: the yaml's `z` group (`z_lr`, `z_weight_decay`).

    Its own type so the group is declared where `z` is created, not found by name.
    """


def time_grid(max_len: int) -> np.ndarray:
    """`t[l] = l / (Lmax - 1)`: float32 (Lmax,)."""
    return np.linspace(0.0, 1.0, max_len, dtype=np.float32)


def positional_features(max_len: int, emb_dim: int) -> np.ndarray:
    """Initial value of `z`: `[t, cos(f w), -sin(f w)]`, float32 (Lmax, emb_dim).

    The real and imaginary parts of exp(-i f w) with `w[l] = 2 pi l / Lmax` and `bands` frequencies
    f spaced linearly from 1e-4 to bands - 1.
    """
    bands = (emb_dim - 1) // 2
    t_L = time_grid(max_len)
    w_L = 2.0 * math.pi * np.arange(max_len, dtype=np.float32) / max_len
    f_F = np.linspace(1e-4, bands - 1, bands, dtype=np.float32)
    phase_LxF = w_L[:, None] * f_F[None, :]
    return np.concatenate([t_L[:, None], np.cos(phase_LxF), -np.sin(phase_LxF)], axis=-1).astype(
        np.float32
    )


def decay_rates(
    hidden: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2
) -> np.ndarray:
    """`deltas`, float32 (H,): channel c decays to `target` after a fraction of the length that
    goes linearly from `slow_decay_pct` (c = 0) to `fast_decay_pct` (c = H - 1)."""
    return np.linspace(
        math.log(target) / slow_decay_pct,
        math.log(target) / fast_decay_pct,
        hidden,
        dtype=np.float32,
    )


def sine_mlp(
    z_LxE: jax.Array,
    layers: list[tuple[jax.Array, jax.Array | None]],
    freq_O: jax.Array,
    w_mod: float,
) -> jax.Array:
    """The implicit filter MLP: Dense, then `sin(w_mod * freq * x)` after every Dense but the last.

    Args:
      z_LxE: positional features.
      layers: (kernel_inxout, bias_out or None) per Dense layer, Flax kernel layout.
      freq_O: the one frequency vector shared by every Sin of the filter set.
    Returns:
      h_LxH, dtype of the inputs.
    """
    h = z_LxE
    for i, (kernel, bias) in enumerate(layers):
        h = h @ kernel
        if bias is not None:
            h = h + bias
        if i < len(layers) - 1:
            h = jnp.sin(w_mod * freq_O * h)
    return h


class HyenaFilterSet(nnx.Module):
    """One filter set: forward and reverse implicit kernels, and the per-channel skip weight D.

    Parameters: `z` (Lmax, emb_dim), `freq` (order,), `mlp_fwd`/`mlp_rev` (4 Dense each, last without
    bias), `bias_D` (H,). Constants: `t` (Lmax,), `deltas` (H,).
    """

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        H, order, E, L = (
            cfg.hidden_size,
            cfg.hyena_filter_order,
            cfg.hyena_emb_dim,
            cfg.long_conv_l_max,
        )
        self.w_mod = float(cfg.hyena_w_mod)
        self.bidirectional = cfg.bidirectional
        self.dtype = jnp.dtype(cfg.dtype)
        self.z = FilterPositionParam(
            jnp.asarray(positional_features(L, E)), **logical_axes("length", "filter")
        )
        self.t = FilterConstant(jnp.asarray(time_grid(L)), **logical_axes("length"))
        self.deltas = FilterConstant(jnp.asarray(decay_rates(H)), **logical_axes("embed"))
        self.freq = FilterGroupParam(
            jnp.full((order,), cfg.hyena_w, jnp.float32), **logical_axes("filter")
        )
        # D: the reference initialises it from a standard normal.
        self.bias_D = nnx.Param(
            jax.random.normal(rngs.params(), (H,), jnp.float32), **logical_axes("embed")
        )
        self.mlp_fwd = _make_mlp(E, order, H, cfg, rngs, FilterGroupParam)
        self.mlp_rev = _make_mlp(E, order, H, cfg, rngs, nnx.Param) if cfg.bidirectional else None

    def _kernel(self, mlp: nnx.List, seq_len: int) -> jax.Array:
        z_LxE = self.z[...][:seq_len].astype(self.dtype)
        layers = [
            (
                lin.kernel[...].astype(self.dtype),
                None if lin.bias is None else lin.bias[...].astype(self.dtype),
            )
            for lin in mlp
        ]
        *hidden_layers, (kernel_OxH, last_bias) = layers
        assert last_bias is None  # the output Dense has no bias (reference)
        freq_O = self.freq[...].astype(self.dtype)
        # sine_mlp without its output Dense, whose Sin comes after it here: the output Dense is
        # then written as (H, O) x (L, O)^T, so the kernel comes out (H, L) as the convolution
        # wants it, instead of (L, H) and a transposing copy of every filter (about a tenth of
        # the forward at L = 2048 on CPU).
        act_LxO = jnp.sin(self.w_mod * freq_O * sine_mlp(z_LxE, hidden_layers, freq_O, self.w_mod))
        h_HxL = jnp.einsum("oh,lo->hl", kernel_OxH, act_LxO)
        t_1xL = self.t[...][None, :seq_len]
        decay_HxL = jnp.exp(-jnp.abs(self.deltas[...])[:, None] * t_1xL)
        return h_HxL.astype(jnp.float32) * decay_HxL

    def __call__(self, seq_len: int) -> tuple[jax.Array, jax.Array | None]:
        """Returns (k_fwd_HxL, k_rev_HxL or None), float32, for the first `seq_len` positions."""
        if seq_len > self.t.shape[0]:
            raise ValueError(
                f"sequence length {seq_len} exceeds the filters' length {self.t.shape[0]} "
                "(long_conv_l_max)"
            )
        k_rev = self._kernel(self.mlp_rev, seq_len) if self.bidirectional else None
        return self._kernel(self.mlp_fwd, seq_len), k_rev


def _make_mlp(
    emb_dim: int,
    order: int,
    hidden: int,
    cfg: M2BertConfig,
    rngs: nnx.Rngs,
    param_type: type[nnx.Param],
) -> nnx.List:
    # The reference's HF init re-initialises these nn.Linear layers: N(0, initializer_range), bias 0.
    init = nnx.initializers.normal(cfg.initializer_range)
    dims = [
        (emb_dim, order, True, "filter"),
        (order, order, True, "filter"),
        (order, order, True, "filter"),
        (order, hidden, False, "embed"),
    ]
    layers = []
    for i, o, b, out_axis in dims:
        lin = nnx.Linear(
            i,
            o,
            use_bias=b,
            kernel_init=init,
            bias_init=nnx.initializers.zeros,
            param_dtype=jnp.float32,
            kernel_metadata=logical_axes("filter", out_axis),
            bias_metadata=logical_axes(out_axis),
            rngs=rngs,
        )
        if param_type is not nnx.Param:  # nnx.Linear always makes nnx.Param: retype them
            lin.kernel = param_type(lin.kernel.get_value(), **lin.kernel.get_metadata())
            if lin.bias is not None:
                lin.bias = param_type(lin.bias.get_value(), **lin.bias.get_metadata())
        layers.append(lin)
    return nnx.List(layers)
