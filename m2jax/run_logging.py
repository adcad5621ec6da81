"""Metrics out of a training run: TensorBoard events, a console progress line, results.json."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax

# bf16 dense peak FLOP/s per device, for the model-FLOP-utilisation estimate.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


class MetricWriter:
    """TensorBoard event files through clu when it is installed (it needs tensorflow), else a
    `metrics.jsonl` file; only process 0 writes."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._clu = None
        self._jsonl = None
        if not self._active:
            return
        try:
            from clu import metric_writers

            self._clu = metric_writers.create_default_writer(
                workdir, just_logging=False, asynchronous=False
            )
        except ImportError:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._active:
            return
        if self._clu is not None:
            self._clu.write_scalars(step, dict(scalars))
        else:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self._clu is not None:
            self._clu.flush()
            self._clu.close()
        if self._jsonl is not None:
            self._jsonl.close()


class ProgressLine:
    """`step 120/1000 | loss 6.312 | lr 4.1e-04 | 18,432 tok/s | ETA 0:04:11 | MFU 41%`."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token = flops_per_token
        self._peak = device_peak_flops()
        self._last_time, self._last_step = None, None

    def update(self, step: int, loss: float, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        out = {"loss": loss, "lr": lr}
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) * self.tokens_per_step / (now - self._last_time)
            out["tokens_per_s"] = rate
            eta = (self.total_steps - step) * self.tokens_per_step / rate
            line = (
                f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{rate:,.0f} tok/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
            )
            if self._peak:
                out["mfu"] = rate * self.flops_per_token / (self._peak * jax.device_count())
                line += f" | MFU {100 * out['mfu']:.1f}%"
            logging.info(line)
            print(line, flush=True)
        self._last_time, self._last_step = now, step
        return out


def training_flops_per_token(num_params: int, hidden: int, num_layers: int, seq_len: int) -> float:
    """6 N for the dense work (forward + backward), plus the FFT long convolutions: per layer two
    filter sets of forward+inverse FFTs of length 2L over H channels, ~3 x 5 x 2L log2(2L) each."""
    import math

    n = 2 * seq_len
    fft = num_layers * 2 * 3 * 5 * n * math.log2(n) * hidden / seq_len
    return 6.0 * num_params + fft


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
    """`results.json` in `workdir` (process 0), written atomically."""
    path = os.path.join(workdir, "results.json")
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return path
