"""m2jax: Monarch Mixer BERT (M2-BERT) in JAX/Flax NNX.

The public names below are imported on first use (PEP 562): `import m2jax` alone loads nothing
heavy, so a launch can check its flags, or print its help, without first importing jax and flax
(seconds on a small machine). `m2jax.M2BertForMaskedLM` and `from m2jax import ...` work as
usual; the data pipelines (`m2jax.data`) import their own heavier dependencies when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "M2BertConfig": "m2jax.config",
    "config_from_dict": "m2jax.config",
    "config_to_dict": "m2jax.config",
    "get_model_config": "m2jax.config",
    "M2BertForMaskedLM": "m2jax.model",
    "M2BertForSequenceClassification": "m2jax.model",
    "M2BertForTextEncoding": "m2jax.model",
    "abstract_model": "m2jax.model",
    "count_params": "m2jax.model",
    "Embedder": "m2jax.embedder",
    "classification_loss": "m2jax.losses",
    "mlm_loss": "m2jax.losses",
    "from_pretrained": "m2jax.pretrained",
    "read_state_dict": "m2jax.pretrained",
    "save_pretrained": "m2jax.pretrained",
    "StateDictMismatch": "m2jax.torch_names",
    "export_state_dict": "m2jax.torch_names",
    "import_state_dict": "m2jax.torch_names",
    "CheckpointFileError": "m2jax.torch_pickle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name (imported from its module) or a submodule (`m2jax.model`), on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its own imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from m2jax.config import M2BertConfig, config_from_dict, config_to_dict, get_model_config
    from m2jax.embedder import Embedder
    from m2jax.losses import classification_loss, mlm_loss
    from m2jax.model import (
        M2BertForMaskedLM,
        M2BertForSequenceClassification,
        M2BertForTextEncoding,
        abstract_model,
        count_params,
    )
    from m2jax.pretrained import from_pretrained, read_state_dict, save_pretrained
    from m2jax.torch_names import StateDictMismatch, export_state_dict, import_state_dict
    from m2jax.torch_pickle import CheckpointFileError
