"""The faults of issue 9 (found by trying the jobs as a new user and by fault injection), one
test each here, or where the issue's number says: re-running, interrupting, misconfiguring or
feeding bad data never loses work. (9 and 10, the launch's exit code on preemption and its
console, are in tests/test_launch.py, which runs the launch itself.)"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from train_fixtures import ROOT, glue_config, pretrain_config, set_fields, snapshot

from m2jax.train.errors import CheckpointError, CheckpointMismatchError, ConfigError, DataError
from m2jax.train.errors import NonFiniteError, WorkdirError
from m2jax.train.jobs import run_glue, run_pretraining

DRIVER = os.path.join(ROOT, "tests", "drivers", "train_driver.py")


# 1 ------------------------------------------------------------------------------------------
def test_01_rerunning_a_finished_pretraining_reports_stored_results_and_changes_nothing(
        tiny_pretraining, capsys):
    workdir, first, config = tiny_pretraining
    before = snapshot(workdir)
    again = run_pretraining(config, workdir)
    assert snapshot(workdir) == before
    assert again == json.load(open(os.path.join(workdir, "results.json")))
    assert again["train"] == first["train"] and again["final_eval"] == first["final_eval"]
    assert "finished before (step 4/4)" in capsys.readouterr().out


# 2 ------------------------------------------------------------------------------------------
def test_02_a_finished_glue_sweep_is_skipped_and_an_unfinished_one_resumes(tiny_pretraining,
                                                                           tmp_path):
    import m2jax

    pretrained, _, _ = tiny_pretraining
    c = glue_config(init_from=os.path.join(pretrained, "final"))
    results = run_glue(c, tmp_path)
    score = results["task_scores"]["wnpos"]
    assert 0.0 <= score <= 1.0 and results["per_seed"] == {"wnpos": [score]}
    run = json.load(open(tmp_path / "wnpos" / "seed_19" / "results.json"))
    assert (run["init_from"], run["step"], run["status"]) == (c.init_from, 3, "completed")
    assert set(run["final_eval"]) >= {"validation/accuracy", "score"}
    tuned = m2jax.from_pretrained(str(tmp_path / "wnpos" / "seed_19" / "final"))
    assert isinstance(tuned, m2jax.M2BertForSequenceClassification)
    before = snapshot(tmp_path)
    assert run_glue(c, tmp_path) == results
    assert snapshot(tmp_path) == before
    # A (task, seed) run that was interrupted is not taken for finished: it resumes.
    seed_results = tmp_path / "wnpos" / "seed_19" / "results.json"
    seed_results.write_text(seed_results.read_text().replace('"completed"', '"running"'))
    assert run_glue(c, tmp_path)["task_scores"] == results["task_scores"]
    assert json.load(open(seed_results))["attempts"][-1]["resumed"] is True


# 3 ------------------------------------------------------------------------------------------
RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def _write_rte(root, train_rows, header=RTE_HEADER):
    (root / "RTE").mkdir(parents=True, exist_ok=True)
    (root / "RTE" / "train.tsv").write_text("\n".join([header, *train_rows]) + "\n")
    (root / "RTE" / "dev.tsv").write_text(RTE_HEADER + "\n0\tA b.\tA.\tentailment\n")


def test_03_glue_label_columns_scores_and_empty_files_are_checked(tmp_path):
    from m2jax.data import glue_dataset

    rows = [f"{i}\tPremise {i}.\tHypothesis {i}.\tentailment" for i in range(4)]
    _write_rte(tmp_path / "misnamed", rows, header="index\tsentence1\tsentence2\tlabels")
    with pytest.raises(ValueError, match=r"RTE/train.tsv:1: no label column 'label'"):
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
    c = glue_config("m2_base_80m", init_from="scratch", task_order=["rte"],
                    **{"data.source": f"tsv:{tmp_path / 'empty'}", "tasks.rte.start_from_task": ""})
    with pytest.raises(DataError, match=r"RTE/train.tsv: no examples"):
        run_glue(c, tmp_path / "workdir")
    assert not (tmp_path / "workdir" / "rte").exists()


# 4 ------------------------------------------------------------------------------------------
def test_04_a_divergent_update_never_reaches_a_checkpoint(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    # One warm-up step (int(0.25 * 4), as Composer): lr 0 at step 1, 1e30 at step 2: that
    # update is finite but diverges.
    c = pretrain_config(**{"optimizer.lr": 1e30, "optimizer.warmup_fraction": 0.25,
                           "optimizer.clip_norm": None, "checkpoint.every": 1,
                           "total_steps": 4, "eval_steps": 0})
    with pytest.raises(NonFiniteError, match=r"step (\d)") as e:
        run_pretraining(c, tmp_path)
    bad_step = int(re.search(r"step (\d)", str(e.value)).group(1))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved == list(range(1, bad_step))
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    params = manager.restore(max(saved), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]
    manager.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
    results = json.load(open(tmp_path / "results.json"))
    assert results["status"] == "failed" and "NonFiniteError" in results["attempts"][-1]["error"]
    # The newest checkpoint resumes cleanly with a sane learning rate.
    resumed = run_pretraining(set_fields(c, **{"optimizer.lr": 1e-3}), tmp_path)
    assert resumed["status"] == "completed"
    assert all(np.isfinite(h["loss"]) for h in resumed["train"])


# 5 ------------------------------------------------------------------------------------------
def _zero_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            open(os.path.join(root, name), "w").close()


def _unfinished_copy(source, target):
    """A copy of a finished run whose end was never recorded (killed after its last save)."""
    shutil.copytree(source, target)
    results = json.load(open(target / "results.json"))
    results["status"] = "running"
    (target / "results.json").write_text(json.dumps(results))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_05_unreadable_checkpoints_and_data_states_stop_the_run_and_touch_nothing(
        tiny_pretraining, tmp_path):
    source, _, config = tiny_pretraining
    workdir = tmp_path / "run"
    _unfinished_copy(source, workdir)
    for step in os.listdir(workdir / "checkpoints"):
        _zero_files(workdir / "checkpoints" / step / "state")
    before = snapshot(workdir)
    with pytest.raises(CheckpointError, match=r"(?s)no checkpoint in .*checkpoints can be "
                                              r"read:\n  step 2: .*\n  step 4: .*--restart"):
        run_pretraining(config, workdir)
    assert snapshot(workdir) == before  # final/ included
    # A data-iterator state that is valid JSON but not this pipeline's: an error naming it.
    workdir = tmp_path / "bad_data_state"
    _unfinished_copy(source, workdir)
    (workdir / "checkpoints" / "4" / "data" / "process_0-of-1.json").write_text('{"foo": 1}')
    before = snapshot(workdir)
    with pytest.raises(CheckpointMismatchError, match=r"data iterator state saved at step 4 .*"
                                                      r"process_0-of-1.json\) does not fit"):
        run_pretraining(config, workdir)
    assert snapshot(workdir) == before


# 6 ------------------------------------------------------------------------------------------
def test_06_files_sources_evaluate_on_their_own_eval_source(tiny_pretraining, tmp_path):
    _, results, config = tiny_pretraining  # trained and evaluated on local files
    assert config.data.source.startswith("files:") and config.data.eval_source.startswith("files:")
    assert [e["step"] for e in results["eval"]] == [2, 4] and results["final_eval"]["mlm_loss"] > 0
    # Without an eval source a 'files:' run is refused at once, naming the field.
    c = pretrain_config(**{"data.source": config.data.source, "data.eval_source": ""})
    with pytest.raises(ConfigError, match=r"config.data.eval_source: empty, but"):
        run_pretraining(c, tmp_path / "run")


# 7 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,field", [
    ({"checkpoint.every": 0}, "checkpoint.every"),
    ({"log_every": 0}, "log_every"),
    ({"accum_steps": 0}, "accum_steps"),
    ({"accum_steps": 3}, "accum_steps"),  # 8 rows do not split into 3 microbatches
    ({"total_steps": 0}, "total_steps"),
    ({"eval_steps": -1}, "eval_steps"),
    ({"optimizer.lr": -1.0}, "optimizer.lr"),
    ({"optimizer.b2": 1.0}, "optimizer.b2"),
    ({"data.mlm_probability": 0.0}, "data.mlm_probability"),
    ({"mesh.data": 0}, "mesh.data"),
    ({"model.hidden_size": 30}, "model"),  # not a multiple of the 4 Monarch blocks
    ({"optimizer.name": "sgd"}, "optimizer"),
])
def test_07_out_of_range_config_values_are_named_before_anything_runs(tmp_path, changes, field):
    with pytest.raises(ConfigError, match=re.escape(f"config.{field}")):
        run_pretraining(pretrain_config(**changes), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_07_glue_config_values_are_checked_too(tmp_path):
    c = glue_config(init_from="scratch", **{"tasks.wnpos.epochs": 0, "eval_batch_size": 0,
                                            "max_steps": -1})
    with pytest.raises(ConfigError) as e:
        run_glue(c, tmp_path)
    for field in ("tasks.wnpos.epochs", "eval_batch_size", "max_steps"):
        assert f"config.{field}:" in str(e.value)
    assert not tmp_path.joinpath("wnpos").exists()


# 8 ------------------------------------------------------------------------------------------
def _driver(env, workdir, *args):
    return subprocess.run([sys.executable, DRIVER, f"--workdir={workdir}", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_08_a_full_disk_stops_the_run_at_once_with_one_message_and_keeps_the_checkpoint(
        subprocess_env, tmp_path):
    proc = _driver(subprocess_env, tmp_path, "--disk_full_after_checkpoint=2",
                   "--set", "checkpoint.async_save=true", "--set", "total_steps=40")
    assert proc.returncode == 7, proc.stdout[-2000:] + proc.stderr[-4000:]
    # One line, naming the save that failed and the checkpoint kept; no traceback.
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    assert "checkpoint of step 4 " in proc.stderr and "File too large" in proc.stderr
    assert "the checkpoint of step 2 is kept" in proc.stderr
    # Noticed before the next save could run (not one checkpoint late), of the 40 steps asked.
    steps = [int(x.split()[1].split("/")[0]) for x in proc.stdout.splitlines()
             if x.startswith("step ")]
    assert max(steps) <= 6, proc.stdout
    # Step 4's partial files stay in orbax's temporary folder (removed by the next run); the
    # checkpoint of step 2 is intact and is what a re-run resumes from.
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()] == ["2"]
    from etils import epath

    from m2jax.train.checkpointing import Checkpointer

    ckpt = Checkpointer(epath.Path(tmp_path / "checkpoints"), keep=3, async_save=False)
    step, params = ckpt.restore_latest_params()
    ckpt.close()
    assert step == 2 and params["bert"]["embeddings"]["word_embeddings"]["embedding"]


def test_08_an_unwritable_work_directory_stops_before_anything_is_built(tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(WorkdirError, match=r"cannot write the work directory .*a_file/run"):
        run_pretraining(pretrain_config(), tmp_path / "a_file" / "run")


# 11 -----------------------------------------------------------------------------------------
def _launch(env, script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_11_help_lists_the_recipes_and_print_config_shows_the_resolved_config(subprocess_env,
                                                                               tmp_path):
    proc = _launch(subprocess_env, "pretrain.py", "--help")
    for name in ("m2_base_80m", "m2_80m_32k", "smoke", "print_config", "--workdir",
                 "restart", "--coordinator_address", "75 preempted"):
        assert name in proc.stdout, (name, proc.stdout)
    proc = _launch(subprocess_env, "finetune_glue.py", "--config=configs/glue.py:smoke",
                   "--print_config", "--config.max_steps=7", "--config.model.hidden_dropout_prob=0.2",
                   f"--workdir={tmp_path / 'unused'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from configs import common

    for line in ("max_steps: 7", "  hidden_dropout_prob: 0.2", "  hidden_size: 128",
                 f"  long_conv_implementation: {common.BASE_MODEL['long_conv_implementation']}",
                 f"long_conv_on_sharded_cpu: {common.LONG_CONV_ON_SHARDED_CPU}",
                 "export_final: true", "  wnpos:"):
        assert line in proc.stdout, (line, proc.stdout)
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


def _embed(env, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "embed.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_12_embed_checks_arguments_first_and_never_overwrites_silently(
        subprocess_env, retrieval_checkpoint, tmp_path):
    """(The mode of the files it writes: tests/test_embed_cli.py, with a umask.)"""
    proc = _embed(subprocess_env, "--checkpoint=/nonexistent", f"--output={tmp_path / 'x.npy'}",
                  "--top_k=0", "--query=q")
    assert proc.returncode != 0 and "--top_k must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "corpus.npy"
    np.save(out, np.zeros((1, 1), np.float32))  # an earlier run's output
    before = snapshot(tmp_path)
    proc = _embed(subprocess_env, "--checkpoint=/nonexistent", "--max_docs=2", f"--output={out}")
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "exists" in proc.stderr
    assert snapshot(tmp_path) == before
    proc = _embed(subprocess_env, f"--checkpoint={retrieval_checkpoint}", "--max_docs=2",
                  f"--output={out}", "--overwrite")
    assert proc.returncode == 0 and np.load(out).shape == (2, 32)
