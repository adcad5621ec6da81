"""The matmul floor of the default call: its matrix products alone, each timed by itself.

    python benchmarks/matmul_floor.py [--shapes 8x128,1x2048] [--model m2-bert-base-80m]
        [--repeats 5] [--out out/matmul_floor.json]

Why: on CPU the M2-BERT forward is mostly matmuls (about 150 GFLOP at 8 x 128), and the same
products run in the PyTorch reference. However the rest of the call is arranged, the call cannot
take less than its products take on their own, so `reference call ms / floor ms` bounds the
speedup over the reference that any m2jax code built on these matmuls can reach on this host.
`cpu_vs_reference.py` reports that bound next to the measured speedup, in the same minutes, and
times the same products in torch (`reference_forward.py`'s `matmuls` command).

What counts: every `dot_general` the default call (`model(input_ids)`, with the memoised
filters) traces, outside the long-convolution op (`kernels.long_conv_block`, whose dense-DFT
matmuls are one implementation choice among several: the reference convolves with FFTs); the
filters' own small MLP runs once per model and length, not per call, and is not traced here.
Each distinct product is timed alone, jitted, on random float32 operands: as the model traces
it (operand shapes and contracted axes; XLA chooses the output layout) and as a plain
(b, m, k) x (b, k, n) matmul; the faster of the two counts (`jax_ms`), times the number of
times the call runs it. Prints a table per shape; writes JSON.
"""

from __future__ import annotations

import collections
import math
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import m2jax  # noqa: E402
from m2jax import filter_cache  # noqa: E402
from m2jax import model as model_lib  # noqa: E402
from benchmarks import common  # noqa: E402

# The long-convolution op's jit (kernels/long_conv_block/api.py): its products are not counted.
LONG_CONV_JIT_NAME = "_block"


def _sub_jaxprs(eqn) -> list:
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                found.append(v)
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                found.append(v.jaxpr)
    return found


def _collect(jaxpr, repeat: int, counts: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            key = (tuple(lhs.shape), tuple(rhs.shape),
                   ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))), str(lhs.dtype))
            counts[key] += repeat
            continue
        if eqn.params.get("name") == LONG_CONV_JIT_NAME:
            continue
        # A scan runs its body `length` times; every other sub-computation (jit, custom_vjp,
        # remat) once per occurrence. A cond counts each branch: the default call has none.
        times = repeat * (eqn.params["length"] if name == "scan" else 1)
        for sub in _sub_jaxprs(eqn):
            _collect(sub, times, counts)


def product_dims(lhs_shape, rhs_shape, dimension_numbers) -> tuple[int, int, int, int]:
    """(batch, m, k, n) of a `dot_general`: the sizes of its batch, lhs-free, contracted and
    rhs-free axes, each multiplied together."""
    (lc, rc), (lb, rb) = dimension_numbers
    size = lambda shape, axes: math.prod(shape[a] for a in axes)  # noqa: E731
    lhs_free = [a for a in range(len(lhs_shape)) if a not in lc and a not in lb]
    rhs_free = [a for a in range(len(rhs_shape)) if a not in rc and a not in rb]
    return (size(lhs_shape, lb), size(lhs_shape, lhs_free), size(lhs_shape, lc),
            size(rhs_shape, rhs_free))


def forward_products(model: nnx.Module, input_ids: np.ndarray) -> list[dict[str, Any]]:
    """The distinct matrix products of `model(input_ids)` outside the long-convolution op.

    Returns:
        One dict per distinct product: `lhs_shape`, `rhs_shape`, `dimension_numbers`, `dtype`,
        `count` (times per call), `bmkn` (batch, m, k, n) and `gflop` (per call, all counts).
    """
    ids, types, mask = model_lib.check_inputs(model.config, input_ids)
    bert = model.bert
    # The filters as the default call gets them (memoised, computed outside the traced call).
    filters = filter_cache.memoised_filters(
        bert, bert.filter_sources(), bert.cfg, ids.shape[1], model_lib._encoder_filters,
        model_lib.lowering_platform(bert.embeddings.word_embeddings.embedding[...]))
    closed = jax.make_jaxpr(model_lib._compiled_call, static_argnums=(0,))(
        "apply", model, ids, types, mask, None, filters)
    counts: collections.Counter = collections.Counter()
    _collect(closed.jaxpr, 1, counts)
    products = []
    for (lhs, rhs, dn, dtype), count in counts.items():
        b, m, k, n = product_dims(lhs, rhs, dn)
        products.append({
            "lhs_shape": list(lhs), "rhs_shape": list(rhs),
            "dimension_numbers": [[list(axes) for axes in pair] for pair in dn],
            "dtype": dtype, "count": count, "bmkn": [b, m, k, n],
            "gflop": 2.0 * b * m * k * n * count / 1e9})
    return sorted(products, key=lambda p: -p["gflop"])


