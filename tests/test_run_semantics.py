"""The twelve faults of issue 9 (found by trying the jobs as a new user and by fault injection),
one test each: re-running, interrupting, misconfiguring or feeding bad data never loses work."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import glue as glue_config  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402

DRIVER = os.path.join(ROOT, "tests", "drivers", "train_driver.py")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, hyena_filter_order=8,
            max_position_embeddings=32, long_conv_l_max=32)
O = "--config.model.overrides"
TINY_FLAGS = [f"{O}.{k}={v}" for k, v in TINY.items()] + ["--config.checkpoint.async_save=False"]
ISSUE = pytest.mark.xfail(strict=True, reason="issue 9: not fixed yet")


def _set(c, **changes):
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _pretrain_config(**changes):
    c = pretrain_config.get_config("smoke")
    c.model.overrides.update(TINY)
    _set(c, global_batch_size=8, total_steps=2, log_every=1, eval_every=0, eval_steps=1,
         **{"checkpoint.every": 2, "checkpoint.async_save": False})
    return _set(c, **changes)


def _glue_config(**changes):
    c = glue_config.get_config("smoke")
    c.model.overrides.update(TINY)
    _set(c, init_from="scratch", max_steps=2, **{"tasks.wnpos.batch_size": 8,
                                                   "checkpoint.async_save": False})
    return _set(c, **changes)


def _snapshot(directory) -> dict[str, str]:
    """Every file under `directory` with a hash of its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _run_pretraining(config, workdir):
    from m2jax.recipes import run_pretraining

    return run_pretraining(config, str(workdir))


def _run_glue(config, workdir):
    from m2jax.recipes import run_glue

    return run_glue(config, str(workdir))


