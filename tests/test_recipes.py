"""The pretraining and GLUE recipes end to end on tiny models (in-process, one device)."""

import json
import os
import sys

import numpy as np
import pytest
from flax import nnx

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


# ---------------------------------------------------------------------------------------------
# Recipe chaining: vocabulary and architecture of the pretraining and GLUE recipes.

SAME_SIZE = [("m2_base_80m", "m2_base_80m"), ("m2_base_110m", "m2_base_110m"),
             ("m2_large_260m", "m2_large_260m"), ("m2_large_341m", "m2_large_341m"),
             ("smoke", "smoke")]


def _model_config(c):
    return m2jax.get_model_config(c.model.name, **c.model.overrides)


@pytest.mark.parametrize("pretrain_variant,glue_variant", SAME_SIZE)
def test_glue_recipe_fits_the_full_size_pretraining_recipe(pretrain_variant, glue_variant):
    """At full size, on abstract models (no memory): copy_encoder's architecture check passes,
    and both use the reference's padded vocabulary, as the released checkpoints do."""
    from m2jax.trainer import copy_encoder

    source_cfg = _model_config(pretrain_config.get_config(pretrain_variant))
    target_cfg = _model_config(glue_config.get_config(glue_variant))
    assert source_cfg.vocab_size == target_cfg.vocab_size == 30528
    source = m2jax.abstract_model(m2jax.M2BertForMaskedLM, source_cfg)
    target = m2jax.abstract_model(m2jax.M2BertForSequenceClassification, target_cfg)
    copy_encoder(source, target)
    (table,) = jax_leaves(nnx.state(target.bert.embeddings.word_embeddings, nnx.Param))
    assert table.shape == (30528, source_cfg.hidden_size)


