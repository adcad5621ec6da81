"""The console: progress lines (compile time first, then rates, ETA, MFU), durations, and the
library logs kept quiet (m2jax/train/console.py)."""

import logging
import os
from types import SimpleNamespace

import pytest

from m2jax.train.console import ProgressLine, configure_logging, format_duration


class FakeClock:
    def __init__(self, *times: float):
        self._times = iter(times)

    def __call__(self) -> float:
        return next(self._times)


def _devices(kind: str, n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(device_kind=kind)] * n


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (59.6, "00:01:00"), (3599, "00:59:59"), (86399, "23:59:59"),
    (86400, "1d 00:00:00"), (3 * 86400 + 5 * 3600, "3d 05:00:00"), (-5, "00:00:00"),
])
def test_durations_count_days_instead_of_wrapping_at_24_hours(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_reports_rate_eta_and_mfu_on_a_device_with_a_known_peak(capsys):
    # The 70k-step recipe: 4096 x 128 tokens per step, 10 steps in 40 s on two H100s.
    progress = ProgressLine(70_000, 4096 * 128, 6e8, devices=_devices("NVIDIA H100 80GB HBM3", 2),
                            clock=FakeClock(0.0, 100.0, 140.0))
    # The first line comes at once, with the time compiling and running the first step took.
    assert progress.update(10, 2.75, 8e-4) == {"loss": 2.75, "lr": 8e-4}
    assert capsys.readouterr().out == (
        "step 10/70000 | loss 2.7500 | lr 8.00e-04 | compile and first step 100.0 s\n")
    out = progress.update(20, 2.5, 8e-4)
    rate = 10 * 4096 * 128 / 40.0
    assert out["tokens_per_s"] == rate == 131_072
    assert out["mfu"] == pytest.approx(rate * 6e8 / (2 * 989e12), rel=1e-12)  # 3.98%
    # 69,980 steps left at 4 s each: 279,920 s = 3 days 5:45:20.
    assert capsys.readouterr().out == (
        "step 20/70000 | loss 2.5000 | lr 8.00e-04 | 131,072 tok/s | ETA 3d 05:45:20 | MFU 4.0%\n"
    )


def test_progress_line_omits_mfu_where_the_peak_is_unknown_and_leaves_out_evaluations(capsys):
    progress = ProgressLine(100, 1000, 1e9, clock=FakeClock(0.0, 1.0, 5.0))  # this machine's CPUs
    progress.update(10, 1.0, 1e-3)
    progress.exclude(2.0)  # an evaluation between the two lines
    out = progress.update(20, 0.5, 1e-3)
    assert out == {"loss": 0.5, "lr": 1e-3, "tokens_per_s": 5000.0}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "step 20/100 | loss 0.5000 | lr 1.00e-03 | 5,000 tok/s | ETA 00:00:16"
    )


def test_library_logs_are_warnings_only_unless_verbosity_is_given(monkeypatch):
    from absl import logging as absl_logging

    for name in ("TF_CPP_MIN_LOG_LEVEL", "TPU_MIN_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    level, verbosity = root.level, absl_logging.get_verbosity()
    try:
        configure_logging(None)
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1" == os.environ["TPU_MIN_LOG_LEVEL"]
        assert root.level == logging.WARNING and absl_logging.get_verbosity() == absl_logging.WARNING
        configure_logging(0)  # --verbosity=0: INFO from every library
        assert root.level == logging.INFO and absl_logging.get_verbosity() == absl_logging.INFO
    finally:
        root.setLevel(level)
        absl_logging.set_verbosity(verbosity)


def _unretrieved_gather_error(filename: str) -> None:
    """Leaves a gathered future whose coroutine (compiled as if from `filename`) failed, with
    nobody retrieving the error: asyncio reports it when the future is collected."""
    import asyncio
    import gc

    scope: dict = {}
    exec(compile("async def write():\n    raise ValueError('Failed to write: File too large')\n",
                 filename, "exec"), scope)

    async def start_and_drop():
        asyncio.gather(scope["write"]())
        await asyncio.sleep(0.01)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(start_and_drop())
        gc.collect()
    finally:
        loop.close()


def test_a_failed_orbax_saves_unretrieved_futures_leave_no_asyncio_report(caplog):
    # CI once printed two "_GatheringFuture exception was never retrieved" tracebacks after the
    # one-line error of a failed save (test_run_semantics.py, fault 8): the future's repr does not
    # name orbax, its exception's traceback does.
    configure_logging(None)
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    with caplog.at_level(logging.WARNING):
        _unretrieved_gather_error(orbax_file)
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    # The same report from any other code is still shown.
    with caplog.at_level(logging.WARNING):
        _unretrieved_gather_error(os.path.join(os.sep, "somewhere", "else.py"))
    reports = [r for r in caplog.records if r.name == "asyncio"]
    assert len(reports) == 1 and "exception was never retrieved" in reports[0].getMessage()


def test_an_unretrieved_tensorstore_failure_of_an_orbax_save_leaves_no_asyncio_report(caplog):
    # A fresh clone's run printed "Future exception was never retrieved" for futures that
    # tensorstore failed (no Python traceback; the error names orbax's temporary folder).
    import asyncio
    import gc

    configure_logging(None)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING):
            for where in ("/w/checkpoints/4.orbax-checkpoint-tmp/state", "/somewhere/else"):
                loop.create_future().set_exception(
                    ValueError(f'OUT_OF_RANGE: Failed writing: "{where}": File too large'))
                gc.collect()
    finally:
        loop.close()
    reports = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(reports) == 1 and "/somewhere/else" in reports[0], reports
