"""M2-BERT: embeddings, the stack of M2 layers, and the MLM and sequence-classification heads.

Data flow (spec sections 2-3.5): ids -> `Embeddings` -> N x `M2Layer` (`SequenceMixer` then
`GLUDimensionMixer`) -> `MLMHead` (tied decoder), or the pooler + classifier, or the pooler alone
(`M2BertForTextEncoding`, the retrieval models). Dropout runs only when
a `dropout_rng` is passed (training); with none the model is deterministic.

Compiled by default: calling a model (`model(input_ids, token_type_ids=None,
attention_mask=None)`) checks the inputs on the host (integer ids of shape (B, L) with
L <= max_position_embeddings, ids within the vocabulary and token types, matching shapes) and
then runs a cached compiled forward, one compile per input shape and dtype (`compiled_forward`).
The model's current parameters are read at every call, so `nnx.update` is seen at once. The
long-convolution filters, which depend on the weights and L only, are computed once per set of
weights and length and reused by later calls (`m2jax.filter_cache`: memory use and limit).
Inside a caller's own transformation (`jax.jit`, `nnx.jit`, `jax.grad`, ...: the inputs or the parameters
are tracers) the call traces as ordinary code, and only the checks that need no values run
(shape, dtype, length): the id ranges of traced ids cannot be checked there, and out-of-range ids
are then clamped by the embedding lookup instead of raising.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.long_conv_block import FilterSpectrum, prepare_filter
from m2jax import filter_cache
from m2jax.config import M2BertConfig, warn_if_shorter
from m2jax.mixers import GLUDimensionMixer, MixerFilters, SequenceMixer, dense, dropout, layer_norm
from m2jax.sharding import logical_axes


def _fold(rng: jax.Array | None, i: int) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, i)


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _check_ids(name: str, ids: Any, upper: int) -> None:
    """Range check for concrete inputs (under jit the ids are tracers and cannot be inspected)."""
    if _is_traced(ids):
        return
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper}); got values in [{arr.min()}, {arr.max()}]"
        )


def check_inputs(
    cfg: M2BertConfig,
    input_ids: Any,
    token_type_ids: Any | None = None,
    attention_mask: Any | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Host-side checks of a model call; returns (ids, token types, mask) as int arrays (B, L).

    Missing token types are zeros and a missing mask is ones. Raises ValueError naming the
    argument; warns (`warn_if_shorter`) when L < max_position_embeddings.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    L = input_ids.shape[1]
    if L > cfg.max_position_embeddings:
        raise ValueError(
            f"input length {L} exceeds max_position_embeddings {cfg.max_position_embeddings}"
        )
    warn_if_shorter(L, cfg)
    completed = [input_ids]
    for name, arr, fill in (("token_type_ids", token_type_ids, 0), ("attention_mask", attention_mask, 1)):
        arr = jnp.full_like(input_ids, fill) if arr is None else jnp.asarray(arr)
        if arr.shape != input_ids.shape:
            raise ValueError(f"{name} shape {arr.shape} != input_ids shape {input_ids.shape}")
        if not (jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == jnp.bool_):
            raise ValueError(f"{name} must be an integer (or bool) array, got dtype {arr.dtype}")
        completed.append(arr)
    _check_ids("input_ids", input_ids, cfg.vocab_size)
    _check_ids("token_type_ids", completed[1], cfg.type_vocab_size)
    return tuple(completed)


@functools.partial(jax.jit, static_argnums=(0,))
def _compiled_call(method: str, module: nnx.Module, *args: Any) -> Any:
    return getattr(module, method)(*args)


def compiled_forward(module: nnx.Module, method: str, *args: Any) -> Any:
    """``getattr(module, method)(*args, filters)`` through one cached `jax.jit`, or traced in place.

    NNX modules are pytrees: the jit is keyed by the module's structure and static settings (its
    tree definition) and the shapes and dtypes of the arrays, so every model of one configuration
    shares one compile per input shape, and the parameters are arguments, read at every call
    (flattening the 80M model costs about 2 ms; `nnx.split` cost 15-20 ms). When the arguments or
    the module's arrays are tracers (the caller's own jit/grad), the method is called directly and
    traces into the caller's computation, filters included.

    `module` is an `M2BertModel` or a model holding one as `.bert`; `args[0]` the ids (B, L);
    `method` takes the encoder's filters (`M2BertModel.filters`) as its last argument: the
    memoised ones (`filter_cache.memoised_filters`), or None to compute them in the forward.
    """
    if _is_traced((module, args)):
        return getattr(module, method)(*args)
    bert = module if isinstance(module, M2BertModel) else module.bert
    filters = filter_cache.memoised_filters(
        bert, bert.filter_sources(), bert.cfg, args[0].shape[1], _encoder_filters,
        lowering_platform(bert.embeddings.word_embeddings.embedding[...]),
    )
    return _compiled_call(method, module, *args, filters)


def _encoder_filters(
    bert: "M2BertModel", seq_len: int, platform: str
) -> tuple[MixerFilters, ...]:
    return bert.reusable_filters(seq_len, platform)


def lowering_platform(array: Any) -> str:
    """The platform a jitted call on `array` lowers for: "cpu", "cuda", "rocm", "tpu", ...
    (a host array, e.g. numpy, goes to the default device)."""
    device = next(iter(array.devices())) if isinstance(array, jax.Array) else jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


class Embeddings(nnx.Module):
    """`LayerNorm(word[ids] + token_type[types] + position[arange(L)])` (spec section 2)."""

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        H = cfg.hidden_size
        init = nnx.initializers.normal(cfg.initializer_range)
        self.cfg = cfg
        self.word_embeddings = nnx.Embed(
            cfg.vocab_size,
            H,
            embedding_init=init,
            embedding_metadata=logical_axes("vocab", "embed"),
            rngs=rngs,
        )
        # Like torch's padding_idx, the pad row starts at zero.
        self.word_embeddings.embedding[...] = (
            self.word_embeddings.embedding[...].at[cfg.pad_token_id].set(0.0)
        )
        self.position_embeddings = (
            nnx.Embed(
                cfg.max_position_embeddings,
                H,
                embedding_init=init,
                embedding_metadata=logical_axes("length", "embed"),
                rngs=rngs,
            )
            if cfg.use_positional_encodings
            else None
        )
        self.token_type_embeddings = nnx.Embed(
            cfg.type_vocab_size,
            H,
            embedding_init=init,
            embedding_metadata=logical_axes(None, "embed"),
            rngs=rngs,
        )
        self.LayerNorm = layer_norm(cfg.layer_norm_eps, H, rngs)

    def __call__(
        self,
        input_ids_BxL: jax.Array,
        token_type_ids_BxL: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        L = input_ids_BxL.shape[1]
        words_BxLxH = self.word_embeddings(input_ids_BxL)
        # torch's `padding_idx`: looking up [PAD] sends no gradient to its row (the tied decoder
        # still trains it). Same values; only the gradient path of [PAD] positions is cut.
        is_pad_BxLx1 = (input_ids_BxL == self.cfg.pad_token_id)[..., None]
        words_BxLxH = jnp.where(is_pad_BxLx1, jax.lax.stop_gradient(words_BxLxH), words_BxLxH)
        e_BxLxH = words_BxLxH + self.token_type_embeddings(token_type_ids_BxL)
        if self.position_embeddings is not None:
            e_BxLxH = e_BxLxH + self.position_embeddings.embedding[...][:L][None]
        e_BxLxH = self.LayerNorm(e_BxLxH)
        return dropout(e_BxLxH, self.cfg.hidden_dropout_prob, dropout_rng)


class M2Layer(nnx.Module):
    """`layer(x) = DimMixer(SeqMixer(x))`; the only residual and norm are inside DimMixer.

    x (B, L, H), or (B, H, L) with `channels_first`; float32 out in the same layout. With
    `seq_len`, x is token-major (1, H, S * seq_len): S sequences back to back (`SequenceMixer`).
    """

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.attention = SequenceMixer(cfg, rngs=rngs)
        self.mlp = GLUDimensionMixer(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
        filters: MixerFilters | None = None,
        channels_first: bool = False,
        seq_len: int | None = None,
    ) -> jax.Array:
        y = self.attention(
            x, dropout_rng=_fold(dropout_rng, 0), filters=filters, channels_first=channels_first,
            seq_len=seq_len,
        )
        return self.mlp(y, dropout_rng=_fold(dropout_rng, 1), channels_first=channels_first)


class M2BertModel(nnx.Module):
    """Embeddings and the encoder stack; `pooler` only for sequence classification."""

    def __init__(self, cfg: M2BertConfig, *, add_pooler: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([M2Layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        if cfg.same_init_across_layers:
            _copy_deepcopied_weights(self.layers)
        self.pooler = (
            dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs, kernel_axes=("embed", "mlp"))
            if add_pooler
            else None
        )

    def __call__(
        self,
        input_ids_BxL: jax.Array,
        token_type_ids_BxL: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Returns the final hidden states, float32 (B, L, H); inputs checked on the host, then
        the compiled forward (see the module docstring)."""
        ids, types, _ = check_inputs(self.cfg, input_ids_BxL, token_type_ids_BxL)
        return compiled_forward(self, "encode", ids, types, dropout_rng)

    def encode(
        self,
        input_ids_BxL: jax.Array,
        token_type_ids_BxL: jax.Array,
        dropout_rng: jax.Array | None = None,
        filters: tuple[MixerFilters, ...] | None = None,
    ) -> jax.Array:
        """The encoder's computation on checked inputs (ids and types int (B, L)): float32 (B, L, H).

        `filters`: `self.filters(L)` computed beforehand, or None to compute them here.
        """
        e_BxLxH = self.embeddings(
            input_ids_BxL, token_type_ids_BxL, dropout_rng=_fold(dropout_rng, 0)
        )
        B, L, H = e_BxLxH.shape
        # Token-major: the layers run on (1, H, B * L), every token a column, where every matmul
        # is a plain (out, in) x (in, B * L) product and nothing is transposed between the
        # mixers (the convolutions read it as (1, H * B, L), `SequenceMixer`). Taken for one
        # sequence (15% less CPU time at 1 x 2048 than sequence-major) and, for B > 1, where the
        # filters come as spectra (the compiled inference call on CPU, whose XLA paths take
        # spectra: repeating a spectrum per sequence is a broadcast inside its product; 5-6% less
        # time at 8 x 128).
        # Otherwise (training, time-domain filters) the layers run sequence-major, (B, L, H):
        # the train step was 6% slower channels-first, and every implementation would compute
        # B times the spectra of repeated time-domain filters. Same numbers either way.
        token_major = B == 1 or (
            bool(filters) and isinstance(filters[0].gate, FilterSpectrum))
        x = jnp.swapaxes(e_BxLxH.reshape(1, B * L, H), 1, 2) if token_major else e_BxLxH
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                dropout_rng=_fold(dropout_rng, i + 1),
                filters=None if filters is None else filters[i],
                channels_first=token_major,
                seq_len=L if token_major else None,
            )
        if token_major:
            x = jnp.swapaxes(x, 1, 2).reshape(B, L, H)
        return x.astype(jnp.float32)

    def filters(self, seq_len: int) -> tuple[MixerFilters, ...]:
        """Every layer's long-convolution filters for length L (`SequenceMixer.filters`)."""
        return tuple(layer.attention.filters(seq_len) for layer in self.layers)

    def reusable_filters(self, seq_len: int, platform: str) -> tuple[MixerFilters, ...]:
        """`filters(L)` in the form the forward on `platform` takes best when they serve many
        calls (`kernels.long_conv_block.prepare_filter`): the spectra where an XLA path that
        takes them runs (CPU: the dense DFT at L <= 128, else the FFT; two transforms fewer per
        layer and call), else the filters as they are."""
        prepare = functools.partial(prepare_filter, platform=platform, dtype=self.cfg.dtype,
                                    implementation=self.cfg.long_conv_implementation)
        return tuple(
            MixerFilters(prepare(f.gate), None if f.residual is None else prepare(f.residual))
            for f in self.filters(seq_len)
        )

    def filter_sources(self) -> list[tuple[nnx.Module, nnx.Module | None]]:
        """The sub-modules whose arrays `filters` reads: each layer's filter sets."""
        return [(layer.attention.filter_fn, layer.attention.filter_fn2) for layer in self.layers]

    def pool(self, h_BxLxH: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
        """`tanh(dense(p))`, p the first token's state or (`pool_all`) the mask-weighted mean."""
        if self.cfg.pool_all:
            m_BxLx1 = attention_mask_BxL.astype(jnp.float32)[..., None]
            p_BxH = (h_BxLxH * m_BxLx1).sum(axis=1) / m_BxLx1.sum(axis=1)
        else:
            p_BxH = h_BxLxH[:, 0]
        return jnp.tanh(self.pooler(p_BxH).astype(jnp.float32))


def _copy_deepcopied_weights(layers: nnx.List) -> None:
    """The reference deep-copies one layer, so the weights its HF init does not touch (block
    diagonals, short conv, D, z, freq) start equal in every layer (spec section 0)."""

    def shared(layer: M2Layer) -> list[nnx.Variable]:
        mix, mlp = layer.attention, layer.mlp
        out = [
            mix.short_conv_weight,
            mix.short_conv_bias,
            mlp.gated_layers.weight,
            mlp.wo.weight,
            mlp.wo.bias,
        ]
        for f in (mix.filter_fn, mix.filter_fn2):
            if f is not None:
                out += [f.bias_D, f.z, f.freq]
        return out

    first = shared(layers[0])
    for layer in list(layers)[1:]:
        for dst, src in zip(shared(layer), first):
            dst[...] = src[...]


class MLMHead(nnx.Module):
    """`LayerNorm(gelu(x W + b)) @ word_emb.T + b_dec`, decoder tied to the word embeddings."""

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.dense = dense(
            cfg, cfg.hidden_size, cfg.hidden_size, rngs, kernel_axes=("embed", "mlp")
        )
        self.LayerNorm = layer_norm(1e-12, cfg.hidden_size, rngs)
        self.decoder_bias = nnx.Param(
            jnp.zeros((cfg.vocab_size,), jnp.float32), **logical_axes("vocab")
        )
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, h_BxLxH: jax.Array, word_emb_VxH: jax.Array) -> jax.Array:
        t = jax.nn.gelu(self.dense(h_BxLxH), approximate=False)
        t = self.LayerNorm(t.astype(jnp.float32)).astype(self.dtype)
        logits = t @ word_emb_VxH.astype(self.dtype).T
        return logits.astype(jnp.float32) + self.decoder_bias[...]


