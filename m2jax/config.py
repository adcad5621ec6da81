"""M2-BERT hyper-parameters, named as in the reference's `config.json` files.

Field names follow the PyTorch reference (HazyResearch/m2, `bert/src/configuration_bert.py` plus the
HF `BertConfig` fields it inherits) so that a released `config.json` maps onto `M2BertConfig` one to
one. Fields that only m2jax has are grouped at the end and never written to `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import warnings
from typing import Any, Mapping

from kernels.long_conv_block import IMPLEMENTATIONS as LONG_CONV_IMPLEMENTATIONS

# The tokenizer (bert-base-uncased WordPiece) has 30522 tokens; the released checkpoints pad the
# embedding table and decoder bias to a multiple of 8 (spec section 0).
TOKENIZER_VOCAB_SIZE = 30522
RELEASED_VOCAB_SIZE = 30528


@dataclasses.dataclass(frozen=True)
class M2BertConfig:
    """Hyper-parameters of an M2-BERT model. Defaults are M2-BERT-base 80M (spec section 1)."""

    vocab_size: int = TOKENIZER_VOCAB_SIZE  # rows of the word-embedding table and decoder bias
    hidden_size: int = 768  # H, d_model
    num_hidden_layers: int = 12
    intermediate_size: int = 3072  # I, width of each GLU branch
    max_position_embeddings: int = 128  # Lmax: position table rows; inputs are padded to this
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12  # every LayerNorm except the `hyena_training_additions` one
    hidden_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob
    initializer_range: float = 0.02  # std of Linear/Embedding init (HF BERT init)
    pad_token_id: int = 0
    # Sequence mixer (spec section 3).
    long_conv_l_max: int = (
        128  # length the implicit filters are built for (= max_position_embeddings)
    )
    long_conv_kernel_learning_rate: float = 1e-3  # per-group lr the yaml intends (optimizer option)
    hyena_lr_pos_emb: float = 1e-5  # lr of the filters' positional input `z` (optimizer option)
    hyena_w: float = 10.0  # initial Sin frequency
    hyena_w_mod: float = 1.0  # fixed multiplier inside Sin
    hyena_wd: float = 0.1  # weight decay of the implicit filter MLP (optimizer option)
    hyena_emb_dim: int = 5  # width of the filters' positional input: t plus (emb_dim-1)/2 bands
    hyena_filter_order: int = 128  # width of the implicit filter MLP
    hyena_filter_dropout: float = (
        0.0  # accepted for config compatibility; the reference never applies it
    )
    bidirectional: bool = True  # add the anti-causal kernel (spec 3.3)
    residual_long_conv: bool = True  # second filter set on the mixer's input (spec 3.1 step 6)
    hyena_training_additions: bool = False  # extra LayerNorm and dropouts in the mixer (spec 3.6)
    # Dimension mixer.
    use_glu_mlp: bool = True
    use_monarch_mlp: bool = True  # block-diagonal GLU weights; False means dense ones
    monarch_mlp_nblocks: int = 4
    use_positional_encodings: bool = True  # learned absolute positions
    # Heads.
    num_labels: int = 2  # sequence classification; 1 means regression (STS-B)
    pool_all: bool = False  # classification pooling: False -> first token, True -> masked mean
    use_cls_token: bool = False  # classify the raw first-token state (no pooler dense+tanh)
    # m2jax only (not part of config.json).
    dtype: str = "float32"  # compute dtype of matmuls: "float32" or "bfloat16"; params stay float32
    # How the gated long-convolution block runs: kernels.long_conv_block.IMPLEMENTATIONS. "auto"
    # picks per platform (Triton kernel on CUDA, the faster XLA path on CPU, the TPU path on TPU);
    # "xla_fft", "xla_monarch" (DFT as matmuls), "xla_dense_dft" (L <= 128), "pallas_triton",
    # "pallas_mosaic_tpu" name one path everywhere.
    long_conv_implementation: str = "auto"
    same_init_across_layers: bool = False  # reproduce the reference's deepcopy init quirk (spec 0)
    # Dropout on `v` and `y` inside the mixer when hyena_training_additions is on (spec 3.6). The
    # reference builds that dropout without passing a rate, so it is 0.0 in every released run.
    sequence_mixer_dropout_prob: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_filter_bands(self) -> int:
        return (self.hyena_emb_dim - 1) // 2

    def replace(self, **changes: Any) -> "M2BertConfig":
        return dataclasses.replace(self, **changes)


M2JAX_ONLY_FIELDS = (
    "dtype",
    "long_conv_implementation",
    "same_init_across_layers",
    "sequence_mixer_dropout_prob",
)

# `architectures` entries m2jax writes, one per model class (the text encoder is the retrieval
# models' encoder + pooler, named as in their own hub code).
ARCHITECTURES = ("BertForMaskedLM", "BertForSequenceClassification", "BertForTextEncoding")
TEXT_ENCODER_ARCHITECTURE = "BertForTextEncoding"

# Reference fields that select code paths m2jax does not implement, with the value it needs.
_REQUIRED_REFERENCE_VALUES = {
    "monarch_mixer_sequence_mixing": True,
    "use_flash_mm": False,
    "sequence_token_planting": False,
    "attention_pooling": False,
    "expand_positional_embeddings": False,
}
# Other fields of the reference's config.json files (bert/src/configuration_bert.py, the yamls'
# model_config, bert_layers.py): accepted, and without effect on the m2jax model.
_OTHER_REFERENCE_FIELDS = frozenset(
    {
        "alibi_starting_size",
        "use_flash_fft",  # a CUDA kernel choice; m2jax picks its own (long_conv_implementation)
        "gather_sentence_embeddings",
        "use_normalized_embeddings",
        "performing_BEIR_evaluation",
        "use_learnable_monarch",
        "precision",
        "pretrained_checkpoint",
        "hidden_act",
        "num_attention_heads",
        "attention_probs_dropout_prob",
        "position_embedding_type",
    }
)
# Bookkeeping of Hugging Face `PretrainedConfig` / `BertConfig` (transformers 4 and 5).
_HF_FIELDS = frozenset(
    """_name_or_path _commit_hash _attn_implementation _attn_implementation_autoset
    add_cross_attention architectures auto_map bad_words_ids begin_suppress_tokens bos_token_id
    chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id diversity_penalty
    do_sample dtype early_stopping encoder_no_repeat_ngram_size eos_token_id
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id
    gradient_checkpointing id2label is_decoder is_encoder_decoder label2id length_penalty
    max_length min_length model_type no_repeat_ngram_size num_beam_groups num_beams
    num_return_sequences output_attentions output_hidden_states output_scores prefix problem_type
    pruned_heads quantization_config remove_invalid_values repetition_penalty return_dict
    return_dict_in_generate sep_token_id suppress_tokens task_specific_params temperature
    tf_legacy_loss tie_encoder_decoder tie_word_embeddings tokenizer_class top_k top_p torch_dtype
    torchscript transformers_version typical_p use_bfloat16 use_cache""".split()
)

_PROBABILITIES = (
    "hidden_dropout_prob",
    "classifier_dropout",
    "hyena_filter_dropout",
    "sequence_mixer_dropout_prob",
)
_POSITIVE_INTS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "max_position_embeddings",
    "long_conv_l_max",
    "vocab_size",
    "hyena_filter_order",
    "type_vocab_size",
    "monarch_mlp_nblocks",
    "num_labels",
)
_NON_NEGATIVE = (
    "initializer_range",
    "long_conv_kernel_learning_rate",
    "hyena_lr_pos_emb",
    "hyena_wd",
)
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (its one concrete type, whether None is allowed), from the annotations."""
    out = {}
    for name, hint in typing.get_type_hints(M2BertConfig).items():
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
        out[name] = (kinds[0], type(None) in typing.get_args(hint))
    return out