def _dimension_numbers(product: dict) -> tuple:
    (lc, rc), (lb, rb) = product["dimension_numbers"]
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def time_products(products: list[dict], repeats: int, seed: int = 0) -> list[dict]:
    """Each product alone (module docstring), median of `repeats` after one untimed call.

    Returns per product: `as_traced_ms`, `plain_ms` ((b, m, k) x (b, k, n)), `jax_ms` (the
    smaller) and `jax_gflop_per_s`.
    """
    rng = np.random.default_rng(seed)
    timed = []
    for p in products:
        dtype = jnp.dtype(p["dtype"])
        lhs = jnp.asarray(rng.standard_normal(p["lhs_shape"]), dtype)
        rhs = jnp.asarray(rng.standard_normal(p["rhs_shape"]), dtype)
        traced = jax.jit(lambda a, c, dn=_dimension_numbers(p): jax.lax.dot_general(a, c, dn))
        as_traced = common.time_call(lambda: traced(lhs, rhs), warmup=1, repeats=repeats)
        del lhs, rhs
        b, m, k, n = p["bmkn"]
        a_bmk = jnp.asarray(rng.standard_normal((b, m, k)), dtype)
        c_bkn = jnp.asarray(rng.standard_normal((b, k, n)), dtype)
        plain = jax.jit(jnp.matmul)
        plain_t = common.time_call(lambda: plain(a_bmk, c_bkn), warmup=1, repeats=repeats)
        del a_bmk, c_bkn
        best = min(as_traced["median_ms"], plain_t["median_ms"])
        timed.append({**p, "as_traced_ms": as_traced["median_ms"], "plain_ms": plain_t["median_ms"],
                      "jax_ms": best, "jax_gflop_per_s": 2.0 * b * m * k * n / best / 1e6})
    return timed


def floor_ms(timed: list[dict], key: str = "jax_ms") -> float:
    """The call's products alone: sum over products of `count * timed[key]` (ms)."""
    return sum(p["count"] * p[key] for p in timed)


def main() -> None:
    p = common.model_shapes_parser(__doc__, "out/matmul_floor.json")
    p.add_argument("--repeats", type=int, default=5)
    args, shapes = common.parse_args_and_shapes(p, positive=("repeats",))
    env = common.environment()
    rows = []
    for b, l in shapes:
        cfg = m2jax.get_model_config(args.model, max_position_embeddings=l, long_conv_l_max=l)
        model = m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(args.seed))
        ids = np.random.default_rng(l).integers(1, cfg.vocab_size, (b, l)).astype(np.int32)
        timed = time_products(forward_products(model, ids), args.repeats, args.seed)
        del model
        gflop = sum(t["gflop"] for t in timed)
        floor = floor_ms(timed)
        rows.append({"batch": b, "seq_len": l, "products": timed, "gflop": gflop,
                     "floor_ms": floor, "gflop_per_s": gflop / floor * 1e3})
        print(f"\nB={b} L={l}: {gflop:.1f} GFLOP of matmuls per call, {floor:.1f} ms alone "
              f"({gflop / floor * 1e3:.0f} GFLOP/s)")
        print(common.format_table(
            [{**t, "bmkn": "x".join(map(str, t["bmkn"]))} for t in timed],
            [("bmkn", "b x m x k x n"), ("count", "count"), ("gflop", "GFLOP/call"),
             ("as_traced_ms", "as traced ms"), ("plain_ms", "plain ms"),
             ("jax_gflop_per_s", "GFLOP/s")]))
    print(f"wrote {common.write_report(args, env, rows)}")


if __name__ == "__main__":
    main()
