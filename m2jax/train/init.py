"""Building the model a run trains: its config from `config.model`, a random initialisation, or
the weights of `init_from` (a training work directory, a `final/` export, a released checkpoint).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
from etils import epath
from flax import nnx

from m2jax.config import M2BertConfig
from m2jax.model import M2BertForMaskedLM, M2BertForSequenceClassification, abstract_model
from m2jax.train import workdir as wd
from m2jax.train.errors import ConfigError

# `init_from` value that asks for a random initialisation explicitly (GLUE requires init_from;
# pretraining also takes "" for it).
FROM_SCRATCH = "scratch"

_MODEL_CLASSES = {"mlm": M2BertForMaskedLM, "classification": M2BertForSequenceClassification}


def model_config(
    fields: Mapping[str, Any],
    mesh: jax.sharding.Mesh | None = None,
    long_conv_on_sharded_cpu: str = "",
) -> M2BertConfig:
    """The M2BertConfig of `config.model` (every field listed), for a run on `mesh`.

    On a CPU mesh that shards parameters (fsdp or tensor > 1), `long_conv_on_sharded_cpu`
    (`config.long_conv_on_sharded_cpu`; "" = keep) replaces the model's long-convolution
    implementation: XLA:CPU's FFT fails on the partitioned operands (configs/common.py)."""
    fields = dict(fields)
    unknown = sorted(set(fields) - set(M2BertConfig.__dataclass_fields__))
    missing = sorted(set(M2BertConfig.__dataclass_fields__) - set(fields))
    if unknown or missing:
        raise ConfigError(
            "config.model must list every M2BertConfig field (m2jax/config.py): "
            + (f"unknown {unknown} " if unknown else "")
            + (f"missing {missing}" if missing else "")
        )
    try:
        cfg = M2BertConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    sharded = mesh is not None and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1
    if (
        sharded
        and jax.default_backend() == "cpu"
        and long_conv_on_sharded_cpu
        and cfg.long_conv_implementation != long_conv_on_sharded_cpu
    ):
        logging.warning(
            "CPU mesh with fsdp/tensor axes: long convolution %r instead of %r "
            "(config.long_conv_on_sharded_cpu)",
            long_conv_on_sharded_cpu,
            cfg.long_conv_implementation,
        )
        cfg = cfg.replace(long_conv_implementation=long_conv_on_sharded_cpu)
    return cfg


def build_model(cfg: M2BertConfig, task: str, seed: int, init_from: str = "") -> nnx.Module:
    """A model for `task` ("mlm" or "classification"): random from `seed`, then, unless
    `init_from` is "" or "scratch", its embeddings and layers (and pooler) copied from there."""
    model = _MODEL_CLASSES[task](cfg, rngs=nnx.Rngs(seed))
    if init_from and init_from != FROM_SCRATCH:
        copy_encoder(load_init_source(init_from, cfg), model)
    return model


def load_init_source(init_from: str, cfg: M2BertConfig) -> nnx.Module:
    """The model to initialise from: an m2jax work directory (its newest readable orbax
    checkpoint), or anything `from_pretrained` reads (a `final/` export, a released checkpoint);
    local or on a file system epath knows (gs://)."""
    from m2jax.pretrained import from_pretrained

    path = epath.Path(init_from)
    if (path / wd.CHECKPOINTS).is_dir():
        return _from_workdir(path, cfg)
    if wd.is_remote(path):
        with wd.local_copy(path) as local:
            return from_pretrained(local, dtype=cfg.dtype)
    return from_pretrained(init_from, dtype=cfg.dtype)


def _from_workdir(path: epath.Path, cfg: M2BertConfig) -> nnx.Module:
    from m2jax.train.checkpointing import Checkpointer

    ckpt = Checkpointer(path / wd.CHECKPOINTS, keep=1_000_000, async_save=False)
    try:
        found = ckpt.restore_latest_params()
    finally:
        ckpt.close()
    if found is None:
        raise ConfigError(
            f"config.init_from: {path} is a work directory without a readable " "checkpoint"
        )
    step, raw = found
    pure = _pure_dict(raw)
    if "cls" in pure:
        source = abstract_model(M2BertForMaskedLM, cfg)
    else:
        num_labels = pure["classifier"]["kernel"].shape[-1]
        source = abstract_model(M2BertForSequenceClassification, cfg.replace(num_labels=num_labels))
    params = nnx.state(source, nnx.Param)
    try:
        nnx.replace_by_pure_dict(params, pure)
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"config.init_from: the checkpoint in {path} does not fit the " f"configured model: {e}"
        ) from None
    nnx.update(source, params)
    logging.info("initialising from %s, step %d", path, step)
    return source


def _pure_dict(tree: Any) -> Any:
    """orbax's restored nnx.State (`{..., 'kernel': {'value': array}}`, list indices as strings)
    as an nnx pure dict (`{..., 'kernel': array}`, integer list indices)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {int(k) if str(k).isdigit() else k: _pure_dict(v) for k, v in tree.items()}
    return tree


# Fields two models must share for one's encoder to be copied into the other.
_ENCODER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "vocab_size",
    "max_position_embeddings",
    "hyena_filter_order",
    "hyena_training_additions",
    "residual_long_conv",
)


def copy_encoder(source: nnx.Module, target: nnx.Module) -> None:
    """Copies embeddings and layers (and the pooler when both have one); heads stay as built.

    Used to start fine-tuning from a pretrained MLM model, or from another task's fine-tuned
    model (MNLI -> RTE/MRPC/STS-B), whose classifier has a different number of labels.
    """
    src, dst = source.bert, target.bert
    problems = [
        f"{name}: {getattr(src.cfg, name)} != {getattr(dst.cfg, name)}"
        for name in _ENCODER_FIELDS
        if getattr(src.cfg, name) != getattr(dst.cfg, name)
    ]
    if problems:
        raise ConfigError(
            "config.init_from: cannot initialise from a checkpoint of another architecture: "
            + "; ".join(problems)
        )
    # Params only: the constants (t, deltas) are the same closed forms in both models.
    nnx.update(dst.embeddings, nnx.state(src.embeddings, nnx.Param))
    nnx.update(dst.layers, nnx.state(src.layers, nnx.Param))
    if src.pooler is not None and dst.pooler is not None:
        nnx.update(dst.pooler, nnx.state(src.pooler, nnx.Param))
