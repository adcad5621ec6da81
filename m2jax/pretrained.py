"""Load and save M2-BERT checkpoints in the layouts the released models use (spec sections 0, 4).

Accepted inputs: a directory holding `config.json` plus `model.safetensors`, `pytorch_model.bin` or
a Composer `model.pt`; or one of those files alone (the config is then read from a `config.json`
beside it, else inferred from the tensor shapes); or a Hugging Face Hub model id (m2jax.hub).
Output: `config.json` + `model.safetensors` with the reference's key names, which the PyTorch
reference loads with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Any, Literal, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_safetensors
from safetensors.numpy import save_file as save_safetensors

from m2jax.config import M2BertConfig, config_from_dict, config_to_dict
from m2jax.hub import resolve_checkpoint
from m2jax.model import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    abstract_model,
)
from m2jax.torch_names import export_state_dict, import_state_dict
from m2jax.torch_pickle import CheckpointFileError, load_torch_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
Task = Literal["auto", "mlm", "classification", "embedding"]
Model = M2BertForMaskedLM | M2BertForSequenceClassification | M2BertForTextEncoding

_MODEL_CLASSES = {
    "mlm": M2BertForMaskedLM,
    "classification": M2BertForSequenceClassification,
    "embedding": M2BertForTextEncoding,
}
# The retrieval models' own (HF hub) code names their encoder-plus-pooler class this way.
_ARCHITECTURES = {
    M2BertForMaskedLM: "BertForMaskedLM",
    M2BertForSequenceClassification: "BertForSequenceClassification",
    M2BertForTextEncoding: "BertForTextEncoding",
}
POOLER_KEY = "bert.pooler.dense.weight"
logger = logging.getLogger(__name__)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a checkpoint file as NumPy arrays, keys normalised to the `bert.`/`cls.` form.

    Composer files keep the model under `ckpt['state']['model']` with a `model.` prefix; retrieval
    checkpoints carry FlashFFTConv buffers (`*.flashfft.*`) that are not model weights.
    """
    if path.endswith(".safetensors"):
        try:
            raw: Any = load_safetensors(path)
        except (SafetensorError, ValueError, OSError) as e:
            raise CheckpointFileError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        raw = load_torch_file(path)
        if (
            isinstance(raw, Mapping)
            and isinstance(raw.get("state"), Mapping)
            and "model" in raw["state"]
        ):
            raw = raw["state"]["model"]
        elif isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
            raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{path}: expected a state dict (a mapping of names to tensors), "
            f"got {type(raw).__name__}"
        )
    out = {}
    for key, value in raw.items():
        if ".flashfft." in key:
            continue
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("model.") :] if key.startswith("model.") else key] = value
    return out


def infer_config(sd: Mapping[str, np.ndarray], **overrides: Any) -> M2BertConfig:
    """Rebuilds the architecture fields of a config from a state dict's shapes (no config.json)."""
    try:
        V, H = sd["bert.embeddings.word_embeddings.weight"].shape
        layer_ids = {
            int(m.group(1)) for k in sd if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))
        }
        p = "bert.encoder.layer.0"
        nb, _, i_blk = (
            sd[f"{p}.mlp.wo.weight"].shape
            if sd[f"{p}.mlp.wo.weight"].ndim == 3
            else (1, *sd[f"{p}.mlp.wo.weight"].shape)
        )
        order, emb_dim = sd[f"{p}.attention.filter_fn.implicit_filter.0.weight"].shape
        l_max = sd[f"{p}.attention.filter_fn.pos_emb.z"].shape[1]
        kwargs: dict[str, Any] = dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=len(layer_ids),
            intermediate_size=nb * i_blk,
            monarch_mlp_nblocks=nb if nb > 1 else 4,
            use_monarch_mlp=sd[f"{p}.mlp.wo.weight"].ndim == 3,
            max_position_embeddings=l_max,
            long_conv_l_max=l_max,
            type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
            hyena_filter_order=order,
            hyena_emb_dim=emb_dim,
            hyena_training_additions=f"{p}.attention.layernorm.weight" in sd,
            residual_long_conv=f"{p}.attention.filter_fn2.bias" in sd,
            bidirectional=f"{p}.attention.filter_fn.implicit_filter_rev.0.weight" in sd,
            use_positional_encodings="bert.embeddings.position_embeddings.weight" in sd,
        )
    except KeyError as e:
        raise ValueError(f"cannot infer an M2-BERT config: the state dict has no key {e}") from None
    if "classifier.weight" in sd:
        kwargs["num_labels"] = sd["classifier.weight"].shape[0]
    kwargs.update(overrides)
    return M2BertConfig(**kwargs)


