"""The pretraining and GLUE recipes end to end on tiny models (in-process, one device)."""

import json
import os
import sys

import pytest

import m2jax
from m2jax.recipes import run_glue, run_pretraining
from m2jax.trainer import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import glue as glue_config  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, hyena_filter_order=8,
            max_position_embeddings=32, long_conv_l_max=32)


def _pretrain_config(**changes):
    c = pretrain_config.get_config("smoke")
    c.model.overrides.update(TINY)
    c.global_batch_size, c.total_steps, c.log_every, c.eval_every, c.eval_steps = 8, 4, 2, 2, 1
    c.checkpoint.every, c.checkpoint.async_save = 2, False
    for k, v in changes.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    results = run_pretraining(_pretrain_config(), workdir)
    return workdir, results


def test_pretraining_writes_results_events_checkpoints_and_export(pretrained):
    workdir, results = pretrained
    assert results["status"] == "completed" and results["step"] == 4
    assert [e["step"] for e in results["eval"]] == [2, 4]
    assert 0.0 <= results["final_eval"]["mlm_accuracy"] <= 1.0 and results["final_eval"]["mlm_loss"] > 0
    assert [h["step"] for h in results["train"]] == [2, 4]
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 4
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    exported = m2jax.from_pretrained(os.path.join(workdir, "final"))
    assert exported.config.hidden_size == 32 and m2jax.count_params(exported) == results["num_params"]


def test_glue_recipe_fine_tunes_from_the_pretrained_export(pretrained, tmp_path):
    workdir, _ = pretrained
    c = glue_config.get_config("smoke")
    c.model.overrides.update(TINY)
    c.init_from = os.path.join(workdir, "final")
    c.max_steps = 3
    c.tasks.wnpos.batch_size = 8
    c.eval_batch_size = 64
    results = run_glue(c, str(tmp_path))
    score = results["task_scores"]["wnpos"]
    assert 0.0 <= score <= 1.0 and list(results["per_seed"]) == ["wnpos"]
    run = json.load(open(tmp_path / "wnpos" / "seed_19" / "results.json"))
    assert run["init_from"] == c.init_from and run["step"] == 3
    assert set(run["final_eval"]) >= {"validation/accuracy", "score"}
    model = m2jax.from_pretrained(str(tmp_path / "wnpos" / "seed_19" / "final"))
    assert isinstance(model, m2jax.M2BertForSequenceClassification) and model.config.num_labels == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    c = _pretrain_config(**{"optimizer.lr": 1e30, "optimizer.warmup_fraction": 0.01,
                            "optimizer.clip_norm": None, "checkpoint.every": 1, "log_every": 1,
                            "total_steps": 6, "eval_steps": 0})
    with pytest.raises(NonFiniteLossError, match="at step (\\d)") as e:
        run_pretraining(c, str(tmp_path))
    bad_step = int(e.value.args[0].split("at step ")[1].split(";")[0])
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved == list(range(1, bad_step))


def test_initialising_from_another_architecture_is_an_error(pretrained, tmp_path):
    workdir, _ = pretrained
    c = _pretrain_config(init_from=os.path.join(workdir, "final"))
    c.model.overrides.hidden_size = 64
    with pytest.raises(ValueError, match="hidden_size: 32 != 64"):
        run_pretraining(c, str(tmp_path))


def test_fine_tuning_initialises_from_a_training_work_directory(pretrained):
    """`init_from` may name a pretraining work directory: its newest orbax checkpoint is used."""
    import numpy as np
    from flax import nnx

    from m2jax.trainer import build_model

    workdir, _ = pretrained
    c = glue_config.get_config("smoke")
    c.model.overrides.update(TINY)
    c.init_from = workdir
    model = build_model(c, "classification")
    exported = m2jax.from_pretrained(os.path.join(workdir, "final"))  # same step-4 weights
    for a, b in zip(jax_leaves(nnx.state(model.bert.layers, nnx.Param)),
                    jax_leaves(nnx.state(exported.bert.layers, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.bert.embeddings.word_embeddings.embedding[...],
                                  exported.bert.embeddings.word_embeddings.embedding[...])


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)
