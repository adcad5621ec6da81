"""The model-FLOP count of a training token and the devices' peak FLOP/s: the two halves of
the model-FLOP utilisation (MFU) the progress line shows."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from flax import nnx

from m2jax.model import M2BertForMaskedLM, count_params

# bf16 dense (no sparsity) peak FLOP/s per device, for the model-FLOP-utilisation estimate, by
# the name in `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...).
PEAK_FLOPS = {
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "L40S": 362e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of one device of this kind, or None when unknown (CPUs, unlisted chips).

    Names match as whole words and the longest match wins, so "L4" is not an "NVIDIA L40S" and
    an "NVIDIA H100 PCIe" is not priced as the SXM part.
    """
    matches = [
        name
        for name in PEAK_FLOPS
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", device_kind, re.IGNORECASE)
    ]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def total_peak_flops(devices: Sequence[Any] | None = None) -> float | None:
    """Summed peak FLOP/s of `devices` (default: all of the run's), None if any is unknown."""
    peaks = [device_peak_flops(d.device_kind) for d in (devices or jax.devices())]
    return None if any(p is None for p in peaks) else sum(peaks)


def rfft_flops(n: int) -> float:
    """A real-input FFT (or its inverse) of length n: half of the usual 5 n log2 n complex one."""
    return 2.5 * n * math.log2(n)


def training_flops_per_token(model: nnx.Module, seq_len: int, batch_size: int) -> float:
    """Model FLOPs of one training token (forward + backward), the numerator of MFU.

    `model` is an m2jax M2-BERT (MLM, classification or text encoder) trained on `batch_size`
    sequences of `seq_len` tokens per step. The count is the model's algorithm (FFT long
    convolutions), whichever `long_conv_implementation` runs it.

    - 6 FLOPs per parameter per position (2 forward, 4 backward; Kaplan et al. 2020) for the
      weights applied at every token, the MLM head's tied decoder (the word embeddings as a
      V x H matmul at every position) included. Embedding lookups cost nothing, so the tables
      count only through the decoder, and only in the MLM model.
    - The pooler and classifier run once per sequence: 6 per parameter / seq_len.
    - Long convolutions, per channel and sequence, for each filter set (1 + residual_long_conv
      per layer), length n = 2 L: the input's rfft and the product's irfft forward; the
      gradient's rfft and irfft backward (the input and kernel spectra are kept from the forward
      pass); three complex products (6 FLOPs) per frequency bin (forward, d input, d kernel).
    - Once per step, not per token: the implicit filter MLPs at seq_len positions (6 per
      parameter per position) and the kernels' spectra (rfft forward, its transpose backward).
    """
    cfg = model.config
    per_token, per_sequence, filter_mlps = _flop_counted_params(model)
    n = 2 * seq_len
    filter_channels = cfg.num_hidden_layers * (1 + int(cfg.residual_long_conv)) * cfg.hidden_size
    conv_per_sequence = filter_channels * (4 * rfft_flops(n) + 3 * 6 * (n // 2 + 1))
    per_step = 6 * filter_mlps * seq_len + filter_channels * 2 * rfft_flops(n)
    return (
        6.0 * per_token
        + (6.0 * per_sequence + conv_per_sequence) / seq_len
        + per_step / (batch_size * seq_len)
    )


def _flop_counted_params(model: nnx.Module) -> tuple[int, int, int]:
    """Parameter counts (applied at every token, applied once per sequence, filter MLPs)."""
    bert = model.bert
    emb = bert.embeddings
    tables = [emb.word_embeddings, emb.token_type_embeddings, emb.position_embeddings]
    lookups = sum(count_params(t) for t in tables if t is not None)
    decoder = count_params(emb.word_embeddings) if isinstance(model, M2BertForMaskedLM) else 0
    filter_sets = [
        f
        for layer in bert.layers
        for f in (layer.attention.filter_fn, layer.attention.filter_fn2)
        if f is not None
    ]
    filter_mlps = sum(
        count_params(mlp) for f in filter_sets for mlp in (f.mlp_fwd, f.mlp_rev) if mlp is not None
    )
    # `z` is a table the filters slice and `freq` scales a sine: neither is a per-token weight.
    # `bias_D` (the D * x skip) is, and stays in the per-token count.
    filter_inputs = sum(f.z.size + f.freq.size for f in filter_sets)
    heads = [bert.pooler, getattr(model, "classifier", None)]
    per_sequence = sum(count_params(h) for h in heads if h is not None)
    per_token = count_params(model) - lookups + decoder - filter_mlps - filter_inputs - per_sequence
    return per_token, per_sequence, filter_mlps
