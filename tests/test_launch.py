"""The absl launches (`launch/pretrain.py`, `launch/finetune_glue.py`) as users run them: config
file flags, `--config.x.y` overrides (every model field), `--workdir`, the multi-process flags;
a run and its re-run, with its console and exit codes (issue 9: 1, 10)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from train_fixtures import ROOT, TINY, snapshot

import m2jax
from launch.common import unknown_override
from m2jax.train import distributed

PRETRAIN_VARIANTS = ["m2_base_80m", "m2_base_110m", "m2_large_260m", "m2_large_341m",
                     "m2_80m_2k", "m2_80m_8k", "m2_80m_32k", "smoke"]
GLUE_VARIANTS = ["m2_base_80m", "m2_base_110m", "m2_large_260m", "m2_large_341m", "smoke"]

O = "--config.model"
TINY_FLAGS = [f"{O}.{k}={v}" for k, v in TINY.items()] + ["--config.checkpoint.async_save=False"]


def _launch(env, script, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ---------------------------------------------------------------------------------------------
# Model fields from the command line, through config_flags' real parsing (in-process).


def _parse(config_file, variant, *overrides):
    argv = ["launch", f"--config={os.path.join(ROOT, 'configs', config_file)}:{variant}",
            *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    values(argv)
    return holder.value


def _changed_value(kind, value):
    """A value of the field's type that differs from the variant's."""
    if kind is bool:
        return not value
    if kind is int:
        return value + 3
    if kind is float:
        return 0.375 if value != 0.375 else 0.25
    return value + "_changed"


def _flag_text(value):
    return str(value) if not isinstance(value, bool) else ("true" if value else "false")


@pytest.mark.parametrize("config_file,variant",
                         [("pretrain.py", v) for v in PRETRAIN_VARIANTS]
                         + [("glue.py", v) for v in GLUE_VARIANTS])
def test_every_model_field_can_be_overridden_with_its_type(config_file, variant):
    import typing

    default = _parse(config_file, variant).model
    hints = typing.get_type_hints(m2jax.M2BertConfig)
    wanted = {}
    for field in dataclasses.fields(m2jax.M2BertConfig):
        kind = default.get_type(field.name)
        assert kind in (bool, int, float, str), (field.name, kind)
        assert kind in (hints[field.name], *typing.get_args(hints[field.name])), field.name
        wanted[field.name] = _changed_value(kind, default[field.name])
    c = _parse(config_file, variant, *[f"{O}.{k}={_flag_text(v)}" for k, v in wanted.items()])
    assert c.model.to_dict() == wanted


def test_model_field_values_are_type_checked():
    assert _parse("glue.py", "smoke", f"{O}.classifier_dropout=0.25").model \
        .classifier_dropout == 0.25
    assert _parse("pretrain.py", "smoke", f"{O}.hyena_w=7").model.hyena_w == 7.0
    with pytest.raises(flags.IllegalFlagValueError, match="classifier_dropout=abc"):
        _parse("glue.py", "smoke", f"{O}.classifier_dropout=abc")
    with pytest.raises(flags.IllegalFlagValueError, match="hidden_size=1.5"):
        _parse("pretrain.py", "smoke", f"{O}.hidden_size=1.5")


def test_unknown_override_names_the_field():
    config = f"--config={os.path.join(ROOT, 'configs', 'pretrain.py')}:smoke"
    assert unknown_override(["launch", config, f"{O}.hidden_size=8"]) is None
    message = unknown_override(["launch", config, "--config.total_steps=3", f"{O}.hiden_size=8"])
    assert message.startswith(
        "--config.model.hiden_size: config.model has no field 'hiden_size' "
        "(did you mean 'hidden_size'?)")
    assert "vocab_size" in message
    spec = config.split("=")[1]  # the two-argument form, `--config FILE:VARIANT`
    message = unknown_override(["launch", "--config", spec, "--config.optimzer.lr=1"])
    assert message.startswith("--config.optimzer.lr: config has no field 'optimzer'")


def test_launch_reports_an_unknown_model_field_clearly(subprocess_env):
    proc = _launch(subprocess_env, "pretrain.py", "--config=configs/pretrain.py:smoke",
                   "--workdir=unused", f"{O}.long_conv_implementaton=monarch")
    assert proc.returncode == 1
    assert ("FATAL Flags parsing error: --config.model.long_conv_implementaton: "
            "config.model has no field 'long_conv_implementaton' (did you mean "
            "'long_conv_implementation'?)") in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Pretraining run and re-run; GLUE from its export, run and re-run. The console of each.

PRETRAIN_FLAGS = ["--config=configs/pretrain.py:smoke", *TINY_FLAGS,
                  "--config.global_batch_size=8", "--config.total_steps=20",
                  "--config.log_every=5", "--config.eval_every=10", "--config.eval_steps=1",
                  "--config.checkpoint.every=10"]


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory, subprocess_env):
    """The smoke launch run to the end, then run again on the same work directory."""
    workdir = str(tmp_path_factory.mktemp("launch") / "pretrain")
    args = [*PRETRAIN_FLAGS, f"--workdir={workdir}"]
    completed = _launch(subprocess_env, "pretrain.py", *args)
    before = snapshot(workdir)
    again = _launch(subprocess_env, "pretrain.py", *args)
    return workdir, completed, (before, again)


def test_10_the_console_shows_each_line_once_without_library_noise(pretrain_runs):
    """(The preempted launch's exit code, 75: tests/test_training_runs.py, through the same
    `launch.common.run_and_report`.)"""
    workdir, completed, _ = pretrain_runs
    _ok(completed)
    lines = (completed.stdout + completed.stderr).splitlines()
    assert lines[0].startswith("pretraining smoke: 1 layers x 32, L 32, 20 steps of 8 rows")
    assert re.match(r"step 1/20 \| loss [\d.]+ \| lr [\d.e+-]+ \| compile and first step "
                    r"[\d.]+ s$", lines[1]), lines
    progress = [int(x.split()[1].split("/")[0]) for x in lines if x.startswith("step ")]
    assert progress == [1, 5, 10, 15, 20], lines
    assert re.match(r"step 5/20 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s \| ETA "
                    r"\d\d:\d\d:\d\d$", lines[2]), lines
    assert [x.split(":")[0] for x in lines if x.startswith("eval")] == \
        ["eval at step 10", "eval at step 20"]
    assert lines[-1].startswith("done: completed at step 20/20; eval mlm_loss ")
    assert len(lines) == 1 + len(progress) + 2 + 1, lines  # nothing else: no library logs


def test_01_rerunning_a_finished_launch_reports_its_results_and_changes_nothing(pretrain_runs):
    workdir, completed, (before, again) = pretrain_runs
    _ok(again)
    assert snapshot(workdir) == before
    assert again.stdout.splitlines()[-1] == completed.stdout.splitlines()[-1]
    assert "finished before (step 20/20); its stored results stand" in again.stdout
    assert again.stderr == ""


def test_pretrain_launch_writes_results_checkpoints_and_export(pretrain_runs):
    workdir, _, _ = pretrain_runs
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert (results["status"], results["step"], results["total_steps"]) == ("completed", 20, 20)
    assert [e["step"] for e in results["eval"]] == [10, 20]
    assert [h["step"] for h in results["train"]] == [1, 5, 10, 15, 20]
    assert [(a["start_step"], a["end_step"], a["status"]) for a in results["attempts"]] == [
        (0, 20, "completed")]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]  # keep 2
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["model"]["hidden_size"] == 32 and config["total_steps"] == 20
    exported = m2jax.from_pretrained(os.path.join(workdir, "final"))
    assert isinstance(exported, m2jax.M2BertForMaskedLM)
    assert (exported.config.hidden_size, exported.config.vocab_size) == (32, 30528)
    assert m2jax.count_params(exported) == results["num_params"]


def test_glue_launch_fine_tunes_the_pretraining_launchs_export_and_skips_it_when_done(
        pretrain_runs, tmp_path, subprocess_env):
    pretrain_dir = pretrain_runs[0]
    init = os.path.join(pretrain_dir, "final")
    # Without weight decay, embedding rows no input uses (the vocabulary's padding, 30522..)
    # get no update at all: they must still be the pretrained ones.
    args = ["--config=configs/glue.py:smoke", f"--workdir={tmp_path}", *TINY_FLAGS,
            f"--config.init_from={init}", "--config.max_steps=3",
            "--config.tasks.wnpos.batch_size=8", "--config.tasks.wnpos.optimizer.weight_decay=0.0",
            "--config.tensorboard=false"]
    proc = _ok(_launch(subprocess_env, "finetune_glue.py", *args))
    results = json.load(open(tmp_path / "results.json"))
    assert list(results["task_scores"]) == ["wnpos"] and 0 <= results["task_scores"]["wnpos"] <= 1
    assert proc.stdout.splitlines()[-1].startswith("scores: wnpos ")
    run = json.load(open(tmp_path / "wnpos" / "seed_19" / "results.json"))
    assert (run["init_from"], run["step"], run["status"]) == (init, 3, "completed")
    assert os.listdir(tmp_path / "wnpos" / "seed_19" / "checkpoints") == ["3"]
    tuned = m2jax.from_pretrained(str(tmp_path / "wnpos" / "seed_19" / "final"))
    pretrained = m2jax.from_pretrained(init)
    rows = tuned.bert.embeddings.word_embeddings.embedding[...]
    assert isinstance(tuned, m2jax.M2BertForSequenceClassification) and rows.shape[0] == 30528
    np.testing.assert_array_equal(
        rows[30522:], pretrained.bert.embeddings.word_embeddings.embedding[...][30522:])
    assert not np.array_equal(rows[:30522], pretrained.bert.embeddings.word_embeddings
                              .embedding[...][:30522])  # and it did train
    before = snapshot(tmp_path)
    again = _ok(_launch(subprocess_env, "finetune_glue.py", *args))
    assert snapshot(tmp_path) == before and "finished before" in again.stdout
    assert again.stdout.splitlines()[-1] == proc.stdout.splitlines()[-1]


def test_glue_launch_without_init_from_is_an_error(tmp_path, subprocess_env):
    proc = _launch(subprocess_env, "finetune_glue.py", "--config=configs/glue.py:smoke",
                   f"--workdir={tmp_path}")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "error: invalid config:" in proc.stderr
    assert "config.init_from is empty" in proc.stderr and "'scratch'" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Multi-process flags.

# The real launch with jax.distributed.initialize replaced: prints what it received, then stops.
_RECORD_INITIALIZE = """
import json, runpy, sys
import jax
def initialize(*args, **kwargs):
    print("INITIALIZE " + json.dumps({"args": args, "kwargs": kwargs}), flush=True)
    raise SystemExit(0)