_FIELD_TYPES = _field_types()


def _short_repr(value: Any) -> str:
    if isinstance(value, int) and abs(value) > 10**30:
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:  # JSON writes 10.0 as 10: integers are numbers too
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_problem(name: str, value: Any, kind: type, optional: bool = False) -> str | None:
    if (value is None and optional) or _is_kind(value, kind):
        return None
    expected = _TYPE_WORDS[kind] + (" or null" if optional else "")
    return f"{name} must be {expected}, got {_short_repr(value)} ({type(value).__name__})"


def _range_problems(cfg: M2BertConfig) -> list[str]:
    problems = []
    for name in _POSITIVE_INTS:
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be positive, got {getattr(cfg, name)}")
    for name, (kind, _) in _FIELD_TYPES.items():
        value = getattr(cfg, name)
        if kind is float and value is not None and not math.isfinite(value):
            problems.append(f"{name} must be a finite number, got {value}")
    if problems:
        return problems  # the checks below assume finite, positive sizes
    if not cfg.layer_norm_eps > 0:
        problems.append(
            f"layer_norm_eps must be > 0 (it keeps LayerNorm finite), got {cfg.layer_norm_eps}"
        )
    for name in _PROBABILITIES:
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < 1:
            problems.append(f"{name} must lie in [0, 1), got {value}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        problems.append(
            f"pad_token_id must lie in [0, vocab_size={cfg.vocab_size}), got {cfg.pad_token_id}"
        )
    return problems


