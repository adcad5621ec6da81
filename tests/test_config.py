"""Model configs: parameter counts of every published size, config.json mapping, validation."""

import dataclasses

import pytest

import m2jax
from m2jax.model import abstract_model
from m2jax.config import M2JAX_ONLY_FIELDS, RELEASED_VOCAB_SIZE, config_from_dict, config_to_dict


def _count(cfg, cls=m2jax.M2BertForMaskedLM):
    return m2jax.count_params(abstract_model(cls, cfg))


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("m2-bert-base-80m", {}, 80_262_714),
        ("m2-bert-base-80m", {"vocab_size": RELEASED_VOCAB_SIZE}, 80_267_328),
        ("m2-bert-base-80m-released", {}, 80_285_760),
        # The spec's figures for the larger sizes are with the released vocab (30528).
        ("m2-bert-base-110m", {"vocab_size": RELEASED_VOCAB_SIZE}, 115_583_616),
        ("m2-bert-large-260m", {"vocab_size": RELEASED_VOCAB_SIZE}, 259_133_760),
        ("m2-bert-large-341m", {"vocab_size": RELEASED_VOCAB_SIZE}, 341_038_144),
    ],
)
def test_parameter_counts_match_reference(name, overrides, expected):
    assert _count(m2jax.get_model_config(name, **overrides)) == expected


@pytest.mark.parametrize("name, length", [("m2-bert-80m-2k", 2048), ("m2-bert-80m-8k", 8192),
                                          ("m2-bert-80m-32k", 32768)])
def test_long_context_configs_grow_only_positions_and_filter_inputs(name, length):
    base = _count(m2jax.get_model_config("m2-bert-base-80m", vocab_size=RELEASED_VOCAB_SIZE))
    cfg = m2jax.get_model_config(name)
    assert cfg.max_position_embeddings == cfg.long_conv_l_max == length
    extra_rows = length - 128
    # Position table rows, plus `z` rows of two filter sets in each of 12 layers.
    assert _count(cfg) - base == extra_rows * 768 + 12 * 2 * extra_rows * 5


def test_unknown_model_config_name_lists_known_ones():
    with pytest.raises(ValueError, match="m2-bert-base-80m"):
        m2jax.get_model_config("m2-bert-huge")


def test_config_json_round_trip_keeps_every_reference_field():
    cfg = m2jax.get_model_config("m2-bert-base-110m", hyena_training_additions=True, pool_all=True)
    raw = config_to_dict(cfg, "BertForSequenceClassification")
    assert raw["monarch_mixer_sequence_mixing"] is True
    assert raw["architectures"] == ["BertForSequenceClassification"]
    for field in M2JAX_ONLY_FIELDS:
        assert field not in raw
    assert config_from_dict(raw) == cfg


def test_config_from_hf_json_ignores_bookkeeping_and_fills_l_max():
    raw = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "max_position_embeddings": 256, "vocab_size": 30528, "transformers_version": "4.31",
           "architectures": ["BertForMaskedLM"], "hyena_filter_order": 16}
    cfg = config_from_dict(raw, dtype="bfloat16")
    assert cfg.long_conv_l_max == 256 and cfg.vocab_size == 30528 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("raw, message", [
    ({"use_flash_mm": True}, "use_flash_mm"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"hidden_size": 30, "intermediate_size": 64}, "monarch_mlp_nblocks"),
    ({"hyena_emb_dim": 4}, "hyena_emb_dim"),
    ({"use_glu_mlp": False}, "use_glu_mlp"),
    ({"max_position_embeddings": 64, "long_conv_l_max": 128}, "long_conv_l_max"),
])
def test_bad_configs_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_bad_compute_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        m2jax.get_model_config("tiny", dtype="float16")


def test_config_is_immutable():
    cfg = m2jax.get_model_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 8


# --- config.json validation (issue 10 item 10) ---

import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402

