"""Throughput and peak memory of one M2-BERT MLM train step (forward, backward, optimizer).

    python benchmarks/train_step.py [--model m2-bert-base-80m] [--batch 8] [--seq 128]
        [--dtype float32] [--repeats 5] [--out out/train_step.json]

Runs the trainer's own jitted step (m2jax.train.step) on random token batches, `--repeats`
timed steps after two warm-up steps, and reports the median tokens/s. Peak memory is the
device's `peak_bytes_in_use` where the backend reports it (GPU/TPU), else the process's peak
resident set size (CPU).

Model FLOPs utilisation against what this machine's matmuls reach: the step's model FLOPs
(`m2jax.train.flops.training_flops_per_token`, the count the trainer's MFU uses) per second, divided
by the f32 (or --dtype) matmul rate measured in the same run, right before the step
(`matmul_rate`: the best median over a few large matmul shapes). Prints a table and writes JSON.
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
from m2jax.train.flops import training_flops_per_token
from m2jax.train.step import TrainState, make_train_step

# (M, K, N) of the matmuls timed for the reference rate: the model's own widest product and a
# square one.
MATMUL_SHAPES = ((1024, 768, 3072), (2048, 2048, 2048))


def matmul_rate(dtype: str, repeats: int = 5) -> tuple[float, list[dict]]:
    """The best median FLOP/s of a jitted `a @ b` over MATMUL_SHAPES, and the per-shape rows."""
    rows = []
    for m, k, n in MATMUL_SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k), dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(f(a, b))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(a, b))
            times.append(time.perf_counter() - t)
        rows.append({"shape": [m, k, n], "median_s": statistics.median(times),
                     "flops_per_s": 2 * m * k * n / statistics.median(times)})
    return max(r["flops_per_s"] for r in rows), rows


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
    peak_rate, matmul_rows = matmul_rate(args.dtype)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    peak, peak_kind = peak_memory_bytes()
    flops_per_token = training_flops_per_token(model, args.seq, args.batch)
    model_flops_per_s = flops_per_token * args.batch * args.seq / median
    result = {
        "model": args.model, "params": m2jax.count_params(model), "batch": args.batch,
        "seq_len": args.seq, "dtype": args.dtype, "median_step_s": median,
        "step_s": times, "tokens_per_s": args.batch * args.seq / median,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "model_flops_per_token": flops_per_token, "model_flops_per_s": model_flops_per_s,
        "matmul_flops_per_s": peak_rate, "matmul_rows": matmul_rows,
        "fraction_of_matmul_rate": model_flops_per_s / peak_rate,
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
        "jax": jax.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| model | batch x seq | dtype | median step | tokens/s | model GFLOP/s | matmul "
          f"GFLOP/s | fraction | peak memory ({peak_kind}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} ({result['params']:,} params) | {args.batch} x {args.seq} | {args.dtype} "
          f"| {median * 1e3:.0f} ms | {result['tokens_per_s']:,.0f} | {model_flops_per_s / 1e9:.1f} "
          f"| {peak_rate / 1e9:.1f} | {model_flops_per_s / peak_rate:.1%} "
          f"| {peak / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
