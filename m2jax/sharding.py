"""Device mesh and parameter sharding: the one place that decides where arrays live.

Mesh axes are ("data", "fsdp", "tensor"). The batch is split over data x fsdp; parameters are
split by logical axis names, which `PARAM_LOGICAL_AXES` assigns from the parameter's path and
`LOGICAL_AXIS_RULES` maps to mesh axes (MaxText / flax lm1b style). A dimension that a mesh axis
does not divide stays replicated, so every config runs on every mesh.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2jax.optim import param_path_name

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (None: replicated).
LOGICAL_AXIS_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",  # the model width H
    "mlp": "tensor",  # 3H projections, the GLU width 2I / I
    "blocks": None,  # block-diagonal block index (nb = 4)
    "block_in": "fsdp",
    "block_out": "tensor",
    "filter": None,  # implicit-filter MLP width and positions: small, replicated
    "length": None,
    "classes": None,
}

# (path regex, logical axes of the array) — first match wins; the path is the parameter's
# location in the model, e.g. /bert/layers/3/attention/in_linear/kernel.
PARAM_LOGICAL_AXES: Sequence[tuple[str, tuple[str | None, ...]]] = (
    (r"/word_embeddings/embedding$", ("vocab", "embed")),
    (r"/position_embeddings/embedding$", ("length", "embed")),
    (r"/token_type_embeddings/embedding$", (None, "embed")),
    (r"/in_linear/kernel$", ("embed", "mlp")),
    (r"/in_linear/bias$", ("mlp",)),
    (r"/out_linear/kernel$", ("mlp", "embed")),
    (r"/short_conv_weight$", ("mlp", None)),
    (r"/short_conv_bias$", ("mlp",)),
    (r"/gated_layers/weight$", ("blocks", "block_out", "block_in")),
    (r"/wo/weight$", ("blocks", "block_in", "block_out")),
    (r"/mlp_(fwd|rev)/3/kernel$", ("filter", "embed")),
    (r"/mlp_(fwd|rev)/\d+/kernel$", ("filter", "filter")),
    (r"/mlp_(fwd|rev)/\d+/bias$", ("filter",)),
    (r"/z$", ("length", "filter")),
    (r"/t$", ("length",)),
    (r"/freq$", ("filter",)),
    (r"/(bias_D|deltas)$", ("embed",)),
    (r"/decoder_bias$", ("vocab",)),
    (r"/(dense|pooler)/kernel$", ("embed", "mlp")),
    (r"/classifier/kernel$", ("embed", "classes")),
    (r"(LayerNorm|layernorm)/(scale|bias)$", ("embed",)),
    (r"/(bias)$", (None,)),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one size may be -1 (the rest of the devices)."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = [a for a in MESH_AXES if a not in shape]
    extra = [a for a in shape if a not in MESH_AXES]
    if unknown or extra:
        raise ValueError(f"mesh shape needs exactly the axes {MESH_AXES}, got {dict(shape)}")
    sizes = [int(shape[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    # Auto axes: the FSDP step relies on the compiler's sharding propagation (JAX_NOTES).
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def logical_axes_for(path_name: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path_name):
            if len(axes) != ndim:
                raise ValueError(f"logical axes {axes} for {path_name} do not fit its rank {ndim}")
            return axes
    raise ValueError(
        f"no logical axis rule for parameter {path_name}; add one to PARAM_LOGICAL_AXES"
    )


def spec_for(path_name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec from the rules, replicating dimensions the mesh axis does not divide."""
    axes = logical_axes_for(path_name, len(shape))
    out = []
    for dim, logical in zip(shape, axes):
        mesh_axis = LOGICAL_AXIS_RULES.get(logical) if logical else None
        if mesh_axis is not None and dim % mesh.shape[mesh_axis] == 0:
            out.append(mesh_axis)
        else:
            out.append(None)
    return P(*out)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a model state pytree (params or constants)."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(param_path_name(path), tuple(np.shape(leaf)), mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over data x fsdp, the sequence replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch rows -> global arrays sharded over data x fsdp (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