from flax import nnx  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _tiny_dir(tmp_path, **changes):
    """A saved tiny MLM whose config.json gets `changes` (None deletes a field)."""
    model = m2jax.M2BertForMaskedLM(m2jax.get_model_config("tiny"), rngs=nnx.Rngs(0))
    m2jax.save_pretrained(model, str(tmp_path))
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    path.write_text(json.dumps(raw))
    return str(tmp_path), str(path)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "32", r"hidden_size must be an integer, got '32' \(str\)"),
    ("hidden_size", 32.0, r"hidden_size must be an integer, got 32.0 \(float\)"),
    ("pool_all", "false", r"pool_all must be true or false, got 'false' \(str\)"),
    ("bidirectional", 1, r"bidirectional must be true or false, got 1 \(int\)"),
    ("layer_norm_eps", -1e-12, r"layer_norm_eps must be > 0"),
    ("layer_norm_eps", float("nan"), r"layer_norm_eps must be a finite number, got nan"),
    ("layer_norm_eps", "1e-12", r"layer_norm_eps must be a number"),
    ("classifier_dropout", "0.1", r"classifier_dropout must be a number or null"),
    ("hidden_dropout_prob", 1.5, r"hidden_dropout_prob must lie in \[0, 1\), got 1.5"),
    ("initializer_range", -0.02, r"initializer_range must be >= 0"),
    ("pad_token_id", 128, r"pad_token_id must lie in \[0, vocab_size=128\), got 128"),
    ("num_labels", 0, r"num_labels must be positive"),
    ("monarch_mlp_nblocks", 0, r"monarch_mlp_nblocks must be positive"),
    ("hyena_w", float("inf"), r"hyena_w must be a finite number"),
    ("sequence_token_planting", "no", r"sequence_token_planting must be true or false"),
    ("monarch_mixer_sequence_mixing", False, r"monarch_mixer_sequence_mixing is False"),
])
def test_config_json_fields_are_validated_naming_file_and_field(tmp_path, field, value, message):
    path, config_path = _tiny_dir(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=message) as e:
        m2jax.from_pretrained(path)
    assert str(e.value).startswith(config_path)


def test_valid_config_json_loads_and_accepts_integers_for_floats(tmp_path):
    path, _ = _tiny_dir(tmp_path, hyena_w=10, layer_norm_eps=1e-5, classifier_dropout=None)
    model = m2jax.from_pretrained(path)
    assert model.config.hyena_w == 10.0 and model.config.layer_norm_eps == 1e-5


def test_unknown_config_fields_warn_naming_them(tmp_path):
    path, config_path = _tiny_dir(tmp_path, max_position_embedding=16, my_note="x",
                                  transformers_version="4.57.6", id2label={"0": "a", "1": "b"},
                                  auto_map={"AutoConfig": "configuration_bert.BertConfig"})
    with pytest.warns(UserWarning) as record:
        m2jax.from_pretrained(path)
    messages = [str(w.message) for w in record if "ignoring fields" in str(w.message)]
    assert messages == [
        f"{config_path}: ignoring fields m2jax does not know: max_position_embedding "
        "(did you mean max_position_embeddings?), my_note"
    ]


@pytest.mark.parametrize("name", sorted(
    os.path.relpath(p, FIXTURES) for p in glob.glob(os.path.join(FIXTURES, "**", "*config.json"),
                                                    recursive=True)))
def test_reference_written_configs_load_without_warnings(name):
    """The fixtures' config.json files are full reference/HF dumps (every bookkeeping field)."""
    with open(os.path.join(FIXTURES, name)) as f:
        raw = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict(raw, source=name)


def test_direct_construction_is_type_checked_too():
    with pytest.raises(ValueError, match=r"hidden_size must be an integer, got '32'"):
        m2jax.get_model_config("tiny", hidden_size="32")
    with pytest.raises(ValueError, match="layer_norm_eps must be a finite number"):
        m2jax.get_model_config("tiny", layer_norm_eps=math.nan)


def test_overrides_are_named_in_errors():
    with pytest.raises(ValueError, match=r"cfg.json and the overrides \['num_labels'\]"):
        config_from_dict({"hidden_size": 32, "intermediate_size": 64}, source="cfg.json",
                         num_labels=-1)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_unreadable_config_json_names_the_file(tmp_path, text, message):
    path, config_path = _tiny_dir(tmp_path)
    with open(config_path, "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=message) as e:
        m2jax.from_pretrained(path)
    assert config_path in str(e.value)
