"""The one place that knows how m2jax variables map onto the reference's state-dict keys (spec 4).

`torch_layout(model)` lists, for every key of the reference's state dict, the m2jax variable that
holds it and how the array is laid out there. `export_state_dict` and `import_state_dict` use that
table in both directions, so a checkpoint's keys are checked against exactly what the reference
itself would save.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2jax.filters import HyenaFilterSet, decay_rates, time_grid
from m2jax.mixers import BlockDiagLinear, SequenceMixer
from m2jax.model import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    M2BertModel,
)

POSITION_IDS_KEY = "bert.embeddings.position_ids"


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one state-dict entry lives in m2jax.

    `variable` holds the data; `torch_shape` is its shape in the checkpoint; `transpose` marks a
    torch Linear weight (out, in) stored as a Flax kernel (in, out); otherwise a reshape suffices.
    Buffers that m2jax can recompute carry a `default` (a function returning the value) and may be
    absent from a checkpoint.
    """

    variable: nnx.Variable
    torch_shape: tuple[int, ...]
    transpose: bool = False
    default: Callable[[], np.ndarray] | None = None

    @property
    def optional(self) -> bool:
        return self.default is not None

    def to_torch(self) -> np.ndarray:
        a = np.asarray(self.variable[...], dtype=np.float32)
        return np.ascontiguousarray(a.T if self.transpose else a.reshape(self.torch_shape))

    def from_torch(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return a.T if self.transpose else a.reshape(self.variable.shape)


def _linear(layout: dict, prefix: str, lin: nnx.Linear) -> None:
    d_in, d_out = lin.kernel.shape
    layout[f"{prefix}.weight"] = Slot(lin.kernel, (d_out, d_in), transpose=True)
    if lin.bias is not None:
        layout[f"{prefix}.bias"] = Slot(lin.bias, (d_out,))


def _same(layout: dict, key: str, var: nnx.Variable) -> None:
    layout[key] = Slot(var, tuple(var.shape))


def _layer_norm(layout: dict, prefix: str, ln: nnx.LayerNorm) -> None:
    _same(layout, f"{prefix}.weight", ln.scale)
    _same(layout, f"{prefix}.bias", ln.bias)


def _block_diag(layout: dict, prefix: str, bd: BlockDiagLinear, monarch: bool) -> None:
    nb, q, p = bd.weight.shape
    # A dense GLU (use_monarch_mlp=False) is an nn.Linear in the reference: weight (out, in).
    shape = (nb, q, p) if monarch else (q, p)
    layout[f"{prefix}.weight"] = Slot(bd.weight, shape)
    if bd.bias is not None:
        _same(layout, f"{prefix}.bias", bd.bias)


def _filter_set(layout: dict, prefix: str, f: HyenaFilterSet) -> None:
    L, E = f.z.shape
    H = f.deltas.shape[0]
    order = f.freq.shape[0]
    layout[f"{prefix}.bias"] = Slot(f.bias_D, (H,))
    layout[f"{prefix}.pos_emb.z"] = Slot(f.z, (1, L, E))
    layout[f"{prefix}.pos_emb.t"] = Slot(f.t, (1, L, 1), default=lambda: time_grid(L))
    layout[f"{prefix}.modulation.deltas"] = Slot(
        f.deltas, (1, 1, H), default=lambda: decay_rates(H)
    )
    for name, mlp in (("implicit_filter", f.mlp_fwd), ("implicit_filter_rev", f.mlp_rev)):
        if mlp is None:
            continue
        # torch Sequential indices: Linear at 0, 2, 4, 6 and the shared Sin (freq) at 1, 3, 5.
        for i, lin in enumerate(mlp):
            _linear(layout, f"{prefix}.{name}.{2 * i}", lin)
            if i < len(mlp) - 1:
                layout[f"{prefix}.{name}.{2 * i + 1}.freq"] = Slot(f.freq, (1, order))


def _sequence_mixer(layout: dict, prefix: str, mix: SequenceMixer) -> None:
    C = mix.short_conv_weight.shape[0]
    _linear(layout, f"{prefix}.in_linear", mix.in_linear)
    _linear(layout, f"{prefix}.out_linear", mix.out_linear)
    layout[f"{prefix}.short_filter.weight"] = Slot(mix.short_conv_weight, (C, 1, 3))
    _same(layout, f"{prefix}.short_filter.bias", mix.short_conv_bias)
    if mix.layernorm is not None:
        _layer_norm(layout, f"{prefix}.layernorm", mix.layernorm)
    _filter_set(layout, f"{prefix}.filter_fn", mix.filter_fn)
    if mix.filter_fn2 is not None:
        _filter_set(layout, f"{prefix}.filter_fn2", mix.filter_fn2)


def _bert(layout: dict, bert: M2BertModel) -> None:
    emb = bert.embeddings
    _same(layout, "bert.embeddings.word_embeddings.weight", emb.word_embeddings.embedding)
    if emb.position_embeddings is not None:
        _same(
            layout, "bert.embeddings.position_embeddings.weight", emb.position_embeddings.embedding
        )
    _same(
        layout, "bert.embeddings.token_type_embeddings.weight", emb.token_type_embeddings.embedding
    )
    _layer_norm(layout, "bert.embeddings.LayerNorm", emb.LayerNorm)
    monarch = bert.cfg.use_monarch_mlp
    for i, layer in enumerate(bert.layers):
        p = f"bert.encoder.layer.{i}"
        _sequence_mixer(layout, f"{p}.attention", layer.attention)
        _block_diag(layout, f"{p}.mlp.gated_layers", layer.mlp.gated_layers, monarch)
        _block_diag(layout, f"{p}.mlp.wo", layer.mlp.wo, monarch)
        _layer_norm(layout, f"{p}.mlp.layernorm", layer.mlp.layernorm)
    if bert.pooler is not None:
        _linear(layout, "bert.pooler.dense", bert.pooler)


def torch_layout(model: nnx.Module) -> dict[str, Slot]:
    """Every reference state-dict key (buffers included, `position_ids` excepted) -> its Slot."""
    layout: dict[str, Slot] = {}
    _bert(layout, model.bert)
    if isinstance(model, M2BertForMaskedLM):
        head = model.cls
        _linear(layout, "cls.predictions.transform.dense", head.dense)
        _layer_norm(layout, "cls.predictions.transform.LayerNorm", head.LayerNorm)
        # Tied to the word embeddings; the reference saves it under both names.
        _same(
            layout,
            "cls.predictions.decoder.weight",
            model.bert.embeddings.word_embeddings.embedding,
        )
        _same(layout, "cls.predictions.decoder.bias", head.decoder_bias)
    elif isinstance(model, M2BertForSequenceClassification):
        _linear(layout, "classifier", model.classifier)
    elif not isinstance(model, M2BertForTextEncoding):  # encoder + pooler: nothing more
        raise TypeError(f"no PyTorch layout for {type(model).__name__}")
    return layout


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The reference's state dict for `model`: float32 arrays (int64 position_ids), torch shapes."""
    out = {k: slot.to_torch() for k, slot in torch_layout(model).items()}
    if model.config.use_positional_encodings:
        out[POSITION_IDS_KEY] = np.arange(model.config.max_position_embeddings, dtype=np.int64)[
            None
        ]
    return out


class StateDictMismatch(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists every offender."""


def import_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a reference state dict into `model` in place, after checking it completely.

    Raises StateDictMismatch naming every missing, unexpected or mis-shaped key (with shapes), and
    every pair of keys that m2jax ties (shared `freq`, tied decoder) holding different values.
    Nothing is written unless the whole state dict fits. `model` may be abstract (from
    `nnx.eval_shape`): every variable is then given its value here.
    """
    layout = torch_layout(model)
    sd = dict(state_dict)
    problems = []
    position_ids = sd.pop(POSITION_IDS_KEY, None)
    if position_ids is not None and model.config.use_positional_encodings:
        expected = np.arange(model.config.max_position_embeddings)[None]
        if np.shape(position_ids) != expected.shape or not np.array_equal(position_ids, expected):
            problems.append(
                f"{POSITION_IDS_KEY}: expected arange({expected.shape[1]}) of shape "
                f"{expected.shape}, got shape {np.shape(position_ids)}"
            )
    missing = [k for k, s in layout.items() if k not in sd and not s.optional]
    unexpected = sorted(set(sd) - set(layout))
    misshaped = [
        f"{k}: checkpoint {tuple(np.shape(sd[k]))}, model expects {s.torch_shape}"
        for k, s in layout.items()
        if k in sd and tuple(np.shape(sd[k])) != s.torch_shape
    ]
    if missing:
        problems.append(
            "missing keys: " + ", ".join(f"{k} {layout[k].torch_shape}" for k in missing)
        )
    if unexpected:
        problems.append(
            "unexpected keys: " + ", ".join(f"{k} {tuple(np.shape(sd[k]))}" for k in unexpected)
        )
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    if problems:
        raise StateDictMismatch(
            f"state dict does not fit {type(model).__name__} ({len(layout)} keys expected): "
            + " | ".join(problems)
        )

    values: dict[int, tuple[str, np.ndarray, nnx.Variable]] = {}
    for key, slot in layout.items():
        value = slot.from_torch(sd[key] if key in sd else slot.default())
        seen = values.get(id(slot.variable))
        if seen is not None and not np.array_equal(seen[1], value):
            problems.append(f"{seen[0]} and {key} must hold the same tensor (m2jax ties them)")
        values.setdefault(id(slot.variable), (key, value, slot.variable))
    if problems:
        raise StateDictMismatch("state dict is inconsistent: " + "; ".join(problems))
    for _, value, var in values.values():
        var.set_value(jnp.asarray(value, dtype=var.dtype))
