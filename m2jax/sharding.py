"""Device mesh and parameter sharding: the one place that decides where arrays live.

Mesh axes are ("data", "fsdp", "tensor"). The batch is split over data x fsdp. Every parameter and
constant names the logical axis of each of its dimensions where it is created (`logical_axes`
metadata, as flax's lm1b / gemma and MaxText's `kernel_axes` do); axis rules, plain
(logical axis, mesh axis) pairs that a recipe's config holds, map those names to mesh axes. A
dimension that its mesh axis does not divide stays replicated, so every config runs on every mesh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The Variable metadata key holding the logical axes: flax's own (`nnx.with_partitioning` writes
# it; `nnx.get_partition_spec` under `nnx.logical_axis_rules` reads it).
AXES_METADATA = "out_sharding"

# A mesh axis, several (the dimension split over their product), or None (replicated).
MeshAxes = Union[str, Sequence[str], None]
AxisRules = Union[Mapping[str, MeshAxes], Sequence[tuple[str, MeshAxes]]]

# Logical axis -> mesh axis, for every logical name the M2-BERT models use (flax's
# `LogicalRules` format, so `nnx.logical_axis_rules(DEFAULT_AXIS_RULES)` accepts it too).
DEFAULT_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),  # word-embedding rows, the MLM decoder bias
    ("embed", "fsdp"),  # the model width H
    ("mlp", "tensor"),  # the 3H sequence-mixer projections, head and pooler widths
    ("blocks", None),  # block-diagonal block index (nb = 4)
    ("block_in", "fsdp"),  # per-block width on the model-width side (H / nb)
    ("block_out", "tensor"),  # per-block width on the GLU side (2I / nb, I / nb)
    ("filter", None),  # implicit-filter MLP width and features: small, replicated
    ("length", None),  # positions (position embeddings, filter z and t)
    ("classes", None),  # classifier outputs
)


def logical_axes(*names: str | None) -> dict[str, Any]:
    """Variable metadata naming the logical axis of each dimension (None: never sharded).

    `nnx.Param(x_DxF, **logical_axes("embed", "mlp"))`, or `kernel_metadata=logical_axes(...)`
    for flax layers. `eager_sharding=False` keeps model creation free of any mesh: arrays are
    placed only by `state_shardings`, which also applies the divisibility rule.
    """
    return {AXES_METADATA: tuple(names), "eager_sharding": False}


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


def _rule_table(rules: AxisRules) -> dict[str, tuple[str, ...]]:
    """{logical axis: mesh axes (empty: replicated)} from a mapping or (logical, mesh) pairs."""
    pairs = list(rules.items()) if hasattr(rules, "items") else list(rules)
    table: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"an axis rule is a (logical axis, mesh axis) pair, got {pair!r}")
        logical, mesh_axes = pair
        if logical in table:
            raise ValueError(f"axis rules name the logical axis {logical!r} twice")
        if mesh_axes is None:
            table[logical] = ()
        elif isinstance(mesh_axes, str):
            table[logical] = (mesh_axes,)
        else:
            table[logical] = tuple(mesh_axes)
    return table


def _spec(
    name: str,
    axes: Sequence[str | None],
    shape: tuple[int, ...],
    mesh: Mesh,
    table: dict[str, tuple[str, ...]],
) -> P:
    if len(axes) != len(shape):
        raise ValueError(f"{name}: logical axes {tuple(axes)} do not fit its shape {shape}")
    out: list[Any] = []
    used: set[str] = set()
    for dim, logical in zip(shape, axes):
        if logical is None:
            out.append(None)
            continue
        if logical not in table:
            raise ValueError(
                f"{name}: no axis rule for its logical axis {logical!r} (rules cover "
                f"{sorted(table)}); add ({logical!r}, <mesh axis or None>) to the axis rules"
            )
        mesh_axes = table[logical]
        missing = [a for a in mesh_axes if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"axis rule {logical!r} -> {mesh_axes} names mesh axes {missing} that the mesh "
                f"{dict(mesh.shape)} does not have"
            )
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        # A mesh axis splits one dimension at most; later dimensions asking for it replicate.
        if mesh_axes and dim % size == 0 and not used.intersection(mesh_axes):
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
        else:
            out.append(None)
    return P(*out)


def partition_spec(
    axes: Sequence[str | None],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: AxisRules = DEFAULT_AXIS_RULES,
) -> P:
    """PartitionSpec of an array with these logical axes and shape on `mesh` under `rules`,
    replicating every dimension its mesh axes do not divide."""
    return _spec("array", axes, tuple(shape), mesh, _rule_table(rules))


def _path_name(path: tuple) -> str:
    """'/bert/layers/0/attention/in_linear/kernel' for a jax key path into an nnx.State."""
    return "/" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(state: Any, mesh: Mesh, rules: AxisRules = DEFAULT_AXIS_RULES) -> Any:
    """NamedSharding for every Variable of a model state (params, constants or the whole state),
    from each Variable's logical axes; the same tree, each Variable holding its sharding.

    Raises ValueError naming the first entry without logical axes, with axes that do not fit
    its rank, or with a logical axis the rules do not cover.
    """
    table = _rule_table(rules)

    def one(path, var):
        name = _path_name(path)
        axes = var.get_metadata(AXES_METADATA, None) if isinstance(var, nnx.Variable) else None
        if axes is None:
            raise ValueError(
                f"{name} ({type(var).__name__}, shape {tuple(np.shape(var))}) has no logical "
                "axes; create it with `**m2jax.sharding.logical_axes(...)` metadata"
            )
        shape = tuple(np.shape(var.get_value()))
        return var.replace(NamedSharding(mesh, _spec(name, axes, shape, mesh, table)))

    return jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


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
