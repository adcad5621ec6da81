"""CPU forward of M2-BERT-base 80M: m2jax as `from_pretrained` returns it vs the PyTorch reference.

    python benchmarks/cpu_vs_reference.py [--shapes 8x128,1x2048] [--repeats 5]
        [--reference_python /work/refenv/bin/python] [--reference /work/refm2/bert]
        [--out out/cpu_vs_reference.json]

Per shape (B x L): one random M2-BERT-base 80M (float32, `max_position_embeddings = L`) is saved
with `save_pretrained`; m2jax loads it with `from_pretrained` and is called as users call it,
`model(input_ids)` (the compiled call: the first call compiles and is reported apart); the
reference (HazyResearch/m2) loads the same `model.safetensors` strictly and runs out of tree in
its own venv (`benchmarks/reference_forward.py`), so both run the same weights on the same ids,
one after the other, never at the same time. What is timed: encoder + MLM head on all tokens,
the median of `--repeats` calls after one untimed call; then the same call with the filter memo
off (`m2jax.filter_cache.MAX_BYTES = 0`: filters computed every call, as the reference does). Both outputs are compared first (relative
L2 error of the logits). Without the reference's venv or source the m2jax side still runs and the
reference columns say why they are empty. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
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
from benchmarks import common  # noqa: E402

TORCH_TOKENS_PER_S_ISSUE_11 = {(8, 128): 959.0, (1, 2048): 621.0}  # measured when filed
TARGET_SPEEDUP = {(8, 128): 1.2, (1, 2048): 1.5}


def _reference_missing(python: str, reference: str) -> str | None:
    if not os.path.exists(python):
        return f"no PyTorch venv at {python} (--reference_python)"
    if not os.path.isfile(os.path.join(reference, "src", "bert_layers.py")):
        return f"no reference source at {reference} (--reference: the repository's bert/ folder)"
    return None


def time_m2jax(model, ids: np.ndarray, repeats: int) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    logits = jax.block_until_ready(model(ids))
    first_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(model(ids))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"times_ms": times, "compile_and_first_ms": first_ms}, np.asarray(logits)


def time_reference(python: str, reference: str, ckpt: str, ids_path: str, repeats: int,
                   work: str) -> tuple[dict, np.ndarray]:
    out = os.path.join(work, "reference.json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "reference_forward.py"), "--reference", reference,
         "--checkpoint", ckpt, "--ids", ids_path, "--repeats", str(repeats), "--out", out],
        capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"reference_forward.py failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    return result, np.load(os.path.splitext(out)[0] + ".logits.npy")


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
        m2, logits = time_m2jax(model, ids, args.repeats)
        # The same call computing its filters every time, as the reference does (the default
        # call keeps them between calls, m2jax.filter_cache).
        limit, filter_cache.MAX_BYTES = filter_cache.MAX_BYTES, 0
        try:
            no_memo, _ = time_m2jax(model, ids, args.repeats)
        finally:
            filter_cache.MAX_BYTES = limit
        del model
        row["m2jax_filters_every_call_ms"] = statistics.median(no_memo["times_ms"])
        row["m2jax_ms"] = statistics.median(m2["times_ms"])
        row["m2jax_times_ms"] = m2["times_ms"]
        row["m2jax_compile_and_first_ms"] = m2["compile_and_first_ms"]
        row["m2jax_tokens_per_s"] = batch * seq_len / row["m2jax_ms"] * 1e3
        if missing:
            row["reference_note"] = f"skipped: {missing}"
            return row
        ref, ref_logits = time_reference(args.reference_python, args.reference, ckpt, ids_path,
                                         args.repeats, work)
    row["reference_ms"] = statistics.median(ref["times_ms"])
    row["reference_times_ms"] = ref["times_ms"]
    row["reference_torch"] = ref["torch"]
    row["reference_torch_threads"] = ref["torch_threads"]
    row["reference_tokens_per_s"] = batch * seq_len / row["reference_ms"] * 1e3
    row["speedup"] = row["reference_ms"] / row["m2jax_ms"]
    row["speedup_filters_every_call"] = row["reference_ms"] / row["m2jax_filters_every_call_ms"]
    row["target_speedup"] = TARGET_SPEEDUP.get((batch, seq_len))
    row["logits_rel_err"] = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x128,1x2048", help="comma-separated BxL")
    p.add_argument("--model", default="m2-bert-base-80m", help="m2jax.get_model_config name")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference_python", default="/work/refenv/bin/python")
    p.add_argument("--reference", default="/work/refm2/bert")
    p.add_argument("--out", default="out/cpu_vs_reference.json")
    args = p.parse_args()

    missing = _reference_missing(args.reference_python, args.reference)
    if missing:
        print(f"note: the PyTorch reference is not available ({missing}); timing m2jax only.")
    env = common.environment()
    rows = []
    for shape in args.shapes.split(","):
        b, l = (int(v) for v in shape.lower().split("x"))
        rows.append(run_shape(b, l, args, missing))
        r = rows[-1]
        print(f"  B={b} L={l}: m2jax {r['m2jax_tokens_per_s']:.0f} tok/s"
              + (f", reference {r['reference_tokens_per_s']:.0f} tok/s, "
                 f"{r['speedup']:.2f}x (logits rel err {r['logits_rel_err']:.1e})"
                 if "speedup" in r else f"; reference {r['reference_note']}"), flush=True)
    env["load_average_1m_after"] = os.getloadavg()[0]
    common.write_json(args.out, {"environment": env, "settings": vars(args), "rows": rows})
    print()
    print(common.format_table(rows, [
        ("batch", "B"), ("seq_len", "L"), ("m2jax_ms", "m2jax ms"),
        ("m2jax_tokens_per_s", "m2jax tok/s"), ("reference_ms", "reference ms"),
        ("reference_tokens_per_s", "reference tok/s"), ("speedup", "m2jax / reference"),
        ("target_speedup", "target"), ("m2jax_filters_every_call_ms", "m2jax ms, filters every call"),
        ("speedup_filters_every_call", "ratio, filters every call"),
        ("logits_rel_err", "logits rel err")]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
