"""The long-conv block on TPU: the Mosaic kernel vs XLA Monarch vs XLA FFT, against expectations.

Times `kernels.long_conv_block.long_conv_block` at M2-BERT-base width (H = 768), forward and
forward+backward, for each implementation, and prints next to the kernel's time the lower bound
`benchmarks.tpu_costs` expects on this chip (MXU or HBM bound). Every implementation is first
checked against ``xla_fft`` on the same inputs (`rel_err_vs_xla`). Off a TPU the kernel runs in
the Pallas interpreter, whose time means nothing (``interpreted`` in the row): that mode only
exercises the script (``--dry_run``).

    python benchmarks/tpu_block.py --dtype bfloat16 --seq_lens 512,2048,8192,32768 --out out
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common, long_conv_block as block_bench, tpu_costs  # noqa: E402
from kernels.long_conv_block import long_conv_block, pallas_mosaic_tpu  # noqa: E402

KERNEL = "pallas_mosaic_tpu"
IMPLEMENTATIONS = (KERNEL, "xla_monarch", "xla_fft")
_CHIPS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
          "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def chip_name() -> str | None:
    """"v4" / "v5e" / "v5p" / "v6e" for the first device, None off a TPU."""
    return _CHIPS.get(jax.devices()[0].device_kind)


def run(seq_lens, *, dtype: str, hidden: int, tokens_per_step: int, warmup: int, repeats: int,
        passes=("forward", "forward+backward"), on_row=None) -> list[dict[str, Any]]:
    chip = chip_name()
    rows = []
    for seq_len in seq_lens:
        batch = max(1, tokens_per_step // seq_len)
        (x1, x2, v, u), gate, res = block_bench._inputs(batch, hidden, seq_len, dtype)
        expected = (tpu_costs.expected_ns_per_token(seq_len, dtype, chip, hidden)
                    if chip and pallas_mosaic_tpu.supports(seq_len, dtype) else None)
        for impl in IMPLEMENTATIONS:
            for pas in passes:
                row: dict[str, Any] = {
                    "implementation": impl, "pass": pas, "seq_len": seq_len, "batch": batch,
                    "hidden": hidden, "dtype": dtype, "chip": chip,
                    "interpreted": impl == KERNEL and pallas_mosaic_tpu.use_interpreter()}
                if impl == KERNEL and expected is not None:
                    kinds = ("forward",) if pas == "forward" else ("forward", "backward")
                    ns = sum(expected[k]["ns"] for k in kinds)
                    row["expected_ms"] = ns * batch * seq_len / 1e6
                    row["expected_bound"] = expected["forward"]["bound"]
                fwd = lambda x1, x2, v, u, gate, res, impl=impl: long_conv_block(
                    x1, x2, v, gate, u, res, implementation=impl)
                fn = (jax.jit(fwd) if pas == "forward"
                      else block_bench.forward_and_backward(fwd, v))
                try:
                    if impl != "xla_fft" and pas == "forward":
                        y = fn(x1, x2, v, u, gate, res).astype(jnp.float32)
                        y_ref = jax.jit(functools.partial(fwd, impl="xla_fft"))(
                            x1, x2, v, u, gate, res).astype(jnp.float32)
                        row["rel_err_vs_xla"] = float(jnp.linalg.norm(y - y_ref)
                                                      / jnp.linalg.norm(y_ref))
                    row.update(common.time_call(lambda: fn(x1, x2, v, u, gate, res),
                                                warmup=warmup, repeats=repeats))
                    row["tokens_per_ms"] = batch * seq_len / row["median_ms"]
                    if "expected_ms" in row:
                        row["fraction_of_expected"] = row["expected_ms"] / row["median_ms"]
                except Exception as err:  # a row that fails is reported, the others still run
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"  block {impl:17s} {pas:16s} L={seq_len:6d} B={batch:4d} "
                      + (f"{row['median_ms']:9.3f} ms" if "median_ms" in row else row["error"]),
                      flush=True)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192,16384,32768")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--tokens_per_step", type=int, default=65536)
    parser.add_argument("--passes", default="forward,forward+backward")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--json_name", default="tpu_block.json")
    args = parser.parse_args(argv)
    lens = [int(s) for s in args.seq_lens.split(",")]
    payload = {"environment": common.environment(), "settings": vars(args)}
    path = os.path.join(args.out, args.json_name)
    save = lambda rows: common.write_json(path, {**payload, "block": rows, "partial": True})
    rows = run(lens, dtype=args.dtype, hidden=args.hidden, tokens_per_step=args.tokens_per_step,
               warmup=args.warmup, repeats=args.repeats, passes=args.passes.split(","),
               on_row=save)
    common.write_json(path, {**payload, "block": rows})
    print("\nLong-conv block, H=%d, %s (median):" % (args.hidden, args.dtype))
    print(common.format_table(rows, [
        ("implementation", "impl"), ("pass", "pass"), ("seq_len", "L"), ("batch", "B"),
        ("median_ms", "ms/call"), ("tokens_per_ms", "tokens/ms"), ("expected_ms", "expected ms"),
        ("expected_bound", "bound"), ("fraction_of_expected", "of expected"),
        ("rel_err_vs_xla", "rel err"), ("error", "note")]))
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
