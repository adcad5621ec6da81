"""The benchmark launcher runs end to end on tiny models and writes the JSON it promises."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_smoke_writes_valid_json(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "benchmark.py"), "--smoke",
         f"--out_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["environment"]["backend"] == "cpu"
    assert data["settings"]["smoke"] is True and data["settings"]["seq_lens"] == [128, 256]

    fwd = data["forward"]
    assert {(r["model"], r["seq_len"]) for r in fwd} == {
        (m, l) for m in ("m2-bert-base-80m[auto]", "bert-base-transformer") for l in (128, 256)}
    for r in fwd:
        assert "error" not in r, r
        assert r["tokens_per_ms"] > 0 and r["median_ms"] > 0
        assert abs(r["tokens_per_ms"] - r["batch"] * r["seq_len"] / r["median_ms"]) < 1e-6
        assert len(r["times_ms"]) == data["settings"]["repeats"]
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]

    block = data["block"]
    prepared = "forward, prepared filters"
    assert {(r["implementation"], r["pass"], r["seq_len"]) for r in block} == (
        {(i, p, l) for i in ("pallas_triton", "xla_fft", "xla_monarch")
         for p in ("forward", "forward+backward") for l in (128, 256)}
        | {("xla_fft", prepared, l) for l in (128, 256)}
        # The dense DFT takes L <= 128 only.
        | {("xla_dense_dft", p, 128) for p in ("forward", "forward+backward", prepared)})
    assert all("error" not in r for r in block)
    assert all(r["interpreted"] for r in block if r["implementation"] == "pallas_triton")
    checked = [r for r in block if r["pass"] != "forward+backward"
               and (r["implementation"], r["pass"]) != ("xla_fft", "forward")]
    assert len(checked) == 8 and all(r["rel_err_vs_xla"] < 1e-5 for r in checked)
    assert all(r["tokens_per_ms"] > 0 for r in block)

    s = data["summary"]
    ratio = s["m2_over_transformer_L128"]
    by = {(r["model"], r["seq_len"]): r["tokens_per_ms"] for r in fwd}
    assert abs(ratio - by[("m2-bert-base-80m[auto]", 128)] / by[("bert-base-transformer", 128)]) < 1e-9
    assert s["m2_L8192_over_L512"] is None  # those lengths were not run
    assert "pallas_triton_speedup_forward_L256" in s and "xla_monarch_speedup_forward_L128" in s
    assert "xla_dense_dft_speedup_forward_prepared_L128" in s
    assert "Summary:" in proc.stdout and "tokens/ms" in proc.stdout


def test_cpu_vs_reference_times_both_calls_and_says_why_the_reference_is_missing(tmp_path):
    """`benchmarks/cpu_vs_reference.py` on the tiny model without the reference's venv: the
    default call and the call computing its filters every time, each with its repeats."""
    out = tmp_path / "cvr.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_vs_reference.py"), "--model", "tiny",
         "--shapes", "1x16,2x16", "--repeats", "2", "--out", str(out),
         "--reference_python", str(tmp_path / "no-venv" / "python")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the PyTorch reference is not available" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["seq_len"]) for r in rows] == [(1, 16), (2, 16)]
    for r in rows:
        assert len(r["m2jax_times_ms"]) == 2 and r["m2jax_ms"] > 0
        assert r["m2jax_filters_every_call_ms"] > 0
        assert r["reference_note"].startswith("skipped: no PyTorch venv")
        assert r["m2jax_matmul_floor_ms"] > 0 and "speedup_bound" not in r
        assert all("reference_ms" not in p for p in r["matmul_products"])


_FAKE_REFERENCE = """#!{python}
# Speaks reference_forward.py's protocol without torch: every call "takes" 50 ms, every product
# 2 ms; logits ones.
import json, os, sys, time
import numpy as np
argv = sys.argv
ids = np.load(argv[argv.index("--ids") + 1])
with open(os.path.join(argv[argv.index("--checkpoint") + 1], "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
log = open({log!r}, "a")
print(json.dumps({{"ready": True, "first_ms": 1.0, "torch": "fake", "torch_threads": 2}}), flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    log.write(command + "\\n"); log.flush()
    if command == "call":
        print(json.dumps({{"ms": 50.0}}), flush=True)
    elif command == "matmuls":
        with open(arg) as f:
            print(json.dumps({{"ms": [2.0] * len(json.load(f))}}), flush=True)
    elif command == "logits":
        np.save(arg, np.ones((*ids.shape, vocab), np.float32))
        print(json.dumps({{"saved": arg}}), flush=True)
    elif command == "exit":
        break
"""


def test_cpu_vs_reference_alternates_the_calls_of_both_sides(tmp_path):
    """The orchestration with a stand-in for the reference's process (same line protocol): each
    phase alternates one call per side, the ratios are those of the times, and the reference's
    logits are compared."""
    fake = tmp_path / "python"
    log = tmp_path / "calls.log"
    fake.write_text(_FAKE_REFERENCE.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    (tmp_path / "ref" / "src").mkdir(parents=True)
    (tmp_path / "ref" / "src" / "bert_layers.py").write_text("")
    out = tmp_path / "cvr.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_vs_reference.py"), "--model", "tiny",
         "--shapes", "1x16", "--repeats", "3", "--out", str(out),
         "--reference_python", str(fake), "--reference", str(tmp_path / "ref")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    products = row["matmul_products"]
    assert log.read_text().split() == (["call"] * 6 + ["matmuls"] * len(products)
                                       + ["logits", "exit"])
    assert len(products) == 6 and all(p["reference_ms"] == 2.0 for p in products)
    assert row["reference_matmul_ms"] == pytest.approx(2.0 * sum(p["count"] for p in products))
    floor = sum(p["count"] * p["jax_ms"] for p in products)
    assert row["m2jax_matmul_floor_ms"] == pytest.approx(floor)
    assert row["speedup_bound"] == pytest.approx(50.0 / floor)
    assert row["reference_times_ms"] == [50.0] * 3
    assert row["reference_times_ms_filters_every_call_rounds"] == [50.0] * 3
    assert row["reference_torch"] == "fake" and row["reference_torch_threads"] == 2
    m2 = row["m2jax_times_ms"]
    assert len(m2) == 3 and len(row["m2jax_filters_every_call_times_ms"]) == 3
    assert abs(row["speedup"] - 50.0 / sorted(m2)[1]) < 1e-9
    assert row["speedup_per_round"]["per_round"] == [50.0 / t for t in m2]
    assert row["speedup_per_round_median"] == sorted(50.0 / t for t in m2)[1]
    assert 0 < row["logits_rel_err"] < 10  # computed against the stand-in's ones
    assert "median of round ratios" in proc.stdout
