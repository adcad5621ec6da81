"""The README's code runs as written, loading its Hub ids from a hub cache of small checkpoints
built on disk (offline, no download)."""

import os
import re

import numpy as np
import pytest
from flax import nnx

import m2jax
from m2jax.data import load_tokenizer
from hub_cache import add_saved_model
from m2jax.fill_mask import fill_mask

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A random model with the released vocab size, small enough to build in a second."""
    cfg = m2jax.get_model_config("tiny-real-vocab")
    path = str(tmp_path_factory.mktemp("ckpt"))
    m2jax.save_pretrained(m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, offline, as `HF_HUB_CACHE=<it> HF_HUB_OFFLINE=1` would set up
    (huggingface_hub reads those variables when imported, so its constants are set here)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_readme_has_exactly_two_setup_lines():
    setup = re.search(r"## Set up\n\n```bash\n(.*?)```", open(README).read(), flags=re.S).group(1)
    assert setup.strip().splitlines() == ['pip install -e ".[test]"', "python -m pytest -q tests"]


def test_fill_mask_example_runs(small_checkpoint, offline_hub, capsys):
    code = _python_blocks()[0]
    assert 'CHECKPOINT = "danfu09/m2-bert-80M"' in code  # loaded by Hub id, as written
    add_saved_model(offline_hub, "danfu09/m2-bert-80M", small_checkpoint, "0" * 40)
    exec(compile(code, "README fill-mask example", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("[(")


def test_model_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_128 = '"tiny", max_position_embeddings=128, long_conv_l_max=128'
    code = _python_blocks()[2].replace('"m2-bert-base-80m"', tiny_128)
    scope = {}
    exec(compile(code, "README model example", "exec"), scope)
    assert scope["logits"].shape == (2, 128, 128)
    assert sorted(os.listdir(tmp_path / "out" / "my-m2")) == ["config.json", "model.safetensors"]


def test_embedding_example_runs(tmp_path, offline_hub, capsys):
    cfg = m2jax.get_model_config("tiny-real-vocab", num_labels=10)
    m2jax.save_pretrained(m2jax.M2BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)),
                          str(tmp_path / "ckpt"))
    repo = "togethercomputer/m2-bert-80M-2k-retrieval"
    code = _python_blocks()[1]
    assert f'Embedder.from_pretrained("{repo}"' in code
    add_saved_model(offline_hub, repo, str(tmp_path / "ckpt"), "1" * 40)
    scope = {}
    exec(compile(code, "README embedding example", "exec"), scope)
    assert scope["vectors"].shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(scope["vectors"], axis=1), 1.0, rtol=1e-6)
    doc, score = capsys.readouterr().out.rsplit(" ", 1)
    assert doc in scope["docs"] and -1 <= float(score) <= 1


def test_docs_name_only_files_that_exist():
    root = os.path.dirname(README)
    for page in ["README.md", "docs/architecture.md", "docs/porting.md", "docs/training.md",
                 "docs/data.md", "docs/perf.md"]:
        text = open(os.path.join(root, page)).read()
        for path in set(re.findall(r"`((?:m2jax|kernels|launch|configs|benchmarks|notebooks|tests)"
                                   r"/[\w/.-]+\.(?:py|ipynb|sh|md))", text)):
            assert os.path.exists(os.path.join(root, path)), f"{page} names {path}"


def test_fill_mask_ranks_by_probability_and_names_missing_mask(small_checkpoint):
    model = m2jax.from_pretrained(small_checkpoint)
    tokenizer = load_tokenizer()
    [preds] = fill_mask(model, tokenizer, "paris is the [MASK] of france.", top_k=4)
    probs = [p for _, p in preds]
    assert len(preds) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    two = fill_mask(model, tokenizer, "[MASK] and [MASK]", top_k=1)
    assert len(two) == 2
    with pytest.raises(ValueError, match="no \\[MASK\\] token"):
        fill_mask(model, tokenizer, "nothing masked here")
    # Padding rows of the embedding table (30522..30527) are never predicted.
    [preds] = fill_mask(model, tokenizer, "[MASK]", top_k=30522)
    assert len(preds) == 30522 and np.isclose(sum(p for _, p in preds), 1.0, atol=1e-4)


def test_tiny_config_with_the_tokenizer_says_why_and_the_real_vocab_one_works(small_checkpoint):
    """`tiny` has a 128-token vocabulary; `tiny-real-vocab` takes the real tokenizer's ids."""
    tokenizer = load_tokenizer()
    tiny = m2jax.M2BertForMaskedLM(m2jax.get_model_config("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokenizer has 30522 tokens .* only 128 rows.*"
                                         r"tiny-real-vocab"):
        fill_mask(tiny, tokenizer, "paris is the [MASK] of france.")
    cfg = m2jax.get_model_config("tiny-real-vocab")
    assert cfg.vocab_size == 30528 >= tokenizer.vocab_size
    assert cfg.replace(vocab_size=128) == m2jax.get_model_config("tiny").replace(
        max_position_embeddings=32, long_conv_l_max=32)
