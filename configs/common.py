"""Plain data shared by the recipes: the models' fields, the sharding rules, the long-convolution
choice. Imports ml_collections only; `tests/test_recipes.py` checks these tables against
`m2jax/config.py`, so the two cannot drift apart.
"""

import ml_collections
from ml_collections import config_dict

# The reference rounds the tokenizer's 30522 tokens up to a multiple of 8 before it builds any
# model (create_bert.py), so every checkpoint it wrote, the released ones included, has 30528
# rows. Every recipe does the same, so pretraining, GLUE and released weights fit one another.
VOCAB_SIZE = 30528

# Every M2BertConfig field (m2jax/config.py), as M2-BERT-base 80M sets it (spec section 1).
BASE_MODEL = dict(
    vocab_size=VOCAB_SIZE,  # rows of the word-embedding table and the decoder bias
    hidden_size=768,  # H
    num_hidden_layers=12,
    intermediate_size=3072,  # I, width of each GLU branch
    max_position_embeddings=128,  # L: inputs are padded to this length
    type_vocab_size=2,
    layer_norm_eps=1e-12,  # all LayerNorms but the hyena_training_additions one (1e-5)
    hidden_dropout_prob=0.1,
    classifier_dropout=config_dict.placeholder(float),  # None: hidden_dropout_prob
    initializer_range=0.02,  # std of the Linear / Embedding init
    pad_token_id=0,
    long_conv_l_max=128,  # length the implicit filters are built for (= L)
    long_conv_kernel_learning_rate=1e-3,  # kept for config.json; the optimizer has its own
    hyena_lr_pos_emb=1e-5,  # kept for config.json
    hyena_w=10.0,  # initial sine frequency of the implicit filters
    hyena_w_mod=1.0,
    hyena_wd=0.1,  # kept for config.json
    hyena_emb_dim=5,  # the filters' positional input: t plus 2 bands
    hyena_filter_order=128,  # width of the implicit filter MLP
    hyena_filter_dropout=0.0,  # accepted, never applied (as the reference)
    bidirectional=True,  # forward and anti-causal kernels
    residual_long_conv=True,  # a second filter set on the mixer's input
    hyena_training_additions=False,  # extra LayerNorm (and rate-0 dropouts) in the mixer
    use_glu_mlp=True,
    use_monarch_mlp=True,  # block-diagonal GLU weights
    monarch_mlp_nblocks=4,
    use_positional_encodings=True,
    num_labels=2,  # classification heads; 1 = regression (STS-B)
    pool_all=False,  # classification pooling: first token (False) or masked mean (True)
    use_cls_token=False,
    dtype="float32",  # compute dtype of the matmuls; parameters stay float32
    long_conv_implementation="auto",  # per platform (kernels/long_conv_block); see below
    same_init_across_layers=False,  # the reference's deepcopy init quirk (spec section 0)
    sequence_mixer_dropout_prob=0.0,  # 0.0 in every released run (spec 3.6)
)

# The named model configs of m2jax/config.py: the fields that differ from BASE_MODEL.
MODELS = {
    "m2-bert-base-80m": {},
    "m2-bert-base-80m-released": {"hyena_training_additions": True},
    "m2-bert-base-110m": {"hidden_size": 960, "intermediate_size": 3840},
    "m2-bert-large-260m": {"hidden_size": 1536, "intermediate_size": 6144},
    "m2-bert-large-341m": {"hidden_size": 1792, "intermediate_size": 7168},
    "m2-bert-80m-2k": {"max_position_embeddings": 2048, "long_conv_l_max": 2048},
    "m2-bert-80m-8k": {"max_position_embeddings": 8192, "long_conv_l_max": 8192},
    "m2-bert-80m-32k": {"max_position_embeddings": 32768, "long_conv_l_max": 32768},
}

# The smoke recipes' model: 2 layers of width 128 at length 64, minutes on a CPU.
SMOKE_MODEL = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "hyena_filter_order": 32,
    "max_position_embeddings": 64,
    "long_conv_l_max": 64,
}

# XLA:CPU's FFT rejects the operand layouts that fsdp / tensor partitioning produces (RET_CHECK
# in fft_thunk.cc), so on a CPU mesh with fsdp or tensor > 1 the model uses this implementation
# instead of `model.long_conv_implementation` (the Monarch-DFT path: all matmuls, the same
# numbers; tests/kernels/test_xla_monarch.py). "" keeps the model's choice everywhere.
LONG_CONV_ON_SHARDED_CPU = "xla_monarch"

# Logical axis name of a parameter dimension -> mesh axis (None: replicated). The mesh axes are
# ("data", "fsdp", "tensor"); a dimension the mesh axis does not divide stays replicated.
AXIS_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # the model width H
    ("mlp", "tensor"),  # 3H projections, the GLU width
    ("blocks", None),  # block-diagonal block index
    ("block_in", "fsdp"),
    ("block_out", "tensor"),
    ("filter", None),  # implicit-filter MLP width and positions: small, replicated
    ("length", None),
    ("classes", None),
)


def model(name: str, **changes) -> ml_collections.ConfigDict:
    """`config.model`: every M2BertConfig field of the named model, with `changes`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    unknown = sorted(set(changes) - set(BASE_MODEL))
    if unknown:
        raise ValueError(f"{unknown} are not model fields; the fields: {sorted(BASE_MODEL)}")
    fields = {**BASE_MODEL, **MODELS[name], **changes}
    return ml_collections.ConfigDict({k: _own_copy(v) for k, v in fields.items()})


def _own_copy(value):
    # A placeholder is a FieldReference, and ConfigDicts share a reference they are given:
    # setting `classifier_dropout` in one config would set it in every config built here.
    if isinstance(value, config_dict.FieldReference):
        copy = config_dict.placeholder(value.get_type())
        copy.set(value.get())
        return copy
    return value


def mesh() -> ml_collections.ConfigDict:
    """Device mesh sizes; one of them may be -1 (the rest of the devices). The batch is split
    over data x fsdp; parameters over fsdp and tensor by `axis_rules`."""
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def checkpoint(every: int, keep: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "every": every,  # steps between saves (also at the end and when preempted)
            "keep": keep,  # newest checkpoints kept
            "async_save": True,  # write in the background while training continues
        }
    )
