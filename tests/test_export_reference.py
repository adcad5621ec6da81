"""save_pretrained -> the PyTorch reference builds every architecture (issue 10 item 5).

Golden files: tests/fixtures/export (made by tests/fixtures/make_export_fixtures.py). For each
architecture the reference built its model from an m2jax-written config.json alone, loaded the
m2jax-written weights with strict=True, and recorded its outputs and the config attributes it
read. Here, without torch, m2jax writes the same directory again and must write the same
config.json, with every attribute the reference reads and does not default, the same weights and
keys, and give the reference's outputs. `test_the_reference_builds_a_fresh_save` reruns the
reference itself when a torch interpreter is available (this one, or $M2JAX_REFERENCE_PYTHON)
and the reference's bert/ folder ($M2JAX_REFERENCE_BERT, default /work/refm2/bert).
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import m2jax
from parity_weights import FIXTURES, rel_l2

sys.path.insert(0, FIXTURES)
import make_export_fixtures as mef  # noqa: E402

EXPORT = os.path.join(FIXTURES, "export")
TOLERANCE = 1e-5  # relative L2, as tests/test_parity.py
with open(os.path.join(EXPORT, "reference.json")) as _f:
    GOLDEN = json.load(_f)


def _m2jax_outputs(model, inputs) -> np.ndarray:
    ids, types, mask = (jnp.asarray(inputs[k]) for k in ("input_ids", "token_type_ids",
                                                          "attention_mask"))
    return np.asarray(model(ids, types, mask))


def test_every_saved_architecture_has_a_golden_file():
    assert sorted(GOLDEN) == sorted(mef.ARCHITECTURES)
    archs = {g["architecture"] for g in GOLDEN.values()}
    assert archs == set(m2jax.config.ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(mef.ARCHITECTURES))
def test_saved_config_builds_the_reference_model(name, tmp_path):
    golden = GOLDEN[name]
    with open(os.path.join(EXPORT, name, "config.json")) as f:
        built_from = json.load(f)  # the file the reference built its model from
    model = mef.build_m2jax_model(name, built_from)
    m2jax.save_pretrained(model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written == built_from
    # Every attribute the reference's model code reads that its BertConfig does not define.
    assert set(golden["required"]) <= set(written), set(golden["required"]) - set(written)
    for key in set(golden["values"]) & set(written):
        assert golden["values"][key] == written[key], key
    # The very weights and keys the reference loaded with strict=True.
    sd = load_file(str(tmp_path / "model.safetensors"))
    digest = mef.weights_digest(sd)
    assert digest["sha256_except_z"] == golden["weights"]["sha256_except_z"]
    for stat in ("z_sum", "z_norm"):
        assert digest[stat] == pytest.approx(golden["weights"][stat], rel=1e-6)
    assert {k: list(v.shape) for k, v in sd.items()} == dict(golden["state_dict"])
    # The reference's outputs (MLM or classification logits, or the pooled embedding).
    reference = np.load(os.path.join(EXPORT, name, "reference.npz"))
    [output_name] = [k for k in ("logits", "pooled") if k in reference]
    assert rel_l2(_m2jax_outputs(model, reference), reference[output_name]) < TOLERANCE


def test_use_cls_token_golden_classifies_the_raw_first_token():
    """The reference's use_cls_token logits ignore the pooler it builds, and m2jax's agree."""
    reference = np.load(os.path.join(EXPORT, "cls_token", "reference.npz"))
    with open(os.path.join(EXPORT, "cls_token", "config.json")) as f:
        model = mef.build_m2jax_model("cls_token", json.load(f))
    assert model.config.use_cls_token
    model.bert.pooler.kernel[...] = model.bert.pooler.kernel[...] * 0 + 1.0  # unused
    assert rel_l2(_m2jax_outputs(model, reference), reference["logits"]) < TOLERANCE


def _reference_python() -> tuple[str, str] | None:
    bert = os.environ.get("M2JAX_REFERENCE_BERT", "/work/refm2/bert")
    if not os.path.isfile(os.path.join(bert, "src", "bert_layers.py")):
        return None
    for python in (os.environ.get("M2JAX_REFERENCE_PYTHON"), sys.executable):
        if python and subprocess.run([python, "-c", "import torch, einops, transformers"],
                                     capture_output=True).returncode == 0:
            return python, bert
    return None


@pytest.mark.skipif(_reference_python() is None,
                    reason="needs torch and the reference (set M2JAX_REFERENCE_PYTHON)")
def test_the_reference_builds_a_fresh_save(tmp_path):
    python, bert = _reference_python()
    mef.write(str(tmp_path / "saved"))
    proc = subprocess.run(
        [python, os.path.join(FIXTURES, "make_export_fixtures.py"), "check", "--reference", bert,
         "--dirs", str(tmp_path / "saved"), "--out", str(tmp_path / "golden")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "golden" / "reference.json") as f:
        fresh = json.load(f)
    for name in mef.ARCHITECTURES:
        assert fresh[name]["required"] == GOLDEN[name]["required"]
        reference = np.load(tmp_path / "golden" / name / "reference.npz")
        model = m2jax.from_pretrained(str(tmp_path / "saved" / name))
        [output_name] = [k for k in ("logits", "pooled") if k in reference]
        assert rel_l2(_m2jax_outputs(model, reference), reference[output_name]) < TOLERANCE
