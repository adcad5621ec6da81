"""Parameter sharding (m2jax/sharding.py): logical axes declared where each parameter is created,
axis rules as data, the divisibility rule, and errors for parameters without axes.

The mesh checks run once, in a subprocess with 8 fake CPU devices
(tests/drivers/sharding_driver.py).
"""

import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import m2jax
from m2jax import sharding as shd
from m2jax.train.checkpointing import Checkpointer
from m2jax.filters import FilterConstant

DRIVER = os.path.join(os.path.dirname(__file__), "drivers", "sharding_driver.py")
MODELS = (
    m2jax.M2BertForMaskedLM,
    m2jax.M2BertForSequenceClassification,
    m2jax.M2BertForTextEncoding,
)
VARIANTS = {
    "default": {},
    "additions": {"hyena_training_additions": True},
    "switched_off": {
        "bidirectional": False,
        "residual_long_conv": False,
        "use_monarch_mlp": False,
        "use_positional_encodings": False,
    },
}
RULE_NAMES = {logical for logical, _ in shd.DEFAULT_AXIS_RULES}

# What the path-regex table (PARAM_LOGICAL_AXES, deleted) gave every parameter and constant of the
# 80M models on a (data 2, fsdp 2, tensor 2) mesh, recorded from that code before it was removed.
# Every layer `*` is the same.
OLD_REGEX_SPECS_80M = {
    "/bert/embeddings/LayerNorm/bias": ("fsdp",),
    "/bert/embeddings/LayerNorm/scale": ("fsdp",),
    "/bert/embeddings/position_embeddings/embedding": (None, "fsdp"),
    "/bert/embeddings/token_type_embeddings/embedding": (None, "fsdp"),
    "/bert/embeddings/word_embeddings/embedding": ("tensor", "fsdp"),
    "/bert/layers/*/attention/filter_fn/bias_D": ("fsdp",),
    "/bert/layers/*/attention/filter_fn/deltas": ("fsdp",),
    "/bert/layers/*/attention/filter_fn/freq": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/0/bias": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/0/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/1/bias": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/1/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/2/bias": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/2/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn/mlp_fwd/3/kernel": (None, "fsdp"),
    "/bert/layers/*/attention/filter_fn/mlp_rev/0/bias": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_rev/0/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn/mlp_rev/1/bias": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_rev/1/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn/mlp_rev/2/bias": (None,),
    "/bert/layers/*/attention/filter_fn/mlp_rev/2/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn/mlp_rev/3/kernel": (None, "fsdp"),
    "/bert/layers/*/attention/filter_fn/t": (None,),
    "/bert/layers/*/attention/filter_fn/z": (None, None),
    "/bert/layers/*/attention/filter_fn2/bias_D": ("fsdp",),
    "/bert/layers/*/attention/filter_fn2/deltas": ("fsdp",),
    "/bert/layers/*/attention/filter_fn2/freq": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/0/bias": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/0/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/1/bias": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/1/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/2/bias": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/2/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn2/mlp_fwd/3/kernel": (None, "fsdp"),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/0/bias": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/0/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/1/bias": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/1/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/2/bias": (None,),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/2/kernel": (None, None),
    "/bert/layers/*/attention/filter_fn2/mlp_rev/3/kernel": (None, "fsdp"),
    "/bert/layers/*/attention/filter_fn2/t": (None,),
    "/bert/layers/*/attention/filter_fn2/z": (None, None),
    "/bert/layers/*/attention/in_linear/bias": ("tensor",),
    "/bert/layers/*/attention/in_linear/kernel": ("fsdp", "tensor"),
    "/bert/layers/*/attention/layernorm/bias": ("fsdp",),
    "/bert/layers/*/attention/layernorm/scale": ("fsdp",),
    "/bert/layers/*/attention/out_linear/bias": (None,),
    "/bert/layers/*/attention/out_linear/kernel": ("tensor", "fsdp"),
    "/bert/layers/*/attention/short_conv_bias": ("tensor",),
    "/bert/layers/*/attention/short_conv_weight": ("tensor", None),
    "/bert/layers/*/mlp/gated_layers/weight": (None, "tensor", "fsdp"),
    "/bert/layers/*/mlp/layernorm/bias": ("fsdp",),
    "/bert/layers/*/mlp/layernorm/scale": ("fsdp",),
    "/bert/layers/*/mlp/wo/bias": (None,),
    "/bert/layers/*/mlp/wo/weight": (None, "fsdp", "tensor"),
    "/bert/pooler/bias": (None,),
    "/bert/pooler/kernel": ("fsdp", "tensor"),
    "/classifier/bias": (None,),
    "/classifier/kernel": ("fsdp", None),
    "/cls/LayerNorm/bias": ("fsdp",),
    "/cls/LayerNorm/scale": ("fsdp",),
    "/cls/decoder_bias": ("tensor",),
    "/cls/dense/bias": (None,),
    "/cls/dense/kernel": ("fsdp", "tensor"),
}


