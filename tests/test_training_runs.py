"""Whole training runs in subprocesses: multi-device and multi-process equality, kill -9 and
resume, preemption (its exit code), corrupt-checkpoint fallback. Each run is a tiny model on the
embedded corpus (tests/drivers/train_driver.py, the launch's job and exit codes)."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from train_fixtures import ROOT

DRIVER = os.path.join(ROOT, "tests", "drivers", "train_driver.py")


def _run(env, workdir, *args, expect_rc=0):
    proc = subprocess.run([sys.executable, DRIVER, f"--workdir={workdir}", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return {h["step"]: h["loss"] for h in results["train"]}, results


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, subprocess_env):
    workdir = tmp_path_factory.mktemp("single")
    _run(subprocess_env, workdir)
    return workdir, _losses(workdir)[0]


def _assert_close(a, b, steps, rtol=1e-5):
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=rtol)


def test_eight_devices_on_a_2x2x2_mesh_match_one_device(single_device_run, tmp_path,
                                                        subprocess_env):
    _, one = single_device_run
    _run(subprocess_env, tmp_path, "--devices=8", "--mesh=2,2,2")
    eight, results = _losses(tmp_path)
    assert results["devices"] == 8 and results["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(eight) == [1, 2, 3, 4, 5, 6]
    _assert_close(eight, one, range(1, 7))
    assert one[6] < one[1]  # and it is learning


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path, subprocess_env):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, DRIVER, f"--workdir={tmp_path / 'multi'}",
                               "--mesh=2,1,1", f"--process_id={i}", "--num_processes=2",
                               f"--port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=subprocess_env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    # Only process 0 prints (gloo, the CPU collectives, announces its connections itself).
    assert [x for x in outs[1].splitlines() if not x.startswith("[Gloo]")] == [], outs[1]
    # One process, two devices, fed the concatenation of both hosts' shards.
    _run(subprocess_env, tmp_path / "single", "--devices=2", "--mesh=2,1,1", "--hosts=2")
    multi, _ = _losses(tmp_path / "multi")
    single, _ = _losses(tmp_path / "single")
    _assert_close(multi, single, range(1, 7))


def test_kill_9_sigterm_and_corrupt_checkpoint_all_resume_exactly(single_device_run, tmp_path,
                                                                  subprocess_env):
    _, uninterrupted = single_device_run
    env = subprocess_env
    # kill -9 right after the step-4 checkpoint: results.json has the history up to it.
    _run(env, tmp_path, "--kill_after_checkpoint=4", expect_rc=-signal.SIGKILL)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    killed, results = _losses(tmp_path)
    assert (results["status"], results["step"]) == ("running", 4) and sorted(killed) == [1, 2, 3, 4]
    # Restart: resumes at 4; SIGTERM while fetching its first batch (step 5) saves and stops
    # with the preemption exit code.
    proc = _run(env, tmp_path, "--sigterm_at_step=1", expect_rc=75)
    assert "resumed from step 4" in proc.stdout
    assert "preempted at step 5/6 (saved); re-run the same command to resume" in proc.stdout
    resumed, results = _losses(tmp_path)
    assert results["status"] == "preempted" and results["step"] == 5
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # the history kept, not replaced
    assert "5" in os.listdir(tmp_path / "checkpoints")
    # Restart again: resumes at 5 and completes; every step equals the uninterrupted run's.
    proc = _run(env, tmp_path)
    assert "resumed from step 5" in proc.stdout
    final, results = _losses(tmp_path)
    assert results["status"] == "completed" and sorted(final) == [1, 2, 3, 4, 5, 6]
    assert [a["status"] for a in results["attempts"]] == ["running", "preempted", "completed"]
    _assert_close(final, uninterrupted, range(1, 7), rtol=1e-6)

    # Killed after its last save (its end never recorded), the newest checkpoint corrupt: the
    # run warns, sets it aside and resumes from step 5.
    results["status"] = "running"
    (tmp_path / "results.json").write_text(json.dumps(results))
    state_dir = tmp_path / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            open(os.path.join(root, name), "w").close()
    proc = _run(env, tmp_path)
    assert "checkpoint at step 6 could not be restored" in proc.stderr
    assert "resumed from step 5" in proc.stdout
    again, _ = _losses(tmp_path)
    _assert_close(again, uninterrupted, range(1, 7), rtol=1e-6)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5", "6", "6.unreadable-0"]


def test_a_work_directory_on_cloud_storage_trains_resumes_exports_and_initialises(
        single_device_run, tmp_path, subprocess_env):
    """gs:// through a fake GCS (tests/fake_gcs.py: epath and tensorstore's GCS driver reach the
    same objects, which are files under `bucket/`). Every file the run writes lands in the
    bucket: nothing on the local file system, so no path went around epath."""
    _, uninterrupted = single_device_run
    root, cwd = tmp_path / "gcs", tmp_path / "cwd"
    cwd.mkdir()

    def run(workdir, *args, expect_rc=0):
        proc = subprocess.run([sys.executable, DRIVER, f"--workdir={workdir}",
                               f"--fake_gcs={root}", "--set", "export_final=true", *args],
                              capture_output=True, text=True, env=subprocess_env, cwd=cwd,
                              timeout=600)
        assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run("gs://bucket/run", "--sigterm_at_step=3", expect_rc=75)
    proc = run("gs://bucket/run", "--then_load=gs://bucket/run/final")
    assert "resumed from step 3 (gs://bucket/run/checkpoints/3)" in proc.stdout
    bucket = root / "bucket" / "run"
    assert sorted(os.listdir(bucket)) == ["checkpoints", "config.json", "final", "metrics.jsonl",
                                          "results.json"]
    assert sorted(os.listdir(bucket / "checkpoints")) == ["3", "4", "6"]
    losses, results = _losses(bucket)
    assert [a["status"] for a in results["attempts"]] == ["preempted", "completed"]
    _assert_close(losses, uninterrupted, range(1, 7), rtol=1e-6)
    assert [json.loads(x)["step"] for x in open(bucket / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # The export, read back from the bucket as another run's init_from: the trained weights.
    import m2jax

    final = m2jax.from_pretrained(str(bucket / "final"))
    table = final.bert.embeddings.word_embeddings.embedding[...]
    loaded = float(proc.stdout.split("word embeddings sum ")[1].split()[0])
    np.testing.assert_allclose(loaded, float(table.sum()), rtol=1e-6)
    assert os.listdir(cwd) == []
