"""benchmarks/tpu_check.sh --dry_run runs its stages here (kernels interpreted, toy sizes).

The `forward` stage (launch/benchmark.py --smoke) is left out to keep the suite short:
tests/test_kernels_benchmark.py runs that command.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tpu_check_dry_run_runs_every_stage_and_writes_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "TPU_CHECK_STAGES": "kernel_tests,aot_compile,block"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "tpu_check.sh"), "--dry_run"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads((tmp_path / "tpu_check.json").read_text())
    assert codes.get("kernel_tests") == 0 and codes.get("block") == 0, codes
    assert "1 passed" in (tmp_path / "kernel_tests.log").read_text()
    rows = json.loads((tmp_path / "tpu_block_bf16.json").read_text())["block"]
    impls = {(r["implementation"], r["seq_len"]) for r in rows if "median_ms" in r}
    assert impls == {(i, l) for i in ("pallas_mosaic_tpu", "xla_monarch", "xla_fft")
                     for l in (128, 1024)}
    kernel = [r for r in rows if r["implementation"] == "pallas_mosaic_tpu"]
    assert all(r["interpreted"] and r["rel_err_vs_xla"] < 2e-2 for r in kernel)
    assert "versions and devices" in (tmp_path / "tpu_check.log").read_text()
