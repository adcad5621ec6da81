"""Loading by Hugging Face Hub id from a hub cache built on disk, offline (issue 10 item 11)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import m2jax
from hub_cache import add_saved_model, add_snapshot
from m2jax import hub
from m2jax.model import abstract_model
from parity_weights import base_state_dict, parity_recipe

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
TINY = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_mlm")


def _recipe_model(cls, cfg):
    """A model with deterministic NumPy weights, built abstractly (no eager initialisation)."""
    model = abstract_model(cls, cfg)
    m2jax.import_state_dict(model, parity_recipe.perturb_state_dict(base_state_dict(model), 0))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved checkpoints: an MLM and a retrieval-style classifier, each in two versions ("b" has
    other word embeddings); name -> (directory, its word embeddings)."""
    from safetensors.numpy import load_file, save_file

    tmp = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in [
        ("mlm", _recipe_model(m2jax.M2BertForMaskedLM, m2jax.get_model_config("tiny"))),
        ("ret", _recipe_model(m2jax.M2BertForSequenceClassification,
                              m2jax.get_model_config("tiny-real-vocab", num_labels=4))),
    ]:
        m2jax.save_pretrained(model, str(tmp / f"{name}_a"))
        sd = load_file(str(tmp / f"{name}_a" / "model.safetensors"))
        os.makedirs(tmp / f"{name}_b")
        key = "bert.embeddings.word_embeddings.weight"
        out[f"{name}_a"] = (str(tmp / f"{name}_a"), sd[key].copy())
        sd[key] = sd[key] + 1.0
        if "cls.predictions.decoder.weight" in sd:  # tied
            sd["cls.predictions.decoder.weight"] = sd[key]
        save_file(sd, str(tmp / f"{name}_b" / "model.safetensors"))
        os.link(tmp / f"{name}_a" / "config.json", tmp / f"{name}_b" / "config.json")
        out[f"{name}_b"] = (str(tmp / f"{name}_b"), sd[key])
    return out


def _word_embeddings(model):
    return np.asarray(model.bert.embeddings.word_embeddings.embedding[...])


def test_load_by_id_from_the_cache_and_revision_selects_the_snapshot(tmp_path, models):
    cache = tmp_path / "hub"
    add_saved_model(cache, "danfu09/m2-bert-80M", models["mlm_a"][0], COMMIT_A, refs=("main",))
    add_saved_model(cache, "danfu09/m2-bert-80M", models["mlm_b"][0], COMMIT_B, refs=("v1",))
    kw = dict(cache_dir=str(cache), local_files_only=True)
    for revision, expected in [(None, "mlm_a"), ("v1", "mlm_b"), (COMMIT_A, "mlm_a")]:
        model = m2jax.from_pretrained("danfu09/m2-bert-80M", revision=revision, **kw)
        assert isinstance(model, m2jax.M2BertForMaskedLM)
        np.testing.assert_array_equal(_word_embeddings(model), models[expected][1])


def test_embedder_by_id_with_revision(tmp_path, models):
    cache = tmp_path / "hub"
    repo = "togethercomputer/m2-bert-80M-2k-retrieval"
    add_saved_model(cache, repo, models["ret_a"][0], COMMIT_A)
    add_saved_model(cache, repo, models["ret_b"][0], COMMIT_B, refs=("v2",))
    embedder = m2jax.Embedder.from_pretrained(repo, revision="v2", cache_dir=str(cache),
                                              local_files_only=True, batch_size=2)
    assert isinstance(embedder.model, m2jax.M2BertForTextEncoding)
    np.testing.assert_array_equal(_word_embeddings(embedder.model), models["ret_b"][1])


def test_a_local_path_wins_over_a_hub_id(tmp_path, models, monkeypatch):
    cache = tmp_path / "hub"
    add_saved_model(cache, "org/model", models["mlm_a"][0], COMMIT_A)
    monkeypatch.chdir(tmp_path)
    os.makedirs("org")
    os.symlink(models["mlm_b"][0], "org/model")  # a local directory of that name
    loaded = m2jax.from_pretrained("org/model", cache_dir=str(cache), local_files_only=True)
    np.testing.assert_array_equal(_word_embeddings(loaded), models["mlm_b"][1])