jax.distributed.initialize = initialize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_distributed_flags_reach_jax_distributed_initialize(tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k not in distributed.CLUSTER_ENV_VARS}
    proc = subprocess.run(
        [sys.executable, "-c", _RECORD_INITIALIZE, "launch/pretrain.py",
         "--config=configs/pretrain.py:smoke", f"--workdir={tmp_path}",
         "--coordinator_address=10.0.0.1:8476", "--num_processes=4", "--process_id=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("INITIALIZE "))
    assert json.loads(line[len("INITIALIZE "):]) == {"args": [], "kwargs": {
        "coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3}}
    assert os.listdir(tmp_path) == []  # it initialises before anything else


@pytest.mark.parametrize("args,message", [
    (["--coordinator_address=localhost:1234", "--num_processes=2"], "--process_id missing"),
    (["--num_processes=2", "--process_id=0"], "--coordinator_address missing"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     "--process_id must be in [0, 2) for --num_processes=2, got 2"),
])
def test_launch_rejects_inconsistent_distributed_flags(args, message, tmp_path, subprocess_env):
    proc = _launch(subprocess_env, "finetune_glue.py", "--config=configs/glue.py:smoke",
                   f"--workdir={tmp_path}", "--config.init_from=scratch", *args)
    assert proc.returncode == 1 and "FATAL Flags parsing error" in proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_flag_check_and_the_package_import_load_neither_jax_nor_flax():
    """A launch checks its multi-process flags while parsing them (above): that check, and
    `import m2jax` (its public names load on first use), come before jax and flax, so a mistyped
    flag is reported at once instead of after seconds of imports."""
    code = ("import sys, m2jax; from m2jax.train.distributed import check_distributed_args; "
            "check_distributed_args(None, None, None); "
            "print(sorted(m for m in ('jax', 'flax') if m in sys.modules)); "
            "m2jax.M2BertForMaskedLM; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda *a, **k: recorded.append((a, k)))
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda: False)
    for name in distributed.CLUSTER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return recorded


def test_init_distributed_passes_the_flags(calls):
    assert distributed.init_distributed("host0:1234", 2, 1) is True
    assert calls == [((), {"coordinator_address": "host0:1234", "num_processes": 2,
                           "process_id": 1})]


def test_init_distributed_single_process_and_cluster_environment(calls, monkeypatch):
    assert distributed.init_distributed(None, None, None) is False and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.init_distributed(None, None, None) is True
    assert calls == [((), {})]  # jax.distributed reads the cluster's settings itself


def test_a_tpu_vm_joins_its_pod_without_flags(calls, monkeypatch):
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda: True)
    assert distributed.init_distributed(None, None, None) is True
    assert calls == [((), {})]  # jax finds the pod's workers from the TPU VM's metadata


@pytest.mark.parametrize("args,message", [
    (("host0:1234", None, None), "--num_processes, --process_id missing"),
    ((None, 2, None), "--coordinator_address, --process_id missing"),
    (("host0", 2, 0), "--coordinator_address must be host:port, got 'host0'"),
    (("host0:1234", 0, 0), "--num_processes must be >= 1, got 0"),
    (("host0:1234", 2, -1), "--process_id must be in [0, 2)"),
])
def test_init_distributed_rejects_bad_combinations(calls, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.init_distributed(*args)
    assert calls == []
