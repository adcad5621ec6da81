"""A Transformer BERT-base in JAX/NNX: the throughput baseline for M2-BERT (not model API).

BERT-base as HF builds it: learned word/position/token-type embeddings + LayerNorm, N post-LN
layers (fused QKV projection, `jax.nn.dot_product_attention`, output projection, residual + LN,
FFN with exact GELU, residual + LN), and the MLM head (dense + GELU + LN, decoder tied to the word
embeddings, bias) on all tokens. Matmuls in the compute dtype, LayerNorm in float32. On GPU with
bf16 the attention goes to cuDNN's flash attention; elsewhere to XLA's plain attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype of matmuls and attention
    attention_implementation: str | None = None  # jax.nn.dot_product_attention's: None/"xla"/"cudnn"


def _dense(cfg: BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)


def _ln(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=rngs)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        H = cfg.hidden_size
        self.cfg = cfg
        self.qkv = _dense(cfg, H, 3 * H, rngs)
        self.attn_out = _dense(cfg, H, H, rngs)
        self.ln1 = _ln(cfg, rngs)
        self.ffn_in = _dense(cfg, H, cfg.intermediate_size, rngs)
        self.ffn_out = _dense(cfg, cfg.intermediate_size, H, rngs)
        self.ln2 = _ln(cfg, rngs)

    def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, L, H = x_BxLxH.shape
        dh = H // cfg.num_heads
        x = x_BxLxH.astype(jnp.dtype(cfg.dtype))
        q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = jnp.split(
            self.qkv(x).reshape(B, L, 3 * cfg.num_heads, dh), 3, axis=2)
        a_BxLxNxD = jax.nn.dot_product_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD,
                                                 implementation=cfg.attention_implementation)
        h = self.ln1(self.attn_out(a_BxLxNxD.reshape(B, L, H)).astype(jnp.float32)
                     + x_BxLxH.astype(jnp.float32))
        f = self.ffn_out(jax.nn.gelu(self.ffn_in(h.astype(x.dtype)), approximate=False))
        return self.ln2(f.astype(jnp.float32) + h)


class BertForMaskedLM(nnx.Module):
    """ids (B, L) int32, token types (B, L) -> MLM logits (B, L, V) in the compute dtype."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        H = cfg.hidden_size
        init = nnx.initializers.normal(cfg.initializer_range)
        self.cfg = cfg
        self.word = nnx.Embed(cfg.vocab_size, H, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, H, embedding_init=init, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, H, embedding_init=init, rngs=rngs)
        self.emb_ln = _ln(cfg, rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.head_dense = _dense(cfg, H, H, rngs)
        self.head_ln = _ln(cfg, rngs)
        self.decoder_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

    def __call__(self, input_ids_BxL: jax.Array, token_type_ids_BxL: jax.Array) -> jax.Array:
        L = input_ids_BxL.shape[1]
        x = (self.word(input_ids_BxL) + self.token_type(token_type_ids_BxL)
             + self.position.embedding[...][:L][None])
        x = self.emb_ln(x)
        for layer in self.layers:
            x = layer(x)
        dt = jnp.dtype(self.cfg.dtype)
        h = self.head_ln(jax.nn.gelu(self.head_dense(x.astype(dt)), approximate=False)
                         .astype(jnp.float32)).astype(dt)
        return h @ self.word.embedding[...].astype(dt).T + self.decoder_bias[...].astype(dt)
