"""Checkpoint import/export: file formats, layouts, strict key checking, atomic saving."""

import json
import os
import shutil
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import m2jax
from m2jax import pretrained
from m2jax.torch_names import torch_layout

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_mlm")


def _ids(cfg, B=2, seed=0):
    rng = np.random.default_rng(seed)
    L = cfg.max_position_embeddings
    ids = rng.integers(1, min(cfg.vocab_size, 30522), (B, L)).astype(np.int32)
    types = np.zeros((B, L), np.int32)
    types[:, L // 2:] = 1
    return jnp.asarray(ids), jnp.asarray(types)


@pytest.fixture(scope="module")
def tiny_reference():
    model = m2jax.from_pretrained(TINY)
    return model, model(*_ids(model.config))


def test_tiny_fixture_is_a_reference_layout_checkpoint(tiny_reference):
    model, _ = tiny_reference
    assert isinstance(model, m2jax.M2BertForMaskedLM)
    assert model.config.hyena_training_additions and model.config.num_hidden_layers == 2
    sd = load_file(os.path.join(TINY, "model.safetensors"))
    layout = torch_layout(model)
    assert set(sd) == set(layout) | {"bert.embeddings.position_ids"}
    assert sd["bert.encoder.layer.0.attention.short_filter.weight"].shape == (96, 1, 3)
    assert sd["bert.encoder.layer.1.attention.filter_fn2.implicit_filter_rev.5.freq"].shape == (1, 8)


@pytest.mark.parametrize("source", ["tiny_mlm_bin/pytorch_model.bin", "tiny_mlm_composer/model.pt"])
def test_torch_files_load_to_the_same_model(tiny_reference, source, tmp_path):
    _, expected = tiny_reference
    # A lone file with no config.json beside it: the config is inferred from the shapes.
    lone = tmp_path / os.path.basename(source)
    shutil.copy(os.path.join(FIXTURES, source), lone)
    model = m2jax.from_pretrained(str(lone))
    assert model.config == m2jax.from_pretrained(TINY).config.replace(
        **{k: getattr(model.config, k) for k in ("hyena_w", "hidden_dropout_prob")})
    np.testing.assert_array_equal(model(*_ids(model.config)), expected)
    # A directory: weights file plus config.json.
    shutil.copy(os.path.join(TINY, "config.json"), tmp_path / "config.json")
    np.testing.assert_array_equal(m2jax.from_pretrained(str(tmp_path))(*_ids(model.config)), expected)


@pytest.mark.parametrize("pool_all", [False, True])
def test_save_and_load_round_trip_classification(tmp_path, pool_all):
    cfg = m2jax.get_model_config("tiny", pool_all=pool_all, num_labels=3)
    model = m2jax.M2BertForSequenceClassification(cfg, rngs=nnx.Rngs(1))
    m2jax.save_pretrained(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    raw = json.load(open(tmp_path / "config.json"))
    assert raw["architectures"] == ["BertForSequenceClassification"] and raw["pool_all"] == pool_all
    loaded = m2jax.from_pretrained(str(tmp_path))
    assert isinstance(loaded, m2jax.M2BertForSequenceClassification) and loaded.config == cfg
    ids, types = _ids(cfg)
    mask = jnp.ones_like(ids).at[0, 12:].set(0)
    np.testing.assert_array_equal(loaded(ids, types, mask), model(ids, types, mask))


def test_load_with_bf16_compute(tiny_reference):
    model, expected = tiny_reference
    bf16 = m2jax.from_pretrained(TINY, dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    out = bf16(*_ids(model.config))
    assert float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected)) < 2e-2


def _write(tmp_path, sd, config=True):
    save_file(sd, str(tmp_path / "model.safetensors"))
    if config:
        shutil.copy(os.path.join(TINY, "config.json"), tmp_path / "config.json")
    return str(tmp_path)


def _sd():
    return load_file(os.path.join(TINY, "model.safetensors"))


def test_missing_keys_are_listed(tmp_path):
    sd = _sd()
    del sd["bert.encoder.layer.1.mlp.wo.bias"], sd["cls.predictions.decoder.bias"]
    with pytest.raises(m2jax.StateDictMismatch) as e:
        m2jax.from_pretrained(_write(tmp_path, sd))
    assert ("missing keys: bert.encoder.layer.1.mlp.wo.bias (32,), cls.predictions.decoder.bias (128,)"
            in str(e.value))


def test_unexpected_and_misshaped_keys_are_listed_with_shapes(tmp_path):
    sd = _sd()
    sd["bert.encoder.layer.2.mlp.wo.bias"] = np.zeros(32, np.float32)
    sd["bert.encoder.layer.0.attention.in_linear.weight"] = np.zeros((32, 96), np.float32)
    with pytest.raises(m2jax.StateDictMismatch) as e:
        m2jax.from_pretrained(_write(tmp_path, sd))
    msg = str(e.value)
    assert "unexpected keys: bert.encoder.layer.2.mlp.wo.bias (32,)" in msg
    assert "bert.encoder.layer.0.attention.in_linear.weight: checkpoint (32, 96), model expects (96, 32)" in msg


def test_tied_tensors_must_agree(tmp_path):
    sd = _sd()
    sd["bert.encoder.layer.0.attention.filter_fn.implicit_filter_rev.3.freq"] += 1.0
    with pytest.raises(m2jax.StateDictMismatch, match="implicit_filter.1.freq and .*implicit_filter_rev.3.freq"):
        m2jax.from_pretrained(_write(tmp_path, sd))


def test_a_failed_import_leaves_the_model_untouched():
    model = m2jax.M2BertForMaskedLM(m2jax.get_model_config("tiny", hyena_training_additions=True),
                                    rngs=nnx.Rngs(5))
    before = np.asarray(model.bert.embeddings.word_embeddings.embedding[...]).copy()
    sd = _sd()
    del sd["cls.predictions.decoder.bias"]
    with pytest.raises(m2jax.StateDictMismatch):
        m2jax.import_state_dict(model, sd)
    np.testing.assert_array_equal(model.bert.embeddings.word_embeddings.embedding[...], before)


def test_buffers_may_be_absent_and_are_recomputed(tiny_reference, tmp_path):
    _, expected = tiny_reference
    sd = {k: v for k, v in _sd().items()
          if not k.endswith(("pos_emb.t", "modulation.deltas", "position_ids"))}
    model = m2jax.from_pretrained(_write(tmp_path, sd))
    np.testing.assert_allclose(model(*_ids(model.config)), expected, rtol=1e-6, atol=1e-6)


def test_mlm_checkpoint_as_classifier_names_the_head_keys(tmp_path):
    with pytest.raises(m2jax.StateDictMismatch) as e:
        m2jax.from_pretrained(TINY, task="classification")
    msg = str(e.value)
    assert ("missing keys: bert.pooler.dense.weight (32, 32), bert.pooler.dense.bias (32,), "
            "classifier.weight (2, 32)") in msg
    assert "unexpected keys: cls.predictions" in msg


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        m2jax.from_pretrained(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        m2jax.from_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02legacy pickle")
    with pytest.raises(ValueError, match="not a zip-format PyTorch checkpoint"):
        m2jax.from_pretrained(str(tmp_path))
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as z:
        z.writestr("archive/other.txt", "x")
    with pytest.raises(ValueError, match="no data.pkl"):
        m2jax.from_pretrained(str(tmp_path))
    _write(tmp_path, _sd())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        m2jax.from_pretrained(str(tmp_path))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m2jax.save_pretrained(m2jax.from_pretrained(TINY), str(tmp_path))
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "save_safetensors", broken)
    other = m2jax.M2BertForMaskedLM(m2jax.get_model_config("tiny", hyena_training_additions=True),
                                    rngs=nnx.Rngs(9))
    with pytest.raises(OSError, match="disk full"):
        m2jax.save_pretrained(other, str(tmp_path))
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_saved_files_are_world_readable(tmp_path):
    m2jax.save_pretrained(m2jax.from_pretrained(TINY), str(tmp_path))
    for f in os.listdir(tmp_path):
        assert os.stat(tmp_path / f).st_mode & 0o044 == 0o044


def test_use_cls_token_classifier_saves_and_loads_the_pooler(tmp_path):
    """The reference builds (and saves) the pooler even when it classifies the raw [CLS] state."""
    cfg = m2jax.get_model_config("tiny", use_cls_token=True, num_labels=3)
    model = m2jax.M2BertForSequenceClassification(cfg, rngs=nnx.Rngs(2))
    m2jax.save_pretrained(model, str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["bert.pooler.dense.weight"].shape == (32, 32) and "bert.pooler.dense.bias" in sd
    loaded = m2jax.from_pretrained(str(tmp_path))
    assert loaded.config == cfg
    np.testing.assert_array_equal(loaded.bert.pooler.kernel[...], model.bert.pooler.kernel[...])
    ids, types = _ids(cfg)
    np.testing.assert_array_equal(loaded(ids, types), model(ids, types))
    # The pooler takes no part in the logits, as in the reference.
    h0 = model.bert(ids, types)[:, 0]
    np.testing.assert_allclose(model(ids, types), model.classifier(h0), rtol=1e-6, atol=1e-6)


def test_reference_layout_state_dict_with_use_cls_token_loads():
    """Keys from the reference's own BertForSequenceClassification (cls_tiny_cls.keys.json)."""
    import sys

    sys.path.insert(0, FIXTURES)
    import parity_recipe

    with open(os.path.join(FIXTURES, "cls_tiny_cls.config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(FIXTURES, "cls_tiny_cls.keys.json")) as f:
        keys = json.load(f)
    assert "bert.pooler.dense.weight" in [k for k, _, _ in keys]
    sd = {k: np.zeros(shape, np.int64 if dtype == "int64" else np.float32) for k, shape, dtype in keys}
    sd["bert.embeddings.position_ids"][:] = np.arange(raw["max_position_embeddings"])
    sd = parity_recipe.perturb_state_dict(sd, seed=0)
    cfg = m2jax.config_from_dict(dict(raw, use_cls_token=True))
    model = m2jax.model.abstract_model(m2jax.M2BertForSequenceClassification, cfg)
    m2jax.import_state_dict(model, sd)
    np.testing.assert_array_equal(model.bert.pooler.kernel[...], sd["bert.pooler.dense.weight"].T)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_safetensors_names_the_file(tmp_path, damage):
    shutil.copy(os.path.join(TINY, "config.json"), tmp_path / "config.json")
    data = open(os.path.join(TINY, "model.safetensors"), "rb").read()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(m2jax.CheckpointFileError, match="not a readable safetensors file") as e:
        m2jax.from_pretrained(str(tmp_path))
    assert str(e.value).startswith(str(weights))


def test_directory_with_two_weight_files_says_which_is_used_once(tmp_path, caplog):
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(TINY, f), tmp_path / f)
    shutil.copy(os.path.join(FIXTURES, "tiny_mlm_bin", "pytorch_model.bin"), tmp_path)
    with caplog.at_level("WARNING", logger="m2jax.pretrained"):
        m2jax.from_pretrained(str(tmp_path))
        m2jax.from_pretrained(str(tmp_path))
    said = [r.getMessage() for r in caplog.records if r.name == "m2jax.pretrained"]
    assert said == [f"{tmp_path} holds model.safetensors, pytorch_model.bin; loading "
                    "model.safetensors"]
