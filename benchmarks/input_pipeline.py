"""Throughput of the MLM input pipeline (tokenise + mask + batch) on the embedded corpus.

Prints a table and writes JSON (default out/input_pipeline.json). Each configuration runs
`--repeats` times after one warm-up batch; the reported figure is the median. Two rates:
`positions/s` counts every (row, position) the model consumes, padding included;
`tokens/s` counts real (non-[PAD]) tokens. `positions/cpu-s` divides by the process's CPU time
(all threads), a figure that other jobs on a shared machine disturb less than wall time; the
1-minute load average before and after is recorded for the same reason.

    python benchmarks/input_pipeline.py [--out out/input_pipeline.json] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np

from m2jax.data import load_tokenizer, pretrain_batches

# (max_seq_len, rows per batch, packing): the recipe's 128 without packing, and 2048 both ways.
CONFIGS = ((128, 256, False), (2048, 16, True), (2048, 16, False))


def measure(seq_len: int, batch: int, packing: bool, n_batches: int, seed: int, tok) -> dict:
    it = pretrain_batches("embedded", max_seq_len=seq_len, global_batch_size=batch, seed=seed,
                          packing=packing, process_index=0, process_count=1, tokenizer=tok)
    next(it)  # pipeline start-up (thread pool, first reads) is not steady-state throughput
    start, cpu_start = time.perf_counter(), time.process_time()
    real = 0
    for _ in range(n_batches):
        real += int(next(it)["attention_mask"].sum())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    positions = n_batches * batch * seq_len
    return {"positions_per_s": positions / seconds, "tokens_per_s": real / seconds,
            "positions_per_cpu_s": positions / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/input_pipeline.json")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tok = load_tokenizer()
    results = []
    load_before = os.getloadavg()[0]
    print(f"{'seq':>5} {'batch':>5} {'packing':>7} {'positions/s':>12} {'tokens/s':>12} {'positions/cpu-s':>16}")
    for seq_len, batch, packing in CONFIGS:
        runs = [measure(seq_len, batch, packing, args.batches, seed, tok) for seed in range(args.repeats)]
        row = {"max_seq_len": seq_len, "batch": batch, "packing": packing,
               "positions_per_s": statistics.median(r["positions_per_s"] for r in runs),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "positions_per_cpu_s": statistics.median(r["positions_per_cpu_s"] for r in runs),
               "runs": runs}
        results.append(row)
        print(f"{seq_len:>5} {batch:>5} {str(packing):>7} {row['positions_per_s']:>12,.0f} "
              f"{row['tokens_per_s']:>12,.0f} {row['positions_per_cpu_s']:>16,.0f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__,
            "batches_per_run": args.batches, "repeats": args.repeats,
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
