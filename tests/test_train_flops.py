"""Device peaks and the model-FLOPs estimate (m2jax/train/flops.py)."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import m2jax
from m2jax.losses import classification_loss, mlm_loss
from m2jax.train.flops import device_peak_flops, total_peak_flops, training_flops_per_token

CFG = m2jax.get_model_config("tiny")  # V 128, H 32, I 64, 2 layers, L 16, filter order 8


def _devices(kind: str, n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(device_kind=kind)] * n


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("cpu", None), ("NVIDIA GH200 480GB", None),
])
def test_device_peaks_match_whole_names(kind, peak):
    assert device_peak_flops(kind) == peak


def test_total_peak_is_unknown_if_any_device_is():
    assert total_peak_flops(_devices("NVIDIA H100 80GB HBM3", 8)) == 8 * 989e12
    assert total_peak_flops(_devices("NVIDIA H100 80GB HBM3", 1) + _devices("cpu", 1)) is None


# ---------------------------------------------------------------------------------------------
# FLOPs: an independent count from the config's layer shapes (not from the parameter tree).


def _per_token_weights(cfg) -> int:
    """Weights used once at every position: projections, short conv, D, GLU, norms."""
    H, I, nb = cfg.hidden_size, cfg.intermediate_size, cfg.monarch_mlp_nblocks
    filter_sets = 1 + cfg.residual_long_conv
    layer = (
        (H * 3 * H + 3 * H)  # in_linear
        + (3 * H * 3 + 3 * H)  # short depthwise conv and bias
        + (H * H + H)  # out_linear
        + filter_sets * H  # D of each filter set
        + H * 2 * I // nb  # block-diagonal gated_layers
        + (I * H // nb + H)  # block-diagonal wo
        + 2 * H  # post-LayerNorm
        + 2 * H * cfg.hyena_training_additions  # the mixer's extra LayerNorm
    )
    return cfg.num_hidden_layers * layer + 2 * H  # + the embeddings' LayerNorm


def _filter_mlp_weights(cfg) -> int:
    E, O, H = cfg.hyena_emb_dim, cfg.hyena_filter_order, cfg.hidden_size
    one_mlp = (E * O + O) + 2 * (O * O + O) + O * H
    return cfg.num_hidden_layers * (1 + cfg.residual_long_conv) * 2 * one_mlp  # fwd + rev


def _long_conv_flops(cfg, L: int, batch: int) -> float:
    """Per token: 4 real FFTs of length 2L per channel and sequence (2 forward, 2 backward) and
    3 complex products per bin; per step: each kernel's FFT and its transpose."""
    n = 2 * L
    fft = 2.5 * n * math.log2(n)
    channels = cfg.num_hidden_layers * (1 + cfg.residual_long_conv) * cfg.hidden_size
    return channels * (4 * fft + 3 * 6 * (n // 2 + 1)) / L + channels * 2 * fft / (batch * L)


def test_mlm_flops_count_the_tied_decoder_once_and_no_lookups():
    model = m2jax.abstract_model(m2jax.M2BertForMaskedLM, CFG)
    L, B, H, V = 16, 8, CFG.hidden_size, CFG.vocab_size
    head = (H * H + H) + 2 * H + V + V * H  # dense, LayerNorm, decoder bias, tied decoder matmul
    expected = (
        6 * (_per_token_weights(CFG) + head)
        + 6 * _filter_mlp_weights(CFG) * L / (B * L)  # filters: evaluated once per step
        + _long_conv_flops(CFG, L, B)
    )
    assert training_flops_per_token(model, L, B) == pytest.approx(expected, rel=1e-12)
    # The position and token-type tables and the filters' `z` / `freq` are in the parameter
    # count but cost nothing per token: 6 x params overestimates.
    assert training_flops_per_token(model, L, B) < 6 * m2jax.count_params(model)


def test_classification_flops_skip_the_embedding_table_and_spread_the_head_over_the_sequence():
    cfg = CFG.replace(num_labels=3, residual_long_conv=False)
    model = m2jax.abstract_model(m2jax.M2BertForSequenceClassification, cfg)
    L, B, H = 16, 4, cfg.hidden_size
    per_sequence = (H * H + H) + (H * 3 + 3)  # pooler and classifier, once per sequence
    expected = (
        6 * _per_token_weights(cfg)
        + 6 * per_sequence / L
        + 6 * _filter_mlp_weights(cfg) / B
        + _long_conv_flops(cfg, L, B)
    )
    assert training_flops_per_token(model, L, B) == pytest.approx(expected, rel=1e-12)


def test_flops_of_the_released_80m_shape():
    """The 80M model: ~446 MFLOPs per token, 6 x 73.8M per-token weights (23.4M of them the tied
    decoder) plus 0.7% for the long convolutions; 6 x all 80.3M parameters would say 482M."""
    cfg = m2jax.get_model_config("m2-bert-base-80m")
    model = m2jax.abstract_model(m2jax.M2BertForMaskedLM, cfg)
    flops = training_flops_per_token(model, 128, 4096)
    H, V = cfg.hidden_size, cfg.vocab_size
    dense = 6 * (_per_token_weights(cfg) + H * H + H + 2 * H + V + V * H)
    assert flops == pytest.approx(dense + _long_conv_flops(cfg, 128, 4096)
                                  + 6 * _filter_mlp_weights(cfg) / 4096, rel=1e-12)
    assert 4.3e8 < flops < 4.6e8


@pytest.mark.parametrize("task", ["mlm", "classification"])
def test_flops_agree_with_xla_cost_analysis_of_the_gradient(task):
    """XLA's own count of a compiled forward + backward pass, fully independent of ours. It also
    counts the elementwise work (GELU, norms, softmax, gates) that model FLOPs leave out, hence a
    few percent more; a misplaced embedding table (6 V H per token) would be off by 2x."""
    cfg = CFG.replace(hidden_size=256, intermediate_size=1024, vocab_size=4096,
                      num_hidden_layers=1, max_position_embeddings=64, long_conv_l_max=64,
                      hyena_filter_order=16, num_labels=3)
    cls = m2jax.M2BertForMaskedLM if task == "mlm" else m2jax.M2BertForSequenceClassification
    model = m2jax.abstract_model(cls, cfg)
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    B, L = 8, 64
    ids = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def loss(params, consts, ids):
        logits = nnx.merge(graphdef, params, consts)(ids)
        if task == "mlm":
            return mlm_loss(logits, ids)[0]  # every position predicted, as the head computes
        return classification_loss(logits, ids[:, 0] % 3)

    compiled = jax.jit(jax.grad(loss)).lower(params, consts, ids).compile()
    analysis = compiled.cost_analysis()
    xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"] / (B * L)
    ours = training_flops_per_token(model, L, B)
    assert 0.88 * xla < ours <= xla