@pytest.fixture(scope="module")
def finished_pretraining(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    results = _run_pretraining(_pretrain_config(), workdir)
    assert results["status"] == "completed"
    return workdir, results


# 1 ------------------------------------------------------------------------------------------
@ISSUE
def test_01_rerunning_a_finished_pretraining_reports_stored_results_and_changes_nothing(
        finished_pretraining):
    workdir, first = finished_pretraining
    before = _snapshot(workdir)
    again = _run_pretraining(_pretrain_config(), workdir)
    assert _snapshot(workdir) == before
    assert again["train"] == first["train"] and again["final_eval"] == first["final_eval"]


# 2 ------------------------------------------------------------------------------------------
@ISSUE
def test_02_rerunning_a_finished_glue_sweep_skips_it_and_changes_nothing(tmp_path):
    first = _run_glue(_glue_config(), tmp_path)
    before = _snapshot(tmp_path)
    again = _run_glue(_glue_config(), tmp_path)
    assert again["task_scores"] == first["task_scores"]
    assert _snapshot(tmp_path) == before


# 3 ------------------------------------------------------------------------------------------
RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def _write_rte(root, train_rows, header=RTE_HEADER):
    (root / "RTE").mkdir(parents=True, exist_ok=True)
    (root / "RTE" / "train.tsv").write_text("\n".join([header, *train_rows]) + "\n")
    (root / "RTE" / "dev.tsv").write_text(RTE_HEADER + "\n0\tA b.\tA.\tentailment\n")


@ISSUE
def test_03_glue_label_column_and_scores_are_checked(tmp_path):
    from m2jax.data import glue_dataset

    rows = [f"{i}\tPremise {i}.\tHypothesis {i}.\tentailment" for i in range(4)]
    _write_rte(tmp_path / "misnamed", rows, header="index\tsentence1\tsentence2\tlabels")
    with pytest.raises(ValueError, match=r"RTE/train.tsv.*no label column 'label'"):
        glue_dataset("rte", "train", f"tsv:{tmp_path / 'misnamed'}")
    stsb = tmp_path / "stsb" / "STS-B"
    stsb.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    scores = ["1.5", "nan", "inf", "-inf", "4.0"] + ["2.0"] * 45
    stsb.joinpath("train.tsv").write_text("\n".join(
        [header] + [f"{i}\tg\tf\ty\to\ts\ts\tA {i}.\tB {i}.\t{s}" for i, s in enumerate(scores)]))
    data = glue_dataset("stsb", "train", f"tsv:{tmp_path / 'stsb'}")
    assert len(data) == 47 and np.isfinite(data.labels).all()
    assert sum(n for reason, n in data.skip_log.counts.items() if "finite" in reason) == 3
    # A header-only training file stops the job before anything is built or compiled.
    _write_rte(tmp_path / "empty", [])
    c = glue_config.get_config("m2_base_80m")
    c.model.overrides.update(TINY)
    _set(c, init_from="scratch", task_order=["rte"], **{"data.source": f"tsv:{tmp_path / 'empty'}",
                                                       "tasks.rte.start_from_task": ""})
    with pytest.raises(ValueError, match=r"RTE/train.tsv.*no examples"):
        _run_glue(c, tmp_path / "workdir")
    assert not (tmp_path / "workdir" / "rte").exists()


# 4 ------------------------------------------------------------------------------------------
@ISSUE
def test_04_a_divergent_update_never_reaches_a_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    c = _pretrain_config(**{"optimizer.lr": 1e30, "optimizer.warmup_fraction": 0.01,
                            "optimizer.clip_norm": None, "checkpoint.every": 1,
                            "total_steps": 6, "eval_steps": 0})
    with pytest.raises(Exception, match=r"not finite.* step (\d)") as e:
        _run_pretraining(c, tmp_path)
    bad_step = int(re.search(r"step (\d)", str(e.value)).group(1))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and max(saved) < bad_step
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    params = manager.restore(max(saved), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]
    manager.close()
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
    # The newest checkpoint resumes cleanly with a sane learning rate.
    resumed = _run_pretraining(_set(c, **{"optimizer.lr": 1e-3}), tmp_path)
    assert resumed["status"] == "completed"
    assert all(np.isfinite(h["loss"]) for h in resumed["train"])


# 5 ------------------------------------------------------------------------------------------
def _zero_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            open(os.path.join(root, name), "w").close()


@ISSUE
def test_05_unreadable_checkpoints_stop_the_run_and_touch_nothing(finished_pretraining, tmp_path):
    import shutil

    source, _ = finished_pretraining
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    os.remove(workdir / "results.json")  # as if killed before the run could record its end
    for step in os.listdir(workdir / "checkpoints"):
        _zero_files(workdir / "checkpoints" / step / "state")
    before = _snapshot(workdir)
    with pytest.raises(Exception, match=r"no checkpoint in .*checkpoints can be read.*step 2"):
        _run_pretraining(_pretrain_config(), workdir)
    assert _snapshot(workdir) == before
    # A data-iterator state that is valid JSON but not this pipeline's: an error naming it.
    workdir = tmp_path / "bad_data_state"
    shutil.copytree(source, workdir)
    os.remove(workdir / "results.json")
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(workdir / "checkpoints" / "2")
                  for f in fs if f.endswith(".json") and "data" in r]
    assert data_files
    for path in data_files:
        with open(path, "w") as f:
            json.dump({"foo": 1}, f)
    before = _snapshot(workdir)
    with pytest.raises(Exception, match=r"data iterator state .*step 2"):
        _run_pretraining(_pretrain_config(), workdir)
    assert _snapshot(workdir) == before


# 6 ------------------------------------------------------------------------------------------
@ISSUE
def test_06_files_sources_evaluate_on_their_own_eval_source(tmp_path):
    for name, n in (("train", 40), ("eval", 12)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name} document {i} about rivers and stones"}) + "\n")
    c = _pretrain_config(**{"data.source": f"files:{tmp_path}/train.jsonl",
                            "data.num_threads": 0})
    c.data.eval_source = f"files:{tmp_path}/eval.jsonl"
    results = _run_pretraining(c, tmp_path / "run")
    assert results["final_eval"]["mlm_loss"] > 0


# 7 ------------------------------------------------------------------------------------------
@ISSUE
@pytest.mark.parametrize("changes,field", [
    ({"checkpoint.every": 0}, "checkpoint.every"),
    ({"log_every": 0}, "log_every"),
    ({"accum_steps": 0}, "accum_steps"),
    ({"accum_steps": 3}, "accum_steps"),  # 8 rows do not split into 3 microbatches
    ({"total_steps": 0}, "total_steps"),
    ({"eval_steps": -1}, "eval_steps"),
])
def test_07_out_of_range_config_values_are_named_before_anything_runs(tmp_path, changes, field):
    with pytest.raises(ValueError, match=re.escape(f"config.{field}")):
        _run_pretraining(_pretrain_config(**changes), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# 8, 9 ---------------------------------------------------------------------------------------
def _driver(workdir, *args, preexec_fn=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, DRIVER, f"--workdir={workdir}", *args],
                          capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=preexec_fn)


