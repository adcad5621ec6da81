"""Whole training runs in subprocesses: multi-device and multi-process equality, kill -9 and
resume, corrupt-checkpoint fallback, SIGTERM. Each run is a tiny model on the embedded corpus
(tests/drivers/train_driver.py)."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

DRIVER = os.path.join(os.path.dirname(__file__), "drivers", "train_driver.py")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    os.environ["M2JAX_TEST_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    os.environ.pop("M2JAX_TEST_COMPILE_CACHE", None)


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _run(workdir, *args, expect_rc=0):
    env = _env()
    proc = subprocess.run([sys.executable, DRIVER, f"--workdir={workdir}", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return {h["step"]: h["loss"] for h in results["train"]}, results


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    _run(workdir)
    return workdir, _losses(workdir)[0]


def _assert_close(a, b, steps, rtol=1e-5):
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=rtol)


def test_eight_devices_on_a_2x2x2_mesh_match_one_device(single_device_run, tmp_path):
    _, one = single_device_run
    _run(tmp_path, "--devices=8", "--mesh=2,2,2")
    eight, results = _losses(tmp_path)
    assert results["devices"] == 8 and results["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(eight) == [1, 2, 3, 4, 5, 6]
    _assert_close(eight, one, range(1, 7))
    assert one[6] < one[1]  # and it is learning


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path):
    port = _free_port()
    env = _env()
    procs = [subprocess.Popen([sys.executable, DRIVER, f"--workdir={tmp_path / 'multi'}",
                               "--mesh=2,1,1", f"--process_id={i}", "--num_processes=2",
                               f"--port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    # One process, two devices, fed the concatenation of both hosts' shards.
    _run(tmp_path / "single", "--devices=2", "--mesh=2,1,1", "--hosts=2")
    multi, _ = _losses(tmp_path / "multi")
    single, _ = _losses(tmp_path / "single")
    _assert_close(multi, single, range(1, 7))


def test_kill_9_sigterm_and_corrupt_checkpoint_all_resume_exactly(single_device_run, tmp_path):
    _, uninterrupted = single_device_run
    # kill -9 right after the step-4 checkpoint.
    _run(tmp_path, "--kill_after_checkpoint=4", expect_rc=-signal.SIGKILL)
    assert not os.path.exists(tmp_path / "results.json")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    # Restart: resumes at 4; SIGTERM while fetching its first batch (step 5) saves and stops.
    proc = _run(tmp_path, "--sigterm_at_step=1")
    assert "resumed from step 4" in proc.stdout
    resumed, results = _losses(tmp_path)
    assert results["status"] == "preempted" and results["step"] == 5 and sorted(resumed) == [5]
    assert "5" in os.listdir(tmp_path / "checkpoints")
    # Restart again: resumes at 5 and completes.
    proc = _run(tmp_path)
    assert "resumed from step 5" in proc.stdout
    final, results = _losses(tmp_path)
    assert results["status"] == "completed" and sorted(final) == [6]
    _assert_close({**resumed, **final}, uninterrupted, [5, 6], rtol=1e-6)

    # Corrupt the newest checkpoint: the run warns, sets it aside and resumes from step 5.
    state_dir = tmp_path / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            open(os.path.join(root, name), "w").close()
    proc = _run(tmp_path)
    assert "checkpoint at step 6 could not be restored" in proc.stderr
    assert "resumed from step 5" in proc.stdout
    again, _ = _losses(tmp_path)
    _assert_close(again, uninterrupted, [6], rtol=1e-6)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5", "6", "6.unreadable-0"]