def test_missing_id_offline_names_the_id_and_the_cache(tmp_path):
    cache = tmp_path / "hub"
    with pytest.raises(FileNotFoundError) as e:
        m2jax.from_pretrained("danfu09/m2-bert-80M", cache_dir=str(cache), local_files_only=True)
    message = str(e.value)
    assert "'danfu09/m2-bert-80M' (revision main) is not in the cache" in message
    assert str(cache) in message and "HF_HUB_OFFLINE=1" in message
    # A cached snapshot without weights is the same error.
    add_snapshot(cache, "org/no-weights", {"config.json": os.path.join(TINY, "config.json")},
                 COMMIT_A)
    with pytest.raises(FileNotFoundError, match="none of model.safetensors, pytorch_model.bin"):
        m2jax.from_pretrained("org/no-weights", cache_dir=str(cache), local_files_only=True)


def test_paths_that_cannot_be_ids_are_plain_missing_paths(tmp_path, monkeypatch):
    # Relative paths resolve against an empty directory (not whatever sits next to the checkout).
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for path in [str(tmp_path / "nothing"), "./nothing", "a/b/c", "../x"]:
        with pytest.raises(FileNotFoundError, match="no checkpoint at"):
            m2jax.from_pretrained(path)
    assert hub.is_hub_id("danfu09/m2-bert-80M") and hub.is_hub_id("bert-base-uncased")


def test_only_the_config_and_one_weights_file_are_fetched(monkeypatch, tmp_path):
    """Online: the repo has every weights format and more; one weights file is downloaded."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    snapshot = add_saved_model(tmp_path / "hub", "org/m", TINY, COMMIT_A)
    repo_files = {"config.json", "model.safetensors", "pytorch_model.bin", "README.md",
                  "tokenizer.json"}
    calls = []

    def fake_download(repo_id, filename, *, revision, cache_dir, local_files_only):
        calls.append((repo_id, filename, revision, cache_dir, local_files_only))
        if filename not in repo_files:
            raise EntryNotFoundError(filename)
        return os.path.join(snapshot, filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert hub.resolve_checkpoint("org/m", ("model.safetensors", "pytorch_model.bin"),
                                  revision="v3", cache_dir="/c") == snapshot
    assert calls == [("org/m", "config.json", "v3", "/c", False),
                     ("org/m", "model.safetensors", "v3", "/c", False)]
    repo_files.discard("model.safetensors")  # a .bin-only repo: the .bin, after one miss
    calls.clear()
    hub.resolve_checkpoint("org/m", ("model.safetensors", "pytorch_model.bin"))
    assert [c[1] for c in calls] == ["config.json", "model.safetensors", "pytorch_model.bin"]


def test_hf_environment_variables_are_honoured(tmp_path, models):
    """As users set them: HF_HOME (the cache under it) and HF_HUB_OFFLINE, read by a fresh
    process; no cache_dir or local_files_only passed."""
    home = tmp_path / "hf_home"
    add_saved_model(home / "hub", "danfu09/m2-bert-80M", models["mlm_a"][0], COMMIT_A)
    code = textwrap.dedent("""
        import m2jax
        model = m2jax.from_pretrained("danfu09/m2-bert-80M")
        print(type(model).__name__, float(model.bert.embeddings.word_embeddings.embedding[1, 0]))
        try:
            m2jax.from_pretrained("danfu09/not-cached")
        except FileNotFoundError as e:
            print("MISSING", e)
    """)
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, missing = proc.stdout.strip().splitlines()
    expected = float(models["mlm_a"][1][1, 0])
    assert first == f"M2BertForMaskedLM {expected}"
    assert "'danfu09/not-cached'" in missing and str(home / "hub") in missing