@pytest.mark.parametrize("pretrain_variant,glue_variant", SAME_SIZE)
def test_glue_recipe_initialises_from_the_pretraining_recipes_export(
        pretrain_variant, glue_variant, tmp_path):
    """Sizes shrunk, everything else (vocabulary, training additions) as the recipes set it."""
    from m2jax.trainer import build_model

    pre = pretrain_config.get_config(pretrain_variant)
    pre.model.overrides.update(TINY)
    source = build_model(pre, "mlm")
    m2jax.save_pretrained(source, str(tmp_path / "final"))
    c = glue_config.get_config(glue_variant)
    c.model.overrides.update(TINY)
    c.init_from = str(tmp_path / "final")
    model = build_model(c, "classification", num_labels=3)
    table = model.bert.embeddings.word_embeddings.embedding[...]
    assert table.shape == (30528, TINY["hidden_size"])
    np.testing.assert_array_equal(table, source.bert.embeddings.word_embeddings.embedding[...])
    for a, b in zip(jax_leaves(nnx.state(model.bert.layers, nnx.Param)),
                    jax_leaves(nnx.state(source.bert.layers, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def _released_layout(path, model, kind):
    """`model` as the released files hold it: an HF directory (config.json without
    monarch_mixer_sequence_mixing, `bert.`/`cls.` keys), or a bare Composer-style weights file
    (`model.` prefixes, a bf16 FlashFFTConv buffer, no config.json)."""
    from safetensors.numpy import save_file

    sd = m2jax.export_state_dict(model)
    os.makedirs(path)
    if kind == "hf_directory":
        config = m2jax.config_to_dict(model.config)
        del config["monarch_mixer_sequence_mixing"]
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
        save_file(sd, os.path.join(path, "model.safetensors"))
        return path
    sd = {f"model.{k}": v for k, v in sd.items()}
    sd["model.bert.encoder.layer.0.attention.flashfft.kernel"] = np.zeros(4, np.float16)
    save_file(sd, os.path.join(path, "model.safetensors"))
    return os.path.join(path, "model.safetensors")


@pytest.mark.parametrize("kind", ["hf_directory", "composer_bare_file"])
def test_glue_recipe_accepts_a_released_layout_checkpoint(kind, tmp_path):
    from m2jax.trainer import build_model

    released = m2jax.M2BertForMaskedLM(
        m2jax.get_model_config("m2-bert-base-80m-released", **TINY), rngs=nnx.Rngs(5))
    path = _released_layout(str(tmp_path / "released"), released, kind)
    c = glue_config.get_config("m2_base_80m")
    c.model.overrides.update(TINY)
    c.init_from = path
    model = build_model(c, "classification")
    np.testing.assert_array_equal(model.bert.embeddings.word_embeddings.embedding[...],
                                  released.bert.embeddings.word_embeddings.embedding[...])
    # The tokenizer's own size (what configs/glue.py:m2_base_110m used) cannot take it.
    c.model.overrides.vocab_size = 30522
    with pytest.raises(ValueError, match="vocab_size: 30528 != 30522"):
        build_model(c, "classification")


# ---------------------------------------------------------------------------------------------
# GLUE hyper-parameters, written out from the reference's finetune-glue yamls (task entries'
# lr / wd / optim_name / max_duration) over its job defaults (src/glue/finetuning_jobs.py).

# Same in every yaml: batch size (job defaults), seeds, pooling, MNLI chaining.
GLUE_SHARED = {  # task: (batch size, seeds, pool_all, start_from_task)
    "mnli": (48, [19], False, ""),
    "rte": (16, [19, 8364, 717, 10536, 90166], False, "mnli"),
    "qqp": (16, [19], False, ""),
    "qnli": (16, [19], True, ""),
    "sst2": (16, [19, 8364, 717], True, ""),
    "stsb": (32, [19, 8364, 717, 10536, 90166], True, "mnli"),
    "mrpc": (32, [19, 8364, 717, 10536, 90166], True, "mnli"),
    "cola": (32, [19, 8364, 717, 10536], True, ""),
}
GLUE_TABLES = {  # variant: {task: (lr, weight decay, optimizer, epochs)}
    "m2_base_80m": {
        "mnli": (5e-5, 5e-6, "decoupled", 3), "rte": (5e-5, 0.01, "adamw", 6),
        "qqp": (3e-5, 0.01, "adamw", 10), "qnli": (5e-5, 1e-6, "decoupled", 10),
        "sst2": (3e-5, 3e-6, "decoupled", 3), "stsb": (7e-5, 0.01, "adamw", 10),
        "mrpc": (5e-5, 0.01, "adamw", 10), "cola": (5e-5, 5e-6, "decoupled", 10)},
    "m2_base_110m": {  # no max_duration in the yaml: RTE 3 and QQP 5 epochs are job defaults
        "mnli": (5e-5, 5e-6, "decoupled", 3), "rte": (1e-5, 1e-6, "decoupled", 3),
        "qqp": (3e-5, 3e-6, "decoupled", 5), "qnli": (5e-5, 1e-6, "decoupled", 10),
        "sst2": (3e-5, 3e-6, "decoupled", 3), "stsb": (8e-5, 3e-6, "decoupled", 10),
        "mrpc": (8e-5, 8e-5, "decoupled", 10), "cola": (8e-5, 5e-6, "adamw", 10)},
    "m2_large_260m": {
        "mnli": (5e-5, 5e-6, "decoupled", 3), "rte": (1e-5, 1e-6, "decoupled", 3),
        "qqp": (3e-5, 3e-6, "decoupled", 5), "qnli": (5e-5, 1e-6, "decoupled", 10),
        "sst2": (3e-5, 3e-6, "decoupled", 3), "stsb": (7e-5, 3e-6, "decoupled", 10),
        "mrpc": (8e-5, 8e-6, "decoupled", 10), "cola": (5e-5, 5e-6, "decoupled", 10)},
    "m2_large_341m": {
        "mnli": (5e-5, 5e-6, "decoupled", 3), "rte": (5e-5, 1e-6, "adamw", 2),
        "qqp": (3e-5, 3e-6, "decoupled", 5), "qnli": (5e-5, 1e-6, "decoupled", 10),
        "sst2": (3e-5, 3e-6, "decoupled", 3), "stsb": (8e-5, 3e-6, "decoupled", 8),
        "mrpc": (8e-5, 8e-6, "decoupled", 10), "cola": (5e-5, 1e-6, "decoupled", 10)},
}
GLUE_MODELS = {"m2_base_80m": (768, True), "m2_base_110m": (960, False),
               "m2_large_260m": (1536, False), "m2_large_341m": (1792, False)}


@pytest.mark.parametrize("variant", sorted(GLUE_TABLES))
def test_glue_variant_has_the_reference_hyper_parameters(variant):
    c = glue_config.get_config(variant)
    got = {task: (t.optimizer.lr, t.optimizer.weight_decay, t.optimizer.name, t.epochs)
           for task, t in c.tasks.items()}
    assert got == GLUE_TABLES[variant]
    shared = {task: (t.batch_size, list(t.seeds), t.pool_all, t.start_from_task)
              for task, t in c.tasks.items()}
    assert shared == GLUE_SHARED
    assert list(c.task_order)[:1] == ["mnli"] and set(c.task_order) == set(GLUE_SHARED)
    assert all(list(c.task_order).index("mnli") < list(c.task_order).index(t)
               for t in ("rte", "mrpc", "stsb"))
    cfg = _model_config(c)
    assert (cfg.hidden_size, cfg.hyena_training_additions) == GLUE_MODELS[variant]
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.dtype) == (30528, 128, "bfloat16")


# ---------------------------------------------------------------------------------------------
# init_from and model.name.


def test_glue_without_init_from_is_an_error_and_scratch_is_the_opt_in(tmp_path):
    from m2jax.recipes import glue_init_source
    from m2jax.trainer import build_model

    c = glue_config.get_config("smoke")
    c.model.overrides.update(TINY)
    assert c.init_from == ""
    with pytest.raises(ValueError, match="config.init_from is empty"):
        run_glue(c, str(tmp_path))
    assert os.listdir(tmp_path) == []  # refused before anything ran
    c.init_from = "scratch"
    assert glue_init_source(c) == "scratch"
    scratch = build_model(c, "classification")
    c.init_from = ""  # what pretraining uses for a random init: the same model
    fresh = build_model(c, "classification")
    for a, b in zip(jax_leaves(nnx.state(scratch, nnx.Param)),
                    jax_leaves(nnx.state(fresh, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_changing_model_name_alone_is_an_error():
    from m2jax.trainer import build_model

    c = _pretrain_config()
    c.model.name = "m2-bert-large-341m"
    with pytest.raises(ValueError, match="config.model.name is 'm2-bert-large-341m' but"):
        build_model(c, "mlm")


def test_model_section_lists_every_field_typed():
    import dataclasses

    from m2jax.recipes import model_section, padded_vocab_size

    assert padded_vocab_size() == 30528 and padded_vocab_size(30528) == 30528
    section = model_section("m2-bert-base-80m", hidden_size=96)
    fields = {f.name for f in dataclasses.fields(m2jax.M2BertConfig)}
    assert set(section.overrides) == fields
    assert section.overrides.hidden_size == 96 and section.overrides.classifier_dropout is None
    assert section.overrides.get_type("classifier_dropout") is float
    assert section.overrides.get_type("hyena_w") is float
    with pytest.raises(ValueError, match="not M2BertConfig fields"):
        model_section("m2-bert-base-80m", hidden_sise=96)