@ISSUE
def test_08_a_full_disk_stops_the_run_at_once_with_one_message_and_keeps_the_checkpoint(
        tmp_path):
    proc = _driver(tmp_path, "--disk_full_after_checkpoint=2",
                   "--set", "checkpoint.async_save=true")
    assert proc.returncode == 7, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 4" in errors[0] and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    proc = _driver(tmp_path)
    assert proc.returncode == 0 and "resumed from step 2" in proc.stdout


@ISSUE
def test_09_preemption_exits_with_its_own_code_after_saving(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
         "--config=configs/pretrain.py:smoke", f"--workdir={tmp_path}", *TINY_FLAGS,
         "--config.global_batch_size=8", "--config.total_steps=2000", "--config.log_every=1",
         "--config.eval_steps=0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, out[-2000:] + err[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert results["status"] == "preempted"
    assert str(results["step"]) in os.listdir(tmp_path / "checkpoints")


# 10, 11 -------------------------------------------------------------------------------------
def _launch(script, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@ISSUE
def test_10_the_console_shows_one_line_per_interval_and_no_library_noise(tmp_path):
    proc = _launch("pretrain.py", "--config=configs/pretrain.py:smoke", f"--workdir={tmp_path}",
                   *TINY_FLAGS, "--config.global_batch_size=8", "--config.total_steps=4",
                   "--config.log_every=2", "--config.eval_every=0", "--config.eval_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [x for x in lines if re.match(r"[IW]\d{4} |INFO|oneDNN", x)], lines
    progress = [x for x in lines if x.startswith("step ")]
    assert [x.split()[1] for x in progress] == ["1/4", "2/4", "4/4"], lines
    assert "compile" in progress[0]
    assert len(lines) <= 12, lines


@ISSUE
def test_11_help_lists_the_recipes_and_print_config_shows_the_resolved_config(tmp_path):
    proc = _launch("pretrain.py", "--help")  # absl exits 1 after printing the help
    for name in ("m2_base_80m", "m2_80m_32k", "smoke", "--print_config"):
        assert name in proc.stdout, name
    proc = _launch("finetune_glue.py", "--config=configs/glue.py:smoke", "--print_config",
                   "--config.max_steps=7", f"--workdir={tmp_path / 'unused'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_steps: 7" in proc.stdout and "hidden_size: 128" in proc.stdout
    assert not (tmp_path / "unused").exists()


# 12 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval_checkpoint(tmp_path_factory):
    from flax import nnx

    import m2jax

    cfg = m2jax.get_model_config("tiny", vocab_size=30528, max_position_embeddings=32,
                                 long_conv_l_max=32, num_labels=4)
    path = tmp_path_factory.mktemp("retrieval")
    m2jax.save_pretrained(m2jax.M2BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), str(path))
    return str(path)


def _embed(*args, umask=None):
    def set_umask():
        os.umask(umask)

    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "embed.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          preexec_fn=set_umask if umask is not None else None)


@ISSUE
def test_12_embed_checks_arguments_first_and_never_overwrites_silently(retrieval_checkpoint,
                                                                        tmp_path):
    proc = _embed("--checkpoint=/nonexistent", f"--output={tmp_path / 'x.npy'}", "--top_k=0",
                  "--query=q")
    assert proc.returncode != 0 and "--top_k" in proc.stderr
    out = tmp_path / "corpus.npy"
    proc = _embed(f"--checkpoint={retrieval_checkpoint}", "--max_docs=4", f"--output={out}",
                  umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o644)
    before = _snapshot(tmp_path)
    proc = _embed(f"--checkpoint={retrieval_checkpoint}", "--max_docs=2", f"--output={out}")
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert _snapshot(tmp_path) == before
    proc = _embed(f"--checkpoint={retrieval_checkpoint}", "--max_docs=2", f"--output={out}",
                  "--overwrite")
    assert proc.returncode == 0 and np.load(out).shape[0] == 2
