"""Throughput and peak memory of one M2-BERT MLM train step (forward, backward, optimizer).

    python benchmarks/train_step.py [--model m2-bert-base-80m] [--batch 8] [--seq 128]
        [--dtype float32] [--repeats 5] [--out out/train_step.json]

Runs the trainer's own jitted step (m2jax.train.step) on random token batches, `--repeats`
timed steps after two warm-up steps, and reports the median tokens/s. Peak memory is the
device's `peak_bytes_in_use` where the backend reports it (GPU/TPU), else the process's peak
resident set size (CPU). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import m2jax
from m2jax.optim import OptimizerConfig, make_optimizer
from m2jax.train.step import TrainState, make_train_step


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="m2-bert-base-80m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="out/train_step.json")
    args = p.parse_args()

    cfg = m2jax.get_model_config(args.model, dtype=args.dtype, max_position_embeddings=args.seq,
                                 long_conv_l_max=args.seq)
    model = m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(OptimizerConfig(total_steps=1000), params)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(graphdef, consts, tx, "mlm"), donate_argnums=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30522, (args.batch, args.seq)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "token_type_ids": jnp.zeros_like(ids),
             "attention_mask": jnp.ones_like(ids),
             "labels": jnp.asarray(np.where(rng.random(ids.shape) < 0.3, ids, -100).astype(np.int32)),
             "example_mask": jnp.ones((args.batch,), jnp.int32)}
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    peak, peak_kind = peak_memory_bytes()
    result = {
        "model": args.model, "params": m2jax.count_params(model), "batch": args.batch,
        "seq_len": args.seq, "dtype": args.dtype, "median_step_s": median,
        "step_s": times, "tokens_per_s": args.batch * args.seq / median,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
        "jax": jax.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| model | batch x seq | dtype | median step | tokens/s | peak memory ({peak_kind}) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} ({result['params']:,} params) | {args.batch} x {args.seq} | {args.dtype} "
          f"| {median * 1e3:.0f} ms | {result['tokens_per_s']:,.0f} | {peak / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