class _M2BertTask(nnx.Module):
    """What every M2-BERT model with a task head offers besides its computation (`apply`).

    `model(input_ids, token_type_ids=None, attention_mask=None, *, dropout_rng=None)` checks the
    inputs on the host and runs the compiled forward (module docstring): ids int (B, L); token
    types default to zeros, the mask to ones.
    """

    config: M2BertConfig

    @property
    def params(self) -> nnx.State:
        """The trainable parameters (constants such as `t` and `deltas` left out)."""
        return nnx.state(self, nnx.Param)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        ids, types, mask = check_inputs(self.config, input_ids, token_type_ids, attention_mask)
        return compiled_forward(self, "apply", ids, types, mask, dropout_rng)

    def apply(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        attention_mask: jax.Array,
        dropout_rng: jax.Array | None = None,
        filters: tuple[MixerFilters, ...] | None = None,
    ) -> jax.Array:
        """The model's computation on checked, completed inputs (all int (B, L)); `filters` as in
        `M2BertModel.encode`."""
        raise NotImplementedError


class M2BertForMaskedLM(_M2BertTask):
    """M2-BERT with the masked-language-model head.

    `model(input_ids, token_type_ids=None, attention_mask=None)` -> logits float32 (B, L, V).
    The attention mask is accepted for API compatibility and ignored, as in the reference: the
    encoder has no mask and padding takes part in the convolutions.
    """

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.bert = M2BertModel(cfg, add_pooler=False, rngs=rngs)
        self.cls = MLMHead(cfg, rngs=rngs)

    def apply(
        self, input_ids, token_type_ids, attention_mask, dropout_rng=None, filters=None
    ) -> jax.Array:
        del attention_mask  # the reference's M2 encoder ignores it too
        h_BxLxH = self.bert.encode(input_ids, token_type_ids, dropout_rng, filters)
        return self.cls(h_BxLxH, self.bert.embeddings.word_embeddings.embedding[...])


