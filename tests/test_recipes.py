"""The recipes (configs/) and the model building of the jobs, on tiny models in-process."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx
from train_fixtures import ROOT, TINY, glue_config, pretrain_config

import m2jax
from configs import common
from configs import glue as glue_recipes
from configs import pretrain as pretrain_recipes
from m2jax.train.errors import ConfigError
from m2jax.train.init import build_model, copy_encoder, model_config
from m2jax.train.jobs import run_glue, run_pretraining


def test_pretraining_writes_results_events_checkpoints_config_and_export(tiny_pretraining):
    workdir, results, config = tiny_pretraining
    assert results["status"] == "completed" and results["step"] == 4
    assert [e["step"] for e in results["eval"]] == [2, 4]
    assert 0.0 <= results["final_eval"]["mlm_accuracy"] <= 1.0
    assert results["final_eval"]["mlm_loss"] > 0
    assert [h["step"] for h in results["train"]] == [1, 2, 4]  # the first step, then every 2
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 4
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    stored = json.load(open(os.path.join(workdir, "config.json")))
    assert stored["model"]["hidden_size"] == 32 and stored["data"] == config.data.to_dict()
    exported = m2jax.from_pretrained(os.path.join(workdir, "final"))
    assert exported.config.hidden_size == 32 and m2jax.count_params(exported) == results["num_params"]


def test_initialising_from_another_architecture_is_an_error(tiny_pretraining, tmp_path):
    workdir, _, _ = tiny_pretraining
    c = pretrain_config(init_from=os.path.join(workdir, "final"))
    c.model.hidden_size = 64
    with pytest.raises(ConfigError, match="config.init_from: .*hidden_size: 32 != 64"):
        run_pretraining(c, str(tmp_path))


def test_fine_tuning_initialises_from_a_training_work_directory(tiny_pretraining):
    """`init_from` may name a pretraining work directory: its newest orbax checkpoint is used."""
    workdir, _, _ = tiny_pretraining
    c = glue_config()
    model = build_model(model_config(c.model), "classification", 0, init_from=workdir)
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
# Configs are plain data: their model tables are m2jax's named models.


def test_config_files_import_nothing_of_m2jax():
    import ast

    for name in ("common.py", "pretrain.py", "glue.py"):
        tree = ast.parse(open(os.path.join(ROOT, "configs", name)).read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= {"ml_collections", "configs"}, (name, imported)


@pytest.mark.parametrize("name", sorted(common.MODELS))
def test_model_tables_are_the_named_model_configs(name):
    """configs/common.py writes every field out; m2jax/config.py is where they are defined. The
    tables differ only in the vocabulary (the reference's padding to 30528)."""
    table = common.model(name).to_dict()
    named = dataclasses.asdict(m2jax.get_model_config(name))
    assert set(table) == set(named)
    assert {k: v for k, v in table.items() if k != "vocab_size"} == \
        {k: v for k, v in named.items() if k != "vocab_size"}
    tokenizer = m2jax.config.TOKENIZER_VOCAB_SIZE
    assert table["vocab_size"] == -(-tokenizer // 8) * 8 == 30528


def test_every_model_field_is_in_every_recipe_with_its_type():
    import typing

    hints = typing.get_type_hints(m2jax.M2BertConfig)
    for recipes in (pretrain_recipes, glue_recipes):
        for variant in recipes.VARIANTS:
            c = recipes.get_config(variant)
            assert set(c.model) == set(hints), variant
            model_config(c.model)  # every recipe's model builds
            for name, hint in hints.items():
                assert c.model.get_type(name) in (hint, *typing.get_args(hint)), (variant, name)


# ---------------------------------------------------------------------------------------------
# Recipe chaining: vocabulary and architecture of the pretraining and GLUE recipes.

SAME_SIZE = [("m2_base_80m", "m2_base_80m"), ("m2_base_110m", "m2_base_110m"),
             ("m2_large_260m", "m2_large_260m"), ("m2_large_341m", "m2_large_341m"),
             ("smoke", "smoke")]


def _model_config(c):
    return model_config(c.model)


@pytest.mark.parametrize("pretrain_variant,glue_variant", SAME_SIZE)
def test_glue_recipe_fits_the_full_size_pretraining_recipe(pretrain_variant, glue_variant):
    """At full size, on abstract models (no memory): copy_encoder's architecture check passes,
    and both use the reference's padded vocabulary, as the released checkpoints do."""
    source_cfg = _model_config(pretrain_recipes.get_config(pretrain_variant))
    target_cfg = _model_config(glue_recipes.get_config(glue_variant))
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
    pre = pretrain_recipes.get_config(pretrain_variant)
    pre.model.update(TINY)
    source = build_model(model_config(pre.model), "mlm", pre.seed)
    m2jax.save_pretrained(source, str(tmp_path / "final"))
    c = glue_recipes.get_config(glue_variant)
    c.model.update(TINY, num_labels=3)
    model = build_model(model_config(c.model), "classification", 0, str(tmp_path / "final"))
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
    released = m2jax.M2BertForMaskedLM(
        m2jax.get_model_config("m2-bert-base-80m-released", **TINY), rngs=nnx.Rngs(5))
    path = _released_layout(str(tmp_path / "released"), released, kind)
    c = glue_recipes.get_config("m2_base_80m")
    c.model.update(TINY)
    model = build_model(model_config(c.model), "classification", 0, path)
    np.testing.assert_array_equal(model.bert.embeddings.word_embeddings.embedding[...],
                                  released.bert.embeddings.word_embeddings.embedding[...])
    # The tokenizer's own size (what configs/glue.py:m2_base_110m used) cannot take it.
    c.model.vocab_size = 30522
    with pytest.raises(ConfigError, match="vocab_size: 30528 != 30522"):
        build_model(model_config(c.model), "classification", 0, path)


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
    c = glue_recipes.get_config(variant)
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
# init_from.


def test_glue_without_init_from_is_an_error_and_scratch_is_the_opt_in(tmp_path):
    c = glue_config()
    assert c.init_from == ""
    with pytest.raises(ConfigError, match="config.init_from is empty.*'scratch'"):
        run_glue(c, str(tmp_path))
    assert os.listdir(tmp_path) == []  # refused before anything ran
    scratch = build_model(model_config(c.model), "classification", 0, "scratch")
    fresh = build_model(model_config(c.model), "classification", 0, "")  # pretraining's default
    for a, b in zip(jax_leaves(nnx.state(scratch, nnx.Param)),
                    jax_leaves(nnx.state(fresh, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_configs_share_no_mutable_fields():
    """Setting a field of one recipe's config leaves every other config as built."""
    from configs import glue, pretrain

    first = glue.get_config("smoke")
    first.model.classifier_dropout = 0.25
    for other in (glue.get_config("smoke"), pretrain.get_config("smoke"), common.model("m2-bert-base-80m")):
        model = other.model if "model" in other else other
        assert model.classifier_dropout is None
    assert common.model("m2-bert-base-80m").get_type("classifier_dropout") is float
