"""Throughput benchmarks of the paper: M2-BERT vs a Transformer BERT, and the long-conv kernel.

    python launch/benchmark.py                       # defaults for the platform (CPU or GPU)
    python launch/benchmark.py --smoke --out_dir=/tmp/b   # tiny models, two short L (tests)
    python launch/benchmark.py --benchmarks=block --seq_lens=2048,4096,8192 --dtype=bfloat16

Defaults: float32 and L = 512..8192 on CPU; bf16 and L = 512..32768 on GPU (the Transformer up to
`--transformer_max_len`). Prints the tables (the summary last), writes `benchmark.json` and, when
matplotlib is installed, `forward_throughput.png` into `--out_dir` ($OUT or ./out by default).
"""

from __future__ import annotations

import os
import pathlib
import sys

# Run as a script from anywhere: the repository root holds `benchmarks/` and `kernels/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from benchmarks import common, forward_throughput, long_conv_block  # noqa: E402

_BENCHMARKS = flags.DEFINE_list("benchmarks", ["forward", "block"], "which: forward, block")
_SEQ_LENS = flags.DEFINE_list("seq_lens", None, "sequence lengths (default per platform)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "compute dtype (default: bfloat16 on GPU, float32 on CPU)")
_TOKENS = flags.DEFINE_integer("tokens_per_step", None,
                               "tokens per forward call, batch = max(1, this // L) "
                               "(default 65536 on GPU, 4096 on CPU)")
_BLOCK_TOKENS = flags.DEFINE_integer("block_tokens_per_step", None,
                                     "tokens per block call (default 65536 GPU, 8192 CPU)")
_BLOCK_HIDDEN = flags.DEFINE_integer("block_hidden", 768, "channels H of the block benchmark")
_BLOCK_MAX_LEN = flags.DEFINE_integer("block_max_len", None, "longest L for the block benchmark")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed calls first (the first one compiles)")
_REPEATS = flags.DEFINE_integer("repeats", None, "timed calls; the median is reported "
                                "(default 10 on GPU, 3 on CPU)")
_M2_IMPLS = flags.DEFINE_list("m2_implementations", ["auto"],
                              "long_conv_implementation values to time for M2-BERT")
_TRANSFORMER_MAX = flags.DEFINE_integer("transformer_max_len", None,
                                        "skip the Transformer above this L")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny models and L = 128, 256 (for tests)")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "output folder (default $OUT or ./out)")
_JSON_NAME = flags.DEFINE_string("json_name", "benchmark.json", "file name of the JSON in out_dir")


def _settings() -> dict:
    gpu = common.is_gpu()
    if _SMOKE.value:
        return dict(seq_lens=[128, 256], dtype=_DTYPE.value or "float32", tokens=512,
                    block_tokens=512, repeats=_REPEATS.value or 2, block_hidden=8)
    default_lens = [512, 1024, 2048, 4096, 8192] + ([32768] if gpu else [])
    return dict(
        seq_lens=[int(s) for s in _SEQ_LENS.value] if _SEQ_LENS.value else default_lens,
        dtype=_DTYPE.value or ("bfloat16" if gpu else "float32"),
        tokens=_TOKENS.value or (65536 if gpu else 4096),
        block_tokens=_BLOCK_TOKENS.value or (65536 if gpu else 8192),
        repeats=_REPEATS.value or (10 if gpu else 3),
        block_hidden=_BLOCK_HIDDEN.value)


def main(argv: list[str]) -> None:
    del argv
    s = _settings()
    out_dir = pathlib.Path(_OUT_DIR.value or os.environ.get("OUT") or "out")
    env = common.environment()
    print(f"benchmark on {env['device_kind']} ({env['backend']}), jax {env['jax_version']}, "
          f"dtype {s['dtype']}, L = {s['seq_lens']}", flush=True)
    payload = {"environment": env, "settings": {**s, "smoke": _SMOKE.value,
                                                "m2_implementations": _M2_IMPLS.value,
                                                "warmup": _WARMUP.value}}
    summary: dict = {}
    tables = []
    json_path = out_dir / _JSON_NAME.value

    def save_partial(key: str):
        def save(rows: list) -> None:
            common.write_json(json_path, {**payload, key: rows, "partial": True})
        return save

    if "forward" in _BENCHMARKS.value:
        rows = forward_throughput.run(
            s["seq_lens"], dtype=s["dtype"], tokens_per_step=s["tokens"], warmup=_WARMUP.value,
            repeats=s["repeats"], m2_implementations=_M2_IMPLS.value,
            transformer_max_len=_TRANSFORMER_MAX.value, smoke=_SMOKE.value,
            on_row=save_partial("forward"))
        payload["forward"] = rows
        summary.update(forward_throughput.summarize(
            rows, f"m2-bert-base-80m[{_M2_IMPLS.value[0]}]"))
        tables.append("Forward throughput, encoder + MLM head (median):\n" + common.format_table(
            rows, [("model", "model"), ("seq_len", "L"), ("batch", "B"),
                   ("median_ms", "ms/call"), ("tokens_per_ms", "tokens/ms"),
                   ("error", "note")]))
        series = {}
        for r in rows:
            series.setdefault(r["model"], []).append((r["seq_len"], r.get("tokens_per_ms")))
        png = common.plot_throughput(out_dir / "forward_throughput.png", series, "tokens/ms",
                                     f"forward throughput, {env['device_kind']}, {s['dtype']}")
        payload["plot"] = None if png is None else str(png)
    if "block" in _BENCHMARKS.value:
        lens = [l for l in s["seq_lens"] if _BLOCK_MAX_LEN.value is None or l <= _BLOCK_MAX_LEN.value]
        rows = long_conv_block.run(lens, dtype=s["dtype"], hidden=s["block_hidden"],
                                   tokens_per_step=s["block_tokens"], warmup=_WARMUP.value,
                                   repeats=s["repeats"], smoke=_SMOKE.value,
                                   on_row=save_partial("block"))
        payload["block"] = rows
        summary.update(long_conv_block.summarize(rows))
        tables.append(f"Long-conv block alone, H={s['block_hidden']} (median):\n"
                      + common.format_table(rows, [
                          ("implementation", "impl"), ("pass", "pass"), ("seq_len", "L"),
                          ("batch", "B"), ("median_ms", "ms/call"),
                          ("tokens_per_ms", "tokens/ms"), ("error", "note")]))
    payload["summary"] = summary
    path = common.write_json(json_path, payload)
    print()
    for t in tables:
        print(t + "\n")
    print("Summary: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
