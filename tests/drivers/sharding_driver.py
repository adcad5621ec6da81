"""Computes parameter shardings on a fake 2x2x2 CPU mesh (8 devices) for tests/test_sharding.py.

  python tests/drivers/sharding_driver.py

Sets the device count before jax is imported; prints one JSON object:
  specs:   {case: {"/path/to/param": [mesh axis or null per dimension]}} from `state_shardings`
           (whole model state, parameters and constants) for the 80M models, default and custom
           axis rules;
  placed:  for a tiny model's state put on the mesh with those shardings, per array
           [global shape, shard shape, spec].
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import m2jax  # noqa: E402
from m2jax import sharding as shd  # noqa: E402

CUSTOM_RULES = {
    "vocab": ("data", "tensor"),  # 30528 / 4: splits; the tiny model's 128 too
    "embed": "tensor",
    "mlp": "fsdp",
    "blocks": "data",
    "block_in": "tensor",
    "block_out": "fsdp",
    "filter": None,
    "length": "data",
    "classes": "tensor",  # 3 labels: not divisible, replicated
}


def _name(path) -> str:
    return "/" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {_name(p): v.get_value() for p, v in leaves}


def _specs(model, mesh, rules=shd.DEFAULT_AXIS_RULES) -> dict:
    shardings = _flat(shd.state_shardings(nnx.state(model), mesh, rules))
    return {k: list(s.spec) for k, s in shardings.items()}


def main() -> None:
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base = m2jax.get_model_config("m2-bert-base-80m")
    # Later layers repeat the first one's shardings: one layer shows them, and builds faster.
    one_layer = base.replace(num_hidden_layers=1)
    cases = {
        "mlm_additions": (m2jax.M2BertForMaskedLM, base.replace(hyena_training_additions=True)),
        "text_encoding": (m2jax.M2BertForTextEncoding, one_layer),
        "mlm_minimal": (
            m2jax.M2BertForMaskedLM,
            one_layer.replace(bidirectional=False, residual_long_conv=False, use_monarch_mlp=False),
        ),
        "classification": (m2jax.M2BertForSequenceClassification, one_layer.replace(num_labels=3)),
    }
    specs = {}
    for case, (cls, cfg) in cases.items():
        model = m2jax.abstract_model(cls, cfg)
        specs[case] = _specs(model, mesh)
    specs["classification_custom_rules"] = _specs(model, mesh, CUSTOM_RULES)

    # Host arrays in the shapes of a tiny model's state: placing them needs no initialisation.
    tiny = m2jax.abstract_model(m2jax.M2BertForMaskedLM, m2jax.get_model_config("tiny"))
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.state(tiny))
    placed = jax.device_put(state, shd.state_shardings(state, mesh, CUSTOM_RULES))
    placed_info = {
        k: [list(a.shape), list(a.sharding.shard_shape(a.shape)), list(a.sharding.spec)]
        for k, a in _flat(placed).items()
    }
    print(json.dumps({"specs": specs, "placed": placed_info}))


if __name__ == "__main__":
    main()
