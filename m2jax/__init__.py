"""m2jax: Monarch Mixer BERT (M2-BERT) in JAX/Flax NNX.

Importing `m2jax` pulls in jax and flax only; the data pipelines (`m2jax.data`) import their own
heavier dependencies when used.
"""

from m2jax.config import M2BertConfig, config_from_dict, config_to_dict, get_model_config
from m2jax.model import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    abstract_model,
    count_params,
)
from m2jax.embedder import Embedder
from m2jax.losses import classification_loss, mlm_loss
from m2jax.pretrained import from_pretrained, read_state_dict, save_pretrained
from m2jax.torch_names import StateDictMismatch, export_state_dict, import_state_dict
from m2jax.torch_pickle import CheckpointFileError

__version__ = "0.1.0"

__all__ = [
    "M2BertConfig",
    "M2BertForMaskedLM",
    "M2BertForSequenceClassification",
    "M2BertForTextEncoding",
    "Embedder",
    "abstract_model",
    "StateDictMismatch",
    "CheckpointFileError",
    "classification_loss",
    "config_from_dict",
    "config_to_dict",
    "count_params",
    "export_state_dict",
    "from_pretrained",
    "get_model_config",
    "import_state_dict",
    "mlm_loss",
    "read_state_dict",
    "save_pretrained",
]