class M2BertForSequenceClassification(_M2BertTask):
    """M2-BERT with a pooler and a linear classifier (regression when `num_labels == 1`).

    `model(input_ids, token_type_ids=None, attention_mask=None)` -> logits float32 (B, num_labels).
    The mask only weights the mean pooling (`pool_all`); `pooled(...)` (same arguments, also
    checked and compiled) returns the pooler output.
    """

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        # Built even when `use_cls_token` bypasses it: the reference always builds the pooler,
        # so its checkpoints carry `bert.pooler.dense.*` (loaded and saved here, unused).
        self.bert = M2BertModel(cfg, add_pooler=True, rngs=rngs)
        self.classifier = dense(
            cfg, cfg.hidden_size, cfg.num_labels, rngs, kernel_axes=("embed", "classes")
        )

    def pooled(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The sentence representation fed to the classifier, float32 (B, H)."""
        ids, types, mask = check_inputs(self.config, input_ids, token_type_ids, attention_mask)
        return compiled_forward(self, "apply_pooled", ids, types, mask, dropout_rng)

    def apply_pooled(
        self, input_ids, token_type_ids, attention_mask, dropout_rng=None, filters=None
    ):
        """`pooled`'s computation on checked, completed inputs."""
        return _sentence_representation(
            self.bert, input_ids, token_type_ids, attention_mask, _fold(dropout_rng, 0), filters
        )

    def apply(
        self, input_ids, token_type_ids, attention_mask, dropout_rng=None, filters=None
    ) -> jax.Array:
        p_BxH = self.apply_pooled(input_ids, token_type_ids, attention_mask, dropout_rng, filters)
        cfg = self.config
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        if not cfg.use_cls_token:  # the reference skips dropout on the raw-CLS path
            p_BxH = dropout(p_BxH, rate, _fold(dropout_rng, 1))
        return self.classifier(p_BxH).astype(jnp.float32)


class M2BertForTextEncoding(_M2BertTask):
    """M2-BERT encoder and pooler without a head: the released long-context retrieval models.

    Those checkpoints are sequence-classification state dicts whose classifier is not used; the
    embedding is the pooler output. `model(input_ids, token_type_ids=None, attention_mask=None)`
    -> float32 (B, H). Pad inputs to `max_position_embeddings`, as the reference does.
    """

    def __init__(self, cfg: M2BertConfig, *, rngs: nnx.Rngs):
        if cfg.use_cls_token:
            raise ValueError(
                "M2BertForTextEncoding embeds with the pooler; use_cls_token must be False"
            )
        self.config = cfg
        self.bert = M2BertModel(cfg, add_pooler=True, rngs=rngs)

    def apply(
        self, input_ids, token_type_ids, attention_mask, dropout_rng=None, filters=None
    ) -> jax.Array:
        return _sentence_representation(
            self.bert, input_ids, token_type_ids, attention_mask, dropout_rng, filters
        )


def _sentence_representation(
    bert: M2BertModel,
    input_ids: jax.Array,
    token_type_ids: jax.Array,
    attention_mask: jax.Array,
    dropout_rng: jax.Array | None,
    filters: tuple[MixerFilters, ...] | None = None,
) -> jax.Array:
    """Pooler output of `bert` (the raw first-token state when `use_cls_token`), float32 (B, H)."""
    h_BxLxH = bert.encode(input_ids, token_type_ids, dropout_rng, filters)
    if bert.cfg.use_cls_token:
        return h_BxLxH[:, 0]
    return bert.pool(h_BxLxH, attention_mask)


class _InitKeys:
    """Hands out `params` keys like `nnx.Rngs`, without a stateful counter.

    Under tracing (`nnx.eval_shape`), every `nnx.Rngs` draw updates a traced counter variable,
    which costs milliseconds each in jax 0.10 (tracer sharding checks); building the 80M model
    abstractly took ~5 s instead of ~0.5 s. Only used for abstract construction.
    """

    def __init__(self, seed: int):
        self._key, self._count = jax.random.key(seed), 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)

    __call__ = params


def abstract_model(model_cls: type, cfg: M2BertConfig) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` in place of arrays: shapes and counts, no memory."""
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=_InitKeys(0)))


def count_params(model: nnx.Module) -> int:
    """Unique trainable parameters (constants like `t`/`deltas` excluded; tied decoder counted once)."""
    return sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    )