def _mesh(data=2, fsdp=2, tensor=2):
    return AbstractMesh((data, fsdp, tensor), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _variables(tree) -> dict:
    """{'/bert/.../kernel': Variable} of an nnx.State (or any tree of Variables)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {"/" + "/".join(str(getattr(k, "key", k)) for k in p): v for p, v in leaves}


def _axes(var):
    return var.get_metadata(shd.AXES_METADATA, None)


@pytest.fixture(scope="module")
def on_eight_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, DRIVER], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tupled(spec):
    return tuple(tuple(a) if isinstance(a, list) else a for a in spec)


def test_default_rules_on_a_2x2x2_mesh_give_what_the_old_path_regexes_gave(on_eight_devices):
    seen = set()
    for case in ("mlm_additions", "classification", "text_encoding", "mlm_minimal"):
        for name, spec in on_eight_devices["specs"][case].items():
            wild = re.sub(r"/layers/\d+/", "/layers/*/", name)
            assert _tupled(spec) == OLD_REGEX_SPECS_80M[wild], (case, name)
            seen.add(wild)
    assert seen == set(OLD_REGEX_SPECS_80M)  # every entry of the old table checked
    assert len(on_eight_devices["specs"]["mlm_additions"]) == 622  # 12 layers, constants too


def test_custom_rules_change_the_specs_and_indivisible_dimensions_stay_whole(on_eight_devices):
    default = on_eight_devices["specs"]["classification"]
    custom = {
        k: _tupled(v) for k, v in on_eight_devices["specs"]["classification_custom_rules"].items()
    }
    layer = "/bert/layers/0"
    assert custom[f"{layer}/attention/in_linear/kernel"] == ("tensor", "fsdp")
    assert custom[f"{layer}/mlp/gated_layers/weight"] == ("data", "fsdp", "tensor")
    assert custom["/bert/embeddings/position_embeddings/embedding"] == ("data", "tensor")
    # 30522 rows do not divide by data x tensor = 4; "embed" may then take "tensor".
    assert custom["/bert/embeddings/word_embeddings/embedding"] == (None, "tensor")
    # 3 classes do not divide by tensor = 2.
    assert custom["/classifier/kernel"] == ("tensor", None)
    assert custom[f"{layer}/attention/filter_fn/z"] == ("data", None)
    assert _tupled(default["/classifier/kernel"]) == ("fsdp", None)
    assert _tupled(default[f"{layer}/attention/filter_fn/z"]) == (None, None)


def test_placed_arrays_are_split_as_their_specs_say(on_eight_devices):
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    split = 0
    for name, (shape, shard_shape, spec) in on_eight_devices["placed"].items():
        expected = []
        for dim, axes in zip(shape, spec + [None] * (len(shape) - len(spec))):
            axes = [] if axes is None else [axes] if isinstance(axes, str) else axes
            expected.append(dim // int(np.prod([sizes[a] for a in axes])))
        assert shard_shape == expected, name
        split += shard_shape != shape
    assert split >= 40  # of 108 arrays; the implicit-filter weights are replicated
    # vocab over data x tensor: 128 rows in 4 pieces.
    assert on_eight_devices["placed"]["/bert/embeddings/word_embeddings/embedding"][1] == [32, 32]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_every_parameter_and_constant_carries_logical_axes_of_its_rank(model_cls, variant):
    cfg = m2jax.get_model_config("tiny", **VARIANTS[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # e.g. the old `sharding=` name
        # Abstract: it runs every __init__ like a real build, without compiling initialisers; a
        # concrete build is checked in the next test. No mesh is needed either way.
        model = m2jax.abstract_model(model_cls, cfg)
    variables = _variables(nnx.state(model))
    assert len(variables) == len(jax.tree_util.tree_leaves(nnx.state(model)))
    for name, var in variables.items():
        axes = _axes(var)
        assert axes is not None, name
        assert len(axes) == len(var.get_value().shape), name
        assert set(axes) <= RULE_NAMES | {None}, name
        assert var.get_metadata("eager_sharding") is False, name
    constants = [k for k, v in variables.items() if isinstance(v, FilterConstant)]
    assert constants and all(_axes(variables[k]) for k in constants)
    # The default rules place it on one device without complaint.
    shd.state_shardings(nnx.state(model), shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))


def _signature(tree) -> dict:
    return {k: (type(v).__name__, _axes(v)) for k, v in _variables(tree).items()}


def test_split_merged_and_restored_states_keep_axes_and_types(tmp_path):
    cfg = m2jax.get_model_config("tiny")
    abstract = m2jax.abstract_model(m2jax.M2BertForSequenceClassification, cfg)
    want = _signature(nnx.state(abstract))
    graphdef, params, consts = nnx.split(abstract, nnx.Param, ...)
    # Host arrays stand in for initialised weights (no initialiser to compile).
    params, consts = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), (params, consts))
    assert _signature(params) | _signature(consts) == want
    assert set(_signature(consts).values()) == {
        ("FilterConstant", ("length",)),
        ("FilterConstant", ("embed",)),
    }
    assert _signature(nnx.state(nnx.merge(graphdef, params, consts))) == want

    # A checkpoint restored into an abstract target, as the trainer does.
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    state = jax.device_put(params, shd.state_shardings(params, mesh))
    import grain
    from etils import epath

    def batches():
        return iter(grain.MapDataset.range(4).to_iter_dataset())

    ckpt = Checkpointer(epath.Path(tmp_path), keep=1, async_save=False)
    ckpt.save(1, {"params": state}, batches())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    step, restored = ckpt.restore_latest({"params": target}, batches())
    ckpt.close()
    assert step == 1
    assert _signature(restored["params"]) == _signature(params)
    assert jax.tree.leaves(shd.state_shardings(restored["params"], mesh)) == jax.tree.leaves(
        shd.state_shardings(params, mesh)
    )
    np.testing.assert_array_equal(restored["params"]["classifier"]["kernel"].get_value(), 0.5)


def test_a_parameter_without_logical_axes_is_an_error_naming_it():
    model = m2jax.abstract_model(m2jax.M2BertForMaskedLM, m2jax.get_model_config("tiny"))
    mesh = _mesh()
    model.cls.extra_scale = nnx.Param(jnp.ones((4,)))
    with pytest.raises(
        ValueError, match=r"/cls/extra_scale \(Param, shape \(4,\)\) has no logical axes"
    ):
        shd.state_shardings(nnx.state(model, nnx.Param), mesh)
    with pytest.raises(ValueError, match="/w .*has no logical axes"):
        shd.state_shardings({"w": np.zeros(3)}, mesh)
    model.cls.extra_scale = nnx.Param(jnp.ones((4, 2)), **shd.logical_axes("embed"))
    with pytest.raises(ValueError, match=r"/cls/extra_scale: logical axes \('embed',\) do not fit"):
        shd.state_shardings(nnx.state(model), mesh)
    model.cls.extra_scale = nnx.Param(jnp.ones((4,)), **shd.logical_axes("embd"))
    with pytest.raises(
        ValueError, match="/cls/extra_scale: no axis rule for its logical axis 'embd'"
    ):
        shd.state_shardings(nnx.state(model), mesh)


def test_partition_specs_follow_the_rules_and_replicate_what_does_not_divide():
    mesh = _mesh(1, 2, 4)
    spec = shd.partition_spec
    assert spec(("embed", "mlp"), (768, 2304), mesh) == P("fsdp", "tensor")
    assert spec(("vocab", "embed"), (30522, 768), mesh) == P(None, "fsdp")  # 30522 % 4 != 0
    assert spec(("vocab", "embed"), (30528, 768), mesh) == P("tensor", "fsdp")
    assert spec((None, "embed"), (2, 768), mesh) == P(None, "fsdp")
    # Rules as a mapping (a config dict) or pairs; several mesh axes; one mesh axis per array.
    rules = {"vocab": ("fsdp", "tensor"), "embed": "tensor"}
    assert spec(("vocab", "embed"), (30528, 768), mesh, rules) == P(("fsdp", "tensor"), None)
    assert spec(("vocab", "embed"), (30522, 768), mesh, rules) == P(None, "tensor")
    assert spec(("vocab",), (8,), mesh, list(rules.items())) == P(("fsdp", "tensor"))
    # A recipe's config holds them as a ConfigDict (None: replicated).
    configured = ml_collections.ConfigDict({**dict(shd.DEFAULT_AXIS_RULES), "embed": "tensor"})
    assert spec(("embed", "mlp"), (768, 2304), mesh, configured) == P("tensor", None)
    with pytest.raises(ValueError, match="name the logical axis 'embed' twice"):
        spec(("embed",), (8,), mesh, [("embed", "fsdp"), ("embed", None)])
    with pytest.raises(ValueError, match=r"mesh axes \['model'\] that the mesh"):
        spec(("embed",), (8,), mesh, {"embed": "model"})


def test_flax_reads_the_same_axes_under_the_same_rules():
    """The axes are flax's own `out_sharding` metadata: `nnx.get_partition_spec` under
    `nnx.logical_axis_rules` agrees wherever every mesh axis divides its dimension."""
    cfg = m2jax.get_model_config("m2-bert-base-80m", num_hidden_layers=1, vocab_size=30528)
    state = nnx.state(m2jax.abstract_model(m2jax.M2BertForSequenceClassification, cfg))
    with nnx.logical_axis_rules(shd.DEFAULT_AXIS_RULES):
        theirs = jax.tree.leaves(nnx.get_partition_spec(state))
    ours = [s.spec for s in jax.tree.leaves(shd.state_shardings(state, _mesh()))]
    assert len(ours) == len(theirs) == 58 and ours == theirs


def test_the_recipes_axis_rules_are_the_library_defaults_and_decide_the_train_state():
    """`config.axis_rules` (plain data in configs/) is what the training jobs shard by:
    `m2jax.train.state.param_shardings` is the one place, and other rules change the layout."""
    from configs import common, glue, pretrain
    from m2jax.train.errors import ConfigError
    from m2jax.train.state import param_shardings

    assert tuple(map(tuple, common.AXIS_RULES)) == shd.DEFAULT_AXIS_RULES
    for c in (pretrain.get_config("smoke"), glue.get_config("smoke")):
        assert tuple(map(tuple, c.axis_rules)) == shd.DEFAULT_AXIS_RULES
    params = nnx.state(
        m2jax.abstract_model(m2jax.M2BertForMaskedLM, m2jax.get_model_config("tiny")), nnx.Param
    )
    mesh = _mesh(1, 2, 4)
    kernel = lambda s: s["bert"]["layers"][0]["attention"]["in_linear"]["kernel"].get_value()
    assert kernel(param_shardings(params, mesh, None)).spec == kernel(
        shd.state_shardings(params, mesh)
    ).spec
    swapped = [(k, {"fsdp": "tensor", "tensor": "fsdp"}.get(v, v)) for k, v in common.AXIS_RULES]
    default_spec = kernel(param_shardings(params, mesh, common.AXIS_RULES)).spec
    swapped_spec = kernel(param_shardings(params, mesh, swapped)).spec
    assert swapped_spec != default_spec
    assert swapped_spec == P(*[{"fsdp": "tensor", "tensor": "fsdp"}.get(a, a) for a in default_spec])
    with pytest.raises(ConfigError, match="config.axis_rules: .*no axis rule for its logical axis"):
        param_shardings(params, mesh, [("embed", "fsdp")])