# Values of `long_conv_implementation` before kernels.long_conv_block, and what replaced them.
_RENAMED_LONG_CONV_IMPLEMENTATIONS = {
    "fft": "'xla_fft'",
    "monarch": "'xla_monarch'",
    "pallas": "'pallas_triton'",
    "direct": "'xla_fft' or 'xla_monarch' (the O(L^2) sum is only the tests' reference now)",
}


def _validate(cfg: M2BertConfig) -> None:
    problems = [
        p
        for name, (kind, optional) in _FIELD_TYPES.items()
        if (p := _type_problem(name, getattr(cfg, name), kind, optional))
    ]
    if not problems:
        problems = _range_problems(cfg)
    if not problems:
        problems = _architecture_problems(cfg)
    if problems:
        raise ValueError("Invalid M2BertConfig: " + "; ".join(problems))


def _architecture_problems(cfg: M2BertConfig) -> list[str]:
    problems = []
    if cfg.hidden_size % cfg.monarch_mlp_nblocks or cfg.intermediate_size % cfg.monarch_mlp_nblocks:
        problems.append(
            f"hidden_size ({cfg.hidden_size}) and intermediate_size ({cfg.intermediate_size}) must be "
            f"multiples of monarch_mlp_nblocks ({cfg.monarch_mlp_nblocks})"
        )
    if cfg.hyena_emb_dim < 3 or cfg.hyena_emb_dim % 2 == 0:
        problems.append(f"hyena_emb_dim must be odd and >= 3, got {cfg.hyena_emb_dim}")
    if cfg.long_conv_l_max != cfg.max_position_embeddings:
        problems.append(
            f"long_conv_l_max ({cfg.long_conv_l_max}) must equal max_position_embeddings "
            f"({cfg.max_position_embeddings}): the filters and positions cover the same length"
        )
    if not cfg.use_glu_mlp:
        problems.append(
            "use_glu_mlp=False (the plain BERT MLP) is not implemented; M2 uses the GLU"
        )
    if cfg.long_conv_implementation not in LONG_CONV_IMPLEMENTATIONS:
        renamed = _RENAMED_LONG_CONV_IMPLEMENTATIONS.get(cfg.long_conv_implementation)
        problems.append(
            f"long_conv_implementation must be one of {LONG_CONV_IMPLEMENTATIONS}, got "
            f"{cfg.long_conv_implementation!r}"
            + (f" (renamed: use {renamed})" if renamed else "")
        )
    if cfg.dtype not in ("float32", "bfloat16"):
        problems.append(f"dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    return problems


def config_from_dict(
    raw: Mapping[str, Any], *, source: str = "config.json", **overrides: Any
) -> M2BertConfig:
    """Builds a config from a reference/HF `config.json` dict, checking every field.

    Each M2BertConfig field must have its type (`"hidden_size": "32"` or `"pool_all": "false"` is
    an error, not a silent conversion) and a sensible value; errors name `source` (the file) and
    the field. Hugging Face bookkeeping (`architectures`, `id2label`, `transformers_version`, ...)
    and the reference's other fields are accepted; any other field is ignored with a warning
    naming it, as it is probably misspelt. `monarch_mixer_sequence_mixing` is forced on: HF
    `config.json` files of the released models omit it although the models use the M2 mixer
    (spec section 0). `overrides` (M2BertConfig fields) replace values from the file.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{source}: expected a JSON object of config fields, got {type(raw).__name__}"
        )
    problems = []
    for key, needed in _REQUIRED_REFERENCE_VALUES.items():
        if key in raw:
            if (p := _type_problem(key, raw[key], bool)) is not None:
                problems.append(p)
            elif raw[key] != needed:
                problems.append(f"{key} is {raw[key]!r}; m2jax supports only {key}={needed}")
    if raw.get("hidden_act", "gelu") not in ("gelu", "gelu_new_erf"):
        problems.append(
            f"hidden_act is {_short_repr(raw['hidden_act'])}; M2-BERT uses exact 'gelu'"
        )
    names = [f.name for f in dataclasses.fields(M2BertConfig) if f.name not in M2JAX_ONLY_FIELDS]
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        kind, optional = _FIELD_TYPES[name]
        if (p := _type_problem(name, raw[name], kind, optional)) is not None:
            problems.append(p)
        else:
            kwargs[name] = raw[name]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    known = set(names) | set(_REQUIRED_REFERENCE_VALUES) | _OTHER_REFERENCE_FIELDS | _HF_FIELDS
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        warnings.warn(
            f"{source}: ignoring fields m2jax does not know: "
            + ", ".join(_with_suggestion(k, names) for k in unknown),
            stacklevel=2,
        )
    if "long_conv_l_max" not in raw and "max_position_embeddings" in kwargs:
        kwargs["long_conv_l_max"] = kwargs["max_position_embeddings"]
    if isinstance(raw.get("id2label"), Mapping) and "num_labels" not in raw:
        kwargs["num_labels"] = len(raw["id2label"])
    kwargs.update(overrides)
    try:
        return M2BertConfig(**kwargs)
    except ValueError as e:
        also = f" and the overrides {sorted(overrides)}" if overrides else ""
        raise ValueError(f"{source}{also}: {e}") from None


def _with_suggestion(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
    return f"{key} (did you mean {close[0]}?)" if close else key


def config_to_dict(cfg: M2BertConfig, architecture: str = "BertForMaskedLM") -> dict[str, Any]:
    """The `config.json` dict the PyTorch reference builds `architecture` from.

    Every M2BertConfig field except the m2jax-only ones, plus each attribute the reference's
    model code reads that its `BertConfig` does not define (tests/fixtures/export: the reference
    builds every architecture from a file this function wrote). The text encoder is the
    reference's retrieval layout: `BertForSequenceClassification` with
    `gather_sentence_embeddings`, whose output is the pooler's.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    out = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in M2JAX_ONLY_FIELDS
    }
    out.update(_REQUIRED_REFERENCE_VALUES)
    out.update(
        architectures=[architecture],
        model_type="bert",
        hidden_act="gelu",
        attention_probs_dropout_prob=0.0,
        num_attention_heads=12,  # read by the reference, unused by its M2 mixer
        use_flash_fft=False,
        gather_sentence_embeddings=architecture == TEXT_ENCODER_ARCHITECTURE,
        use_normalized_embeddings=False,
        performing_BEIR_evaluation=False,
    )
    return out


