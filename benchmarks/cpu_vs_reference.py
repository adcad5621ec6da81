"""CPU forward of M2-BERT-base 80M: m2jax as `from_pretrained` returns it vs the PyTorch reference.

    python benchmarks/cpu_vs_reference.py [--shapes 8x128,1x2048] [--repeats 5]
        [--reference_python /work/refenv/bin/python] [--reference /work/refm2/bert]
        [--out out/cpu_vs_reference.json]

Per shape (B x L): one random M2-BERT-base 80M (float32, `max_position_embeddings = L`) is saved
with `save_pretrained`; m2jax loads it with `from_pretrained` and is called as users call it,
`model(input_ids)` (the compiled call: the first call compiles and is reported apart); the
reference (HazyResearch/m2) loads the same `model.safetensors` strictly and runs out of tree in
its own venv (`benchmarks/reference_forward.py`, a process that serves timed calls), so both run
the same weights on the same ids. What is timed: encoder + MLM head on all tokens, `--repeats`
calls of each side after one untimed call, alternating m2jax / reference call by call (never at
the same time, a short pause before each), so that both sides meet the same machine: on a
shared machine the speed drifts by tens of percent within minutes, and timing one side's calls
after the other's measured the drift as much as the code. Then the same alternation with the
filter memo off (`m2jax.filter_cache.MAX_BYTES = 0`: filters computed every call, as the
reference does). Reported: the medians of each side and their ratio (the target), and the
median, min and max of the per-round ratios. Both outputs are compared first (relative L2 error
of the logits). Last, the call's matrix products alone (`matmul_floor.py`), each timed in m2jax
then in torch, alternating product by product: their sum in m2jax is a floor under the m2jax
call, so `reference ms / floor` bounds the speedup any arrangement of the rest of the call could
reach with these matmuls on this host (`speedup_bound`). Without the reference's venv or source
the m2jax side still runs and the reference columns say why they are empty. Prints tables;
writes JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import m2jax  # noqa: E402
from m2jax import filter_cache  # noqa: E402
from benchmarks import common, matmul_floor  # noqa: E402

TORCH_TOKENS_PER_S_ISSUE_11 = {(8, 128): 959.0, (1, 2048): 621.0}  # measured when filed
TARGET_SPEEDUP = {(8, 128): 1.2, (1, 2048): 1.5}


def _reference_missing(python: str, reference: str) -> str | None:
    if not os.path.exists(python):
        return f"no PyTorch venv at {python} (--reference_python)"
    if not os.path.isfile(os.path.join(reference, "src", "bert_layers.py")):
        return f"no reference source at {reference} (--reference: the repository's bert/ folder)"
    return None


# Before each timed call: lets the other side's worker threads (torch's OpenMP pool, XLA's
# thread pool) stop spinning after its call, so the two never overlap.
PAUSE_S = 0.2


def time_m2jax_call(model, ids: np.ndarray) -> tuple[float, jax.Array]:
    time.sleep(PAUSE_S)
    t0 = time.perf_counter()
    logits = jax.block_until_ready(model(ids))
    return (time.perf_counter() - t0) * 1e3, logits


class ReferenceServer:
    """The reference's forward in its own venv (`reference_forward.py`), one call per request."""

    def __init__(self, python: str, reference: str, ckpt: str, ids_path: str):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self._proc = subprocess.Popen(
            [python, str(ROOT / "benchmarks" / "reference_forward.py"), "--reference", reference,
             "--checkpoint", ckpt, "--ids", ids_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        self.info = self._read()  # loaded, one untimed call done

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise RuntimeError(f"reference_forward.py failed:\n{self._proc.stderr.read()[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"reference_forward.py: {reply['error']}")
        return reply

    def _ask(self, command: str) -> dict:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._read()

    def call(self) -> float:
        time.sleep(PAUSE_S)
        return self._ask("call")["ms"]

    def logits(self, path: str) -> np.ndarray:
        self._ask(f"logits {path}")
        return np.load(path)

    def matmuls(self, products: list[dict], repeats: int, path: str) -> list[float]:
        """Median ms of each product alone in torch (`reference_forward.py`'s ``matmuls``)."""
        with open(path, "w") as f:
            json.dump([{"bmkn": p["bmkn"], "repeats": repeats} for p in products], f)
        time.sleep(PAUSE_S)
        return self._ask(f"matmuls {path}")["ms"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.write("exit\n")
            self._proc.stdin.close()
            self._proc.wait(timeout=60)


def alternate(m2jax_call, reference_call, repeats: int) -> tuple[list[float], list[float]]:
    """`repeats` rounds of one m2jax call then one reference call (None: m2jax only)."""
    m2, ref = [], []
    for _ in range(repeats):
        m2.append(m2jax_call())
        if reference_call is not None:
            ref.append(reference_call())
    return m2, ref


def _ratios(ref_ms: list[float], m2_ms: list[float]) -> dict:
    per_round = [r / m for r, m in zip(ref_ms, m2_ms)]
    return {"ratio_of_medians": statistics.median(ref_ms) / statistics.median(m2_ms),
            "per_round": per_round, "per_round_median": statistics.median(per_round),
            "per_round_min": min(per_round), "per_round_max": max(per_round)}


def matmul_products(model, ids: np.ndarray, server: ReferenceServer | None, repeats: int,
                    path: str) -> list[dict]:
    """The call's products (`matmul_floor.forward_products`), each timed alone in m2jax and then
    (with a server) in torch: `jax_ms` etc. as `matmul_floor.time_products`, `reference_ms`."""
    timed = []
    for product in matmul_floor.forward_products(model, ids):
        time.sleep(PAUSE_S)
        [row] = matmul_floor.time_products([product], repeats)
        if server is not None:
            [row["reference_ms"]] = server.matmuls([product], repeats, path)
        timed.append(row)
    return timed


def run_shape(batch: int, seq_len: int, args, missing: str | None) -> dict:
    cfg = m2jax.get_model_config(args.model, max_position_embeddings=seq_len,
                                 long_conv_l_max=seq_len)
    row: dict = {"batch": batch, "seq_len": seq_len, "tokens": batch * seq_len}
    with tempfile.TemporaryDirectory() as work:
        ckpt = os.path.join(work, "ckpt")
        m2jax.save_pretrained(m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(args.seed)), ckpt)
        model = m2jax.from_pretrained(ckpt)
        ids = np.random.default_rng(seq_len).integers(
            1, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
        ids_path = os.path.join(work, "ids.npy")
        np.save(ids_path, ids)
        t0 = time.perf_counter()
        logits = jax.block_until_ready(model(ids))
        row["m2jax_compile_and_first_ms"] = (time.perf_counter() - t0) * 1e3
        server = None
        if missing:
            row["reference_note"] = f"skipped: {missing}"
        else:
            server = ReferenceServer(args.reference_python, args.reference, ckpt, ids_path)
        try:
            reference_call = None if server is None else server.call
            m2, ref = alternate(lambda: time_m2jax_call(model, ids)[0], reference_call,
                                args.repeats)
            # The same call computing its filters every time, as the reference does (the
            # default call keeps them between calls, m2jax.filter_cache).
            limit, filter_cache.MAX_BYTES = filter_cache.MAX_BYTES, 0
            try:
                time_m2jax_call(model, ids)  # compiles the call without filters
                no_memo, ref2 = alternate(lambda: time_m2jax_call(model, ids)[0],
                                          reference_call, args.repeats)
            finally:
                filter_cache.MAX_BYTES = limit
            products = matmul_products(model, ids, server, args.repeats,
                                       os.path.join(work, "matmuls.json"))
            if server is not None:
                ref_logits = server.logits(os.path.join(work, "reference_logits.npy"))
                row["reference_torch"] = server.info["torch"]
                row["reference_torch_threads"] = server.info["torch_threads"]
        finally:
            if server is not None:
                server.close()
        del model
    row["m2jax_ms"] = statistics.median(m2)
    row["m2jax_times_ms"] = m2
    row["m2jax_tokens_per_s"] = batch * seq_len / row["m2jax_ms"] * 1e3
    row["m2jax_filters_every_call_ms"] = statistics.median(no_memo)
    row["m2jax_filters_every_call_times_ms"] = no_memo
    row["matmul_products"] = products
    row["matmul_gflop"] = sum(p["gflop"] for p in products)
    row["m2jax_matmul_floor_ms"] = matmul_floor.floor_ms(products)
    if server is None:
        return row
    row["reference_matmul_ms"] = matmul_floor.floor_ms(products, "reference_ms")
    row["reference_ms"] = statistics.median(ref)
    row["speedup_bound"] = row["reference_ms"] / row["m2jax_matmul_floor_ms"]
    row["reference_times_ms"] = ref
    row["reference_times_ms_filters_every_call_rounds"] = ref2
    row["reference_tokens_per_s"] = batch * seq_len / row["reference_ms"] * 1e3
    main_ratios, no_memo_ratios = _ratios(ref, m2), _ratios(ref2, no_memo)
    row["speedup"] = main_ratios["ratio_of_medians"]
    row["speedup_per_round"] = main_ratios
    row["speedup_per_round_median"] = main_ratios["per_round_median"]
    row["speedup_filters_every_call"] = no_memo_ratios["ratio_of_medians"]
    row["speedup_filters_every_call_per_round"] = no_memo_ratios
    row["target_speedup"] = TARGET_SPEEDUP.get((batch, seq_len))
    logits = np.asarray(logits)
    row["logits_rel_err"] = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
    return row


def main() -> None:
    p = common.model_shapes_parser(__doc__, "out/cpu_vs_reference.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reference_python", default="/work/refenv/bin/python")
    p.add_argument("--reference", default="/work/refm2/bert")
    args, shapes = common.parse_args_and_shapes(p, positive=("repeats",))

    missing = _reference_missing(args.reference_python, args.reference)
    if missing:
        print(f"note: the PyTorch reference is not available ({missing}); timing m2jax only.")
    env = common.environment()
    rows = []
    for b, l in shapes:
        rows.append(run_shape(b, l, args, missing))
        r = rows[-1]
        print(f"  B={b} L={l}: m2jax {r['m2jax_tokens_per_s']:.0f} tok/s"
              + (f", reference {r['reference_tokens_per_s']:.0f} tok/s, "
                 f"{r['speedup']:.2f}x (rounds {r['speedup_per_round']['per_round_min']:.2f}-"
                 f"{r['speedup_per_round']['per_round_max']:.2f}x; logits rel err "
                 f"{r['logits_rel_err']:.1e})"
                 if "speedup" in r else f"; reference {r['reference_note']}"), flush=True)
    path = common.write_report(args, env, rows)
    print()
    print(common.format_table(rows, [
        ("batch", "B"), ("seq_len", "L"), ("m2jax_ms", "m2jax ms"),
        ("m2jax_tokens_per_s", "m2jax tok/s"), ("reference_ms", "reference ms"),
        ("reference_tokens_per_s", "reference tok/s"), ("speedup", "m2jax / reference"),
        ("speedup_per_round_median", "median of round ratios"), ("target_speedup", "target"),
        ("m2jax_filters_every_call_ms", "m2jax ms, filters every call"),
        ("speedup_filters_every_call", "ratio, filters every call"),
        ("logits_rel_err", "logits rel err")]))
    print("\nThe call's matrix products alone (benchmarks/matmul_floor.py): m2jax's sum is a floor "
          "under its call, so reference ms / floor bounds the speedup on this host.")
    print(common.format_table(rows, [
        ("batch", "B"), ("seq_len", "L"), ("matmul_gflop", "GFLOP/call"),
        ("m2jax_matmul_floor_ms", "m2jax matmuls ms"), ("reference_matmul_ms", "torch matmuls ms"),
        ("m2jax_ms", "m2jax call ms"), ("reference_ms", "reference call ms"),
        ("speedup_bound", "bound on m2jax / reference")]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
