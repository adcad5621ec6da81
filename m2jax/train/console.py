"""What a run prints: one progress line per log interval, evaluations, a final summary; and the
library logs (absl, orbax, TensorFlow, libtpu) kept out of the way unless asked for.

Lines are printed (stdout, process 0 only), never also logged, so each appears once. Warnings
of m2jax and the libraries still go to stderr through Python's logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import jax

from m2jax.train.flops import total_peak_flops

# Environment variables that the C++ logging of TensorFlow (tfds and TensorBoard import it),
# XLA, libtpu and gRPC read when they load: at level 1 their INFO lines stay out. TensorFlow only
# reads data and writes event files here, so its oneDNN kernels (whose notice it prints however
# the level is set) are not needed.
_QUIET_NATIVE_LOGS = {
    "TF_CPP_MIN_LOG_LEVEL": "1",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "TPU_MIN_LOG_LEVEL": "1",
    "TPU_STDERR_LOG_LEVEL": "1",
    "GRPC_VERBOSITY": "ERROR",
}


def configure_logging(verbosity: int | None) -> None:
    """Library logs for a launch. `verbosity` is absl's `--verbosity` when given on the command
    line (0 = INFO, 1 = DEBUG), None otherwise: then only warnings and errors are shown.

    Must run before TensorFlow or libtpu is loaded (the launches call it first thing)."""
    from absl import logging as absl_logging

    if verbosity is None:
        for name, value in _QUIET_NATIVE_LOGS.items():
            os.environ.setdefault(name, value)
        absl_logging.set_verbosity(absl_logging.WARNING)
        for name in ("absl", "orbax", "asyncio"):
            if not any(isinstance(f, _OrbaxErrorFilter) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(_OrbaxErrorFilter())
        sys.excepthook = _without_closed_loop_noise(sys.excepthook)
        sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    else:
        absl_logging.set_verbosity(verbosity)
    # Python loggers (jax, grain) follow the root logger, which absl's verbosity does not set.
    root = (
        logging.WARNING if verbosity is None else logging.DEBUG if verbosity > 0 else logging.INFO
    )
    logging.getLogger().setLevel(root)


class _OrbaxErrorFilter(logging.Filter):
    """Drops orbax's own error reports (a traceback from each of its threads and asyncio tasks):
    an orbax failure reaches the run as an exception, which the run reports once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        orbax = f"{os.sep}orbax{os.sep}"
        if orbax in record.pathname:
            return False
        if record.name != "asyncio":
            return True
        # asyncio's "... exception was never retrieved" for the tasks and gathered futures of a
        # failed orbax save, reported when the garbage collector reaches them (so at a moment
        # that varies from run to run). Each names orbax somewhere in its text: a task's repr its
        # orbax coroutine, a gathered future's traceback orbax's files, and the error of a future
        # that tensorstore failed (no Python traceback) orbax's temporary folder.
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        return orbax not in text and ".orbax-checkpoint-tmp" not in text


def _without_closed_loop_noise(hook):
    """`hook` (sys.excepthook or sys.unraisablehook) without the "Event loop is closed" errors
    that tensorstore's callbacks print when orbax has stopped a failed save's event loop."""
    if getattr(hook, "_m2jax_filtered", False):
        return hook

    def filtered(*args):
        error = args[1] if len(args) == 3 else getattr(args[0], "exc_value", None)
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        hook(*args)

    filtered._m2jax_filtered = True
    return filtered


def say(line: str) -> None:
    """Prints one console line (process 0 only)."""
    if jax.process_index() == 0:
        print(line, flush=True)


def format_duration(seconds: float) -> str:
    """`HH:MM:SS`, with a day count in front from 24 h on (`3d 05:00:00`): long runs take days."""
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")


class ProgressLine:
    """`step 120/1000 | loss 6.3120 | lr 4.10e-04 | 18,432 tok/s | ETA 00:04:11 | MFU 41.0%`.

    The first update (the first step of an attempt) prints how long compiling and running that
    step took instead of a rate; later rates are measured between consecutive updates, leaving
    out what `exclude` was told (evaluations, saves), so neither compilation nor evaluation
    counts. MFU = achieved model FLOP/s / summed peak of `devices`, shown only
    when every device's peak is known (`m2jax.train.flops.PEAK_FLOPS`).
    """

    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        *,
        devices: Sequence[Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token = flops_per_token
        self._peak = total_peak_flops(devices)
        self._clock = clock
        self._start = clock()
        self._last_time, self._last_step = None, None
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (an evaluation, a checkpoint save) out of the next rate."""
        self._excluded += seconds

    def update(self, step: int, loss: float, lr: float) -> dict[str, float]:
        """Prints the line of `step` and returns its scalars (loss, lr, tokens_per_s, mfu)."""
        now = self._clock()
        out = {"loss": loss, "lr": lr}
        line = f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e}"
        if self._last_time is None:
            line += f" | compile and first step {now - self._start:.1f} s"
        elif step > self._last_step:
            elapsed = max(now - self._last_time - self._excluded, 1e-9)
            rate = (step - self._last_step) * self.tokens_per_step / elapsed
            out["tokens_per_s"] = rate
            eta = (self.total_steps - step) * self.tokens_per_step / rate
            line += f" | {rate:,.0f} tok/s | ETA {format_duration(eta)}"
            if self._peak:
                out["mfu"] = rate * self.flops_per_token / self._peak
                line += f" | MFU {100 * out['mfu']:.1f}%"
        say(line)
        self._last_time, self._last_step, self._excluded = now, step, 0.0
        return out