def _m2_base(**overrides: Any) -> M2BertConfig:
    return M2BertConfig(**overrides)


def _long(max_len: int) -> M2BertConfig:
    return M2BertConfig(
        vocab_size=RELEASED_VOCAB_SIZE, max_position_embeddings=max_len, long_conv_l_max=max_len
    )


# Named model configs (spec section 1). Vocab 30522 is the tokenizer's; the released checkpoints
# carry 30528, which `from_pretrained` reads from their config.json.
MODEL_CONFIGS = {
    "m2-bert-base-80m": lambda: _m2_base(),
    "m2-bert-base-80m-released": lambda: _m2_base(
        vocab_size=RELEASED_VOCAB_SIZE, hyena_training_additions=True
    ),
    "m2-bert-base-110m": lambda: _m2_base(hidden_size=960, intermediate_size=3840),
    "m2-bert-large-260m": lambda: _m2_base(hidden_size=1536, intermediate_size=6144),
    "m2-bert-large-341m": lambda: _m2_base(hidden_size=1792, intermediate_size=7168),
    "m2-bert-80m-2k": lambda: _long(2048),
    "m2-bert-80m-8k": lambda: _long(8192),
    "m2-bert-80m-32k": lambda: _long(32768),
    # For tests: every feature on, a few thousand parameters per layer.
    "tiny": lambda: M2BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=16,
        long_conv_l_max=16,
        hyena_filter_order=8,
    ),
    # `tiny` with the released vocabulary (30528 rows), so the real tokenizer's ids fit: for
    # end-to-end tests of fill-mask and embedding. 32 positions hold a short sentence.
    "tiny-real-vocab": lambda: MODEL_CONFIGS["tiny"]().replace(
        vocab_size=RELEASED_VOCAB_SIZE, max_position_embeddings=32, long_conv_l_max=32
    ),
}


def get_model_config(name: str, **overrides: Any) -> M2BertConfig:
    """Returns the named config (see MODEL_CONFIGS), with field overrides."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}")
    cfg = MODEL_CONFIGS[name]()
    return cfg.replace(**overrides) if overrides else cfg


def warn_if_shorter(seq_len: int, cfg: M2BertConfig) -> None:
    """Warns when an input is shorter than the length the model was trained at.

    The encoder has no attention mask, so padding changes the outputs of real tokens; the reference
    always pads to `max_position_embeddings` (spec section 0).
    """
    if seq_len < cfg.max_position_embeddings:
        warnings.warn(
            f"input length {seq_len} < max_position_embeddings {cfg.max_position_embeddings}: M2-BERT "
            "was trained on inputs padded to the full length, and its convolutions see padding, so "
            "outputs will differ from the full-length ones",
            stacklevel=3,
        )