def _find_files(path: str) -> tuple[str, str | None]:
    if os.path.isdir(path):
        weights = [
            os.path.join(path, f) for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))
        ]
        if not weights:
            raise FileNotFoundError(f"{path} holds none of {', '.join(WEIGHT_FILES)}")
        if len(weights) > 1:
            _say_once(
                f"{path} holds {', '.join(os.path.basename(w) for w in weights)}; loading "
                f"{os.path.basename(weights[0])}"
            )
        config = os.path.join(path, "config.json")
        return weights[0], config if os.path.exists(config) else None
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    config = os.path.join(os.path.dirname(path) or ".", "config.json")
    return path, config if os.path.exists(config) else None


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def read_config(path: str) -> dict[str, Any]:
    """The JSON object in `path` (a config.json); errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an over-long integer
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: expected a JSON object of config fields, got {type(raw).__name__}"
        )
    return raw


def _detect_task(sd: Mapping[str, np.ndarray], raw_config: Mapping[str, Any] | None) -> str:
    if any(k.startswith("cls.predictions.") for k in sd):
        return "mlm"
    if any(k.startswith("classifier.") for k in sd):
        return "classification"
    archs = (raw_config or {}).get("architectures") or []
    if any("SequenceClassification" in a for a in archs):
        return "classification"
    if any("TextEncoding" in a for a in archs) or POOLER_KEY in sd:
        return "embedding"
    return "mlm"


def _text_encoder_state_dict(sd: Mapping[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """The encoder and pooler of a retrieval or sequence-classification state dict.

    The retrieval checkpoints are sequence-classification state dicts; their embedding is the
    pooler output, so the classifier is left out here rather than reported as unexpected.
    """
    if POOLER_KEY not in sd:
        heads = sorted({k.split(".")[0] for k in sd if not k.startswith("bert.")})
        raise ValueError(
            f"{path}: no pooler ({POOLER_KEY}) in the checkpoint, so it cannot give text "
            f"embeddings (they are the pooler output); its heads: {heads or 'none'}. Use a "
            "retrieval or sequence-classification checkpoint"
        )
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def from_pretrained(
    path: str,
    *,
    task: Task = "auto",
    dtype: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    **config_overrides: Any,
) -> Model:
    """Loads a released (or `save_pretrained`) M2-BERT checkpoint, local or from the Hub.

    Args:
      path: a checkpoint directory or a single weights file (see module docstring), or a Hugging
        Face Hub model id such as "danfu09/m2-bert-80M" (a local path of that name wins). For an
        id, `config.json` and one weights file are fetched into the hub cache (m2jax.hub).
      task: "mlm", "classification" or "embedding" (encoder + pooler, `M2BertForTextEncoding`;
        a classifier in the checkpoint is dropped); "auto" picks from the checkpoint's heads.
      dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
      revision: Hub ids only: branch, tag or commit (default the main branch).
      cache_dir: Hub ids only: the hub cache (default `HF_HUB_CACHE`, else `$HF_HOME/hub`).
      local_files_only: Hub ids only: use the cache, never the network (as `HF_HUB_OFFLINE=1`).
      config_overrides: M2BertConfig fields to change (e.g. `num_labels` for a new classifier).
    Returns:
      The model, with `.config`; call it as `model(input_ids, token_type_ids, attention_mask)`.
    Raises:
      StateDictMismatch listing missing / unexpected / mis-shaped keys; ValueError for bad files.
    """
    path = resolve_checkpoint(
        path,
        WEIGHT_FILES,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    weights_path, config_path = _find_files(path)
    sd = read_state_dict(weights_path)
    raw_config = read_config(config_path) if config_path is not None else None
    if task == "auto":
        task = _detect_task(sd, raw_config)
    if task not in _MODEL_CLASSES:
        raise ValueError(
            f"task must be 'auto', 'mlm', 'classification' or 'embedding', got {task!r}"
        )
    if task == "embedding":
        sd = _text_encoder_state_dict(sd, weights_path)
    if dtype is not None:
        config_overrides["dtype"] = dtype
    if (
        task == "classification"
        and "classifier.weight" in sd
        and "num_labels" not in config_overrides
    ):
        config_overrides["num_labels"] = sd["classifier.weight"].shape[0]
    cfg = (
        config_from_dict(raw_config, source=config_path, **config_overrides)
        if raw_config is not None
        else infer_config(sd, **config_overrides)
    )
    model_cls = _MODEL_CLASSES[task]
    # Abstract first: a random init of every parameter would be thrown away at once.
    model = abstract_model(model_cls, cfg)
    import_state_dict(model, sd)
    return model


def save_pretrained(model: Model, path: str) -> None:
    """Writes `config.json` and `model.safetensors` (reference key names) into directory `path`.

    Files are written under temporary names and renamed into place only once both are complete,
    so an interrupted save never destroys a checkpoint already there.
    """
    os.makedirs(path, exist_ok=True)
    sd = export_state_dict(model)
    config = config_to_dict(model.config, architecture=_ARCHITECTURES[type(model)])
    staged = []
    try:
        fd, tmp_weights = tempfile.mkstemp(dir=path, suffix=".safetensors.tmp")
        os.close(fd)
        staged.append(tmp_weights)
        save_safetensors(sd, tmp_weights, metadata={"format": "pt"})
        fd, tmp_config = tempfile.mkstemp(dir=path, suffix=".json.tmp")
        staged.append(tmp_config)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        # mkstemp creates owner-only files; give them the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        for tmp in staged:
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp_weights, os.path.join(path, "model.safetensors"))
        os.replace(tmp_config, os.path.join(path, "config.json"))
    finally:
        for tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
