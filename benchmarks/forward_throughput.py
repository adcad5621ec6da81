"""Forward throughput (tokens/ms) of M2-BERT-base 80M and a Transformer BERT-base, vs L.

What is timed: the jitted forward of encoder + MLM head on all tokens (the spec's published
measure, section 0), random token ids, `batch = max(1, tokens_per_step // L)` rows per call, the
median of `repeats` calls after warm-up. Random init: throughput does not depend on the weights.
Driven by `launch/benchmark.py`.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import m2jax
from benchmarks import common
from benchmarks.transformer_baseline import BertConfig, BertForMaskedLM

# Tiny shapes for the smoke run (tests): every code path, seconds on a CPU.
_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=512)


def m2_model(seq_len: int, dtype: str, long_conv_implementation: str, smoke: bool) -> nnx.Module:
    overrides = dict(max_position_embeddings=seq_len, long_conv_l_max=seq_len, dtype=dtype,
                     long_conv_implementation=long_conv_implementation)
    if smoke:
        overrides.update(_SMOKE, hyena_filter_order=16)
    return m2jax.M2BertForMaskedLM(m2jax.get_model_config("m2-bert-base-80m", **overrides),
                                   rngs=nnx.Rngs(0))


def bert_model(seq_len: int, dtype: str, smoke: bool) -> nnx.Module:
    # cuDNN flash attention needs fp16/bf16 on a GPU; XLA's attention everywhere else.
    attn = "cudnn" if common.is_gpu() and dtype == "bfloat16" else "xla"
    cfg = BertConfig(max_position_embeddings=seq_len, dtype=dtype, attention_implementation=attn)
    if smoke:
        cfg = BertConfig(max_position_embeddings=seq_len, dtype=dtype, attention_implementation=attn,
                         hidden_size=_SMOKE["hidden_size"], num_layers=1, num_heads=4,
                         intermediate_size=_SMOKE["intermediate_size"],
                         vocab_size=_SMOKE["vocab_size"])
    return BertForMaskedLM(cfg, rngs=nnx.Rngs(0))


def _time_model(model: nnx.Module, vocab: int, batch: int, seq_len: int, warmup: int,
                repeats: int) -> dict[str, Any]:
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids, types: nnx.merge(graphdef, st)(ids, types))
    ids = jax.random.randint(jax.random.key(seq_len), (batch, seq_len), 1, vocab, jnp.int32)
    types = jnp.zeros_like(ids)
    return common.time_call(lambda: fwd(state, ids, types), warmup=warmup, repeats=repeats)


def run(seq_lens: Sequence[int], *, dtype: str, tokens_per_step: int, warmup: int, repeats: int,
        m2_implementations: Sequence[str] = ("auto",), transformer_max_len: int | None = None,
        smoke: bool = False,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """One row per (model, L): batch, median ms per call, tokens/ms, tokens/s, or an error."""
    rows = []
    specs = [(f"m2-bert-base-80m[{impl}]", "m2", impl) for impl in m2_implementations]
    specs.append(("bert-base-transformer", "bert", None))
    for seq_len in seq_lens:
        batch = max(1, tokens_per_step // seq_len)
        for name, kind, impl in specs:
            row: dict[str, Any] = {"model": name, "seq_len": seq_len, "batch": batch,
                                   "tokens_per_step": batch * seq_len, "dtype": dtype}
            if kind == "bert" and transformer_max_len is not None and seq_len > transformer_max_len:
                row["error"] = f"skipped (L > transformer_max_len={transformer_max_len})"
                rows.append(row)
                continue
            try:
                model = (m2_model(seq_len, dtype, impl, smoke) if kind == "m2"
                         else bert_model(seq_len, dtype, smoke))
                vocab = _SMOKE["vocab_size"] if smoke else 30522
                t = _time_model(model, vocab, batch, seq_len, warmup, repeats)
                row.update(t)
                row["tokens_per_ms"] = batch * seq_len / t["median_ms"]
                row["tokens_per_s"] = row["tokens_per_ms"] * 1e3
            except Exception as err:  # OOM or an unsupported attention at long L: record, go on
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            finally:
                model = None
                gc.collect()
            print(f"  forward {name:28s} L={seq_len:6d} B={batch:4d} "
                  + (f"{row['tokens_per_ms']:9.2f} tokens/ms" if "tokens_per_ms" in row
                     else row["error"]), flush=True)
            rows.append(row)
            if on_row is not None:  # keep partial results if the run is cut short
                on_row(rows)
    return rows


def summarize(rows: Sequence[dict[str, Any]], m2_name: str) -> dict[str, Any]:
    """The issue's targets: M2 vs Transformer at 4096 / 8192, M2's 8192 vs 512 ratio."""
    tpm = {(r["model"], r["seq_len"]): r.get("tokens_per_ms") for r in rows}
    bert = "bert-base-transformer"
    out: dict[str, Any] = {}
    for l in sorted({r["seq_len"] for r in rows}):
        m, b = tpm.get((m2_name, l)), tpm.get((bert, l))
        out[f"m2_over_transformer_L{l}"] = m / b if m and b else None
    lo, hi = tpm.get((m2_name, 512)), tpm.get((m2_name, 8192))
    out["m2_L8192_over_L512"] = hi / lo if lo and hi else None
    return out
