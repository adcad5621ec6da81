"""Where the default call's time goes: the compiled forward traced, op by op (docs/perf.md).

    python benchmarks/profile_forward.py [--shapes 8x128,1x2048] [--model m2-bert-base-80m]
        [--calls 2] [--top 15] [--out out/profile_forward.json]

Per shape (B x L): a random model (float32, `max_position_embeddings = L`) is called as users
call it, `model(input_ids)` (encoder + MLM head on all tokens), twice to compile and warm up;
then `--calls` calls run under `jax.profiler.trace`. From the trace the durations of the XLA
operations are summed per HLO instruction (on CPU each is one thunk: a matmul fusion
`ynn_fusion.N`, an FFT `fft.N`, an elementwise loop fusion, ...) and per group (the instruction
name without its number), divided by the number of calls. `outside_ms` is the wall time per
traced call minus the operations' time: the host side of the call (argument handling, the tracer
check, the filter memo's check, dispatch), the executor's gaps between operations and the
profiler's own overhead (negative where operations ran side by side on two threads), and most of
the time of the dots XLA:CPU runs with Eigen rather than YNNPACK (`dot.N`, e.g. the mixer's
in/out projections): their events cover the dispatch only, and the matmul completes
asynchronously in the thread pool (docs/perf.md, fourth session of 2026-12-03).

Prints, per shape, the groups with their share of the operations' time and the `--top` single
instructions; writes all of it as JSON. Traced calls run a little slower than untraced ones
(`call_ms` is the median of `--calls` untraced calls timed before the trace).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import m2jax  # noqa: E402
from benchmarks import common  # noqa: E402

# An XLA operation's trace event is named after its HLO instruction: lower case, underscores and
# an optional ".N" ("ynn_fusion.12", "fft", "copy_bitcast_fusion.3"). Python frames ("$file:line
# fn"), runtime spans ("ThunkExecutor::Execute", "PjitFunction(...)", "ParseArguments") and the
# "end: ..." markers of asynchronous operations do not match.
_HLO_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")


def hlo_group(name: str) -> str:
    """The instruction's kind: its name without the trailing number ("ynn_fusion.12" ->
    "ynn_fusion")."""
    return re.sub(r"\.\d+$", "", name)


def operation_times(trace_dir: str) -> dict[str, float]:
    """Microseconds per HLO instruction, summed over every event of the trace in `trace_dir`
    (the `*.trace.json.gz` that `jax.profiler.trace(..., create_perfetto_trace=True)` writes)."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and _HLO_NAME.match(e.get("name", "")):
            totals[e["name"]] += float(e["dur"])
    return dict(totals)


def profile_shape(model_name: str, batch: int, seq_len: int, calls: int, seed: int,
                  top: int) -> dict[str, Any]:
    """One row of the report: the traced breakdown of `calls` calls at (batch, seq_len)."""
    cfg = m2jax.get_model_config(model_name, max_position_embeddings=seq_len,
                                 long_conv_l_max=seq_len)
    model = m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(seed))
    ids = np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
    # Compile, one warm call (the first fills the filter memo), then the untraced calls.
    untraced = common.time_call(lambda: model(ids), warmup=2, repeats=calls)
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(model(ids))
            traced_ms = (time.perf_counter() - t0) * 1e3 / calls
        per_op = {name: us / 1e3 / calls for name, us in operation_times(trace_dir).items()}
    groups: dict[str, float] = collections.Counter()
    for name, ms in per_op.items():
        groups[hlo_group(name)] += ms
    ops_ms = sum(per_op.values())
    return {
        "batch": batch, "seq_len": seq_len, "calls": calls,
        "call_ms": untraced["median_ms"], "traced_call_ms": traced_ms,
        "operations_ms": ops_ms, "outside_ms": traced_ms - ops_ms,
        "groups": [{"group": g, "ms": ms, "share": ms / ops_ms if ops_ms else 0.0}
                   for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])],
        "top_operations": [{"operation": n, "ms": ms}
                           for n, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]],
        "operation_count": len(per_op),
    }


def main() -> None:
    p = common.model_shapes_parser(__doc__, "out/profile_forward.json")
    p.add_argument("--calls", type=int, default=2, help="traced calls per shape")
    p.add_argument("--top", type=int, default=15, help="single operations listed per shape")
    args, shapes = common.parse_args_and_shapes(p, positive=("calls",))

    env = common.environment()
    rows = []
    for b, l in shapes:
        r = profile_shape(args.model, b, l, args.calls, args.seed, args.top)
        rows.append(r)
        print(f"\nB={b} L={l}: call {r['call_ms']:.1f} ms (traced {r['traced_call_ms']:.1f} ms: "
              f"operations {r['operations_ms']:.1f} ms, outside them {r['outside_ms']:.1f} ms)")
        print(common.format_table(r["groups"], [("group", "operation kind"), ("ms", "ms/call"),
                                                ("share", "share")]))
        print(common.format_table(r["top_operations"], [("operation", "operation"),
                                                        ("ms", "ms/call")]))
    print(f"wrote {common.write_report(args, env, rows)}")


if __name__ == "__main__":
    main()
