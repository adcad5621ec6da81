"""Rebuilds the models of the golden parity fixtures (tests/fixtures/README.md) in m2jax.

The fixture generators ran `parity_recipe.perturb_state_dict` on the reference model's state
dict; here the same recipe runs on m2jax's view of that state dict, so both sides hold the same
weights without shipping them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import m2jax
from m2jax.config import config_from_dict
from m2jax.filters import decay_rates, positional_features, time_grid
from m2jax.model import abstract_model
from m2jax.torch_names import POSITION_IDS_KEY, torch_layout

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
sys.path.insert(0, FIXTURES)
import parity_recipe  # noqa: E402


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def base_state_dict(model) -> dict[str, np.ndarray]:
    """The reference state dict's keys and shapes with its buffers' values; params zero (the
    recipe overwrites them, except `z`, which it perturbs from its closed-form initial value)."""
    cfg = model.config
    sd = {}
    for key, slot in torch_layout(model).items():
        if key.endswith("pos_emb.z"):
            value = positional_features(cfg.long_conv_l_max, cfg.hyena_emb_dim)
        elif key.endswith("pos_emb.t"):
            value = time_grid(cfg.long_conv_l_max)
        elif key.endswith("modulation.deltas"):
            value = decay_rates(cfg.hidden_size)
        else:
            value = np.zeros(slot.torch_shape, np.float32)
        sd[key] = np.asarray(value, np.float32).reshape(slot.torch_shape)
    sd[POSITION_IDS_KEY] = np.arange(cfg.max_position_embeddings, dtype=np.int64)[None]
    return sd


def load_parity_model(name: str, model_cls: type):
    """(model of `model_cls` with the recipe's weights for fixture `name`, its golden npz)."""
    with open(os.path.join(FIXTURES, f"{name}.config.json")) as f:
        cfg = config_from_dict(json.load(f))
    model = abstract_model(model_cls, cfg)
    sd = parity_recipe.perturb_state_dict(base_state_dict(model), seed=0)
    m2jax.import_state_dict(model, sd)
    return model, np.load(os.path.join(FIXTURES, f"{name}.npz"))
