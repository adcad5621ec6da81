"""The assembled M2-BERT models: shapes, dtypes, heads, pooling, input checks, init options."""

import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m2jax

CFG = m2jax.get_model_config("tiny")


def _ids(B=2, L=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (B, L)).astype(np.int32)
    types = np.zeros((B, L), np.int32)
    types[:, L // 2:] = 1
    return jnp.asarray(ids), jnp.asarray(types)


@pytest.fixture(scope="module")
def mlm():
    return m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))


def test_mlm_logits_shape_dtype_and_tied_decoder(mlm):
    ids, types = _ids()
    logits = mlm(ids, types)
    assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
    # Tied decoder: logits are the head's features against the word-embedding table.
    h = mlm.bert(ids, types)
    t = jax.nn.gelu(mlm.cls.dense(h), approximate=False)
    t = mlm.cls.LayerNorm(t)
    expected = t @ mlm.bert.embeddings.word_embeddings.embedding[...].T + mlm.cls.decoder_bias[...]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_params_property_lists_trainable_arrays_only(mlm):
    assert m2jax.count_params(mlm) == sum(x.size for x in jax.tree_util.tree_leaves(mlm.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(mlm.params))


def test_default_token_types_are_zero(mlm):
    ids, _ = _ids()
    np.testing.assert_array_equal(mlm(ids), mlm(ids, jnp.zeros_like(ids)))
    assert not np.allclose(mlm(ids), mlm(ids, jnp.ones_like(ids)))


def test_attention_mask_is_ignored_like_the_reference(mlm):
    ids, types = _ids()
    mask = jnp.ones_like(ids).at[:, 12:].set(0)
    np.testing.assert_array_equal(mlm(ids, types, mask), mlm(ids, types))


def test_pad_row_of_word_embeddings_starts_at_zero(mlm):
    assert not np.any(np.asarray(mlm.bert.embeddings.word_embeddings.embedding[...][0]))


def test_input_checks():
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    ids, _ = _ids(L=16)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids.at[0, 0].set(CFG.vocab_size))
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        model(ids, jnp.full_like(ids, 2))
    with pytest.raises(ValueError, match="batch, length"):
        model(ids[0])
    with pytest.warns(UserWarning, match="padded to the full length"):
        model(ids[:, :8])


def test_full_length_input_does_not_warn(mlm):
    ids, _ = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlm(ids)


def test_dropout_only_with_rng_and_reproducible(mlm):
    ids, types = _ids()
    base = mlm(ids, types)
    a = mlm(ids, types, dropout_rng=jax.random.key(1))
    b = mlm(ids, types, dropout_rng=jax.random.key(1))
    c = mlm(ids, types, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, base) and not np.allclose(a, c)


def test_bf16_compute_is_close_to_float32_and_keeps_float32_params():
    ids, types = _ids()
    f32 = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    bf16 = m2jax.M2BertForMaskedLM(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf16.params))
    a, b = f32(ids, types), bf16(ids, types)
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 2e-2


def test_jit_matches_eager(mlm):
    ids, types = _ids()

    @nnx.jit
    def forward(model, ids, types):
        return model(ids, types)

    np.testing.assert_allclose(forward(mlm, ids, types), mlm(ids, types), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool_all", [False, True])
def test_classification_pooling(pool_all):
    cfg = CFG.replace(pool_all=pool_all, num_labels=3)
    model = m2jax.M2BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    ids, types = _ids()
    mask = jnp.ones_like(ids).at[1, 10:].set(0)
    logits = model(ids, types, mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    h = np.asarray(model.bert(ids, types))
    m = np.asarray(mask, np.float32)[..., None]
    p = (h * m).sum(1) / m.sum(1) if pool_all else h[:, 0]
    pooled = np.tanh(p @ np.asarray(model.bert.pooler.kernel[...]) + np.asarray(model.bert.pooler.bias[...]))
    np.testing.assert_allclose(model.pooled(ids, types, mask), pooled, rtol=1e-5, atol=1e-5)
    expected = pooled @ np.asarray(model.classifier.kernel[...]) + np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # The mask matters only for mean pooling.
    changed = not np.allclose(model(ids, types, jnp.ones_like(ids)), logits)
    assert changed == pool_all


def test_classification_with_raw_cls_token_keeps_an_unused_pooler():
    model = m2jax.M2BertForSequenceClassification(CFG.replace(use_cls_token=True), rngs=nnx.Rngs(0))
    assert model.bert.pooler is not None  # the reference builds and saves it too
    ids, types = _ids()
    np.testing.assert_allclose(model.pooled(ids, types), model.bert(ids, types)[:, 0])


def test_regression_head_has_one_output():
    model = m2jax.M2BertForSequenceClassification(CFG.replace(num_labels=1), rngs=nnx.Rngs(0))
    assert model(*_ids()).shape == (2, 1)


def test_same_init_across_layers_reproduces_the_deepcopy_quirk():
    quirk = m2jax.M2BertForMaskedLM(CFG.replace(same_init_across_layers=True), rngs=nnx.Rngs(0))
    indep = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    for model, equal in ((quirk, True), (indep, False)):
        l0, l1 = model.bert.layers[0], model.bert.layers[1]
        for get in (lambda l: l.mlp.gated_layers.weight, lambda l: l.attention.short_conv_weight,
                    lambda l: l.attention.filter_fn.bias_D):
            assert np.array_equal(get(l0)[...], get(l1)[...]) == equal
        # Linear layers are re-initialised per layer by the HF init in both cases.
        assert not np.array_equal(l0.attention.in_linear.kernel[...], l1.attention.in_linear.kernel[...])


# ---------------------------------------------------------------- the compiled call


def _compiles():
    return m2jax.model._compiled_call._cache_size()


def test_call_compiles_once_per_input_shape_and_equals_the_traced_path(mlm):
    ids, types = _ids(B=5)  # a batch size no other test here uses
    before = _compiles()
    a = mlm(ids, types)
    assert _compiles() == before + 1
    b = mlm(np.asarray(ids), np.asarray(types))  # NumPy inputs: same shapes, same compile
    c = mlm(_ids(B=5, seed=1)[0], types)
    assert _compiles() == before + 1
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    mlm(*_ids(B=6))  # a new batch size compiles once more
    assert _compiles() == before + 2
    # The same numbers as the model traced inside a caller's jit (which adds no compile here).
    graphdef, state = nnx.split(mlm)
    traced = jax.jit(lambda st, i, t: nnx.merge(graphdef, st)(i, t))(state, ids, types)
    np.testing.assert_allclose(a, traced, rtol=1e-6, atol=1e-6)
    assert _compiles() == before + 2


def test_one_sequence_runs_channels_first_and_gives_the_batched_numbers(mlm):
    """B = 1 takes the channels-first encoder path, B > 1 the token-major one: same rows."""
    ids, types = _ids(B=2)
    batched = mlm(ids, types)
    for row in range(2):
        single = mlm(ids[row:row + 1], types[row:row + 1])
        np.testing.assert_allclose(single[0], batched[row], rtol=2e-5, atol=2e-5)


def _sequence_mixer_layouts(run):
    """The (channels_first, seq_len, input shape) of every SequenceMixer call while `run()`
    traces."""
    seen = []
    original = m2jax.mixers.SequenceMixer.__call__

    def spy(self, u, **kwargs):
        seen.append((kwargs.get("channels_first"), kwargs.get("seq_len"), u.shape))
        return original(self, u, **kwargs)

    with mock.patch.object(m2jax.mixers.SequenceMixer, "__call__", spy):
        run()
    return seen


def test_the_compiled_call_runs_token_major_and_training_sequence_major(mlm):
    """With the memoised spectra (the compiled call) the encoder runs token-major,
    (1, H, B * L); traced with its filters computed inside (training), sequence-major."""
    B, L, H = 7, 16, CFG.hidden_size  # a batch size no other test compiles
    ids, types = _ids(B=B, L=L)
    layouts = _sequence_mixer_layouts(lambda: mlm(ids, types))
    assert layouts == [(True, L, (1, H, B * L))] * CFG.num_hidden_layers
    graphdef, state = nnx.split(mlm)
    train_forward = jax.jit(
        lambda st: nnx.merge(graphdef, st)(ids, types, dropout_rng=jax.random.key(0)))
    layouts = _sequence_mixer_layouts(lambda: train_forward(state))
    assert layouts == [(False, None, (B, L, H))] * CFG.num_hidden_layers


@pytest.mark.parametrize("L,ffts", [(128, False), (144, True)])
def test_the_compiled_call_on_cpu_runs_dense_dft_matmuls_up_to_l128(L, ffts):
    """The compiled call's convolutions: at L <= 128 the dense DFT (two matmuls each, no FFT op
    in the lowered module), beyond it XLA's FFTs; the train-time trace keeps the FFTs."""
    cfg = CFG.replace(max_position_embeddings=L, long_conv_l_max=L)
    model = m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
    ids, types = _ids(B=2, L=L)
    calls = []
    original = m2jax.model._compiled_call

    def spy(*args):
        calls.append(args)
        return original(*args)

    with mock.patch.object(m2jax.model, "_compiled_call", spy):
        model(ids, types)
    (args,) = calls
    assert ("fft" in original.lower(*args).as_text()) == ffts
    graphdef, state = nnx.split(model)
    train_forward = jax.jit(
        lambda st: nnx.merge(graphdef, st)(ids, types, dropout_rng=jax.random.key(0)))
    assert "fft" in train_forward.lower(state).as_text()


def test_checks_run_on_the_host_before_compiling():
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    ids, types = _ids()
    before = _compiles()
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids.at[0, 0].set(-1))
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, types, jnp.ones((2, 15), jnp.int32))
    with pytest.raises(ValueError, match="token_type_ids must be an integer"):
        model(ids, types.astype(jnp.float32))
    assert _compiles() == before


def test_parameter_updates_are_seen_by_the_next_compiled_call():
    model = m2jax.M2BertForSequenceClassification(CFG.replace(num_labels=3), rngs=nnx.Rngs(0))
    ids, types = _ids()
    before = model(ids, types)
    params = model.params
    params["classifier"]["bias"][...] = params["classifier"]["bias"][...] + 1.0
    nnx.update(model, params)
    np.testing.assert_allclose(model(ids, types), before + 1.0, rtol=1e-5, atol=1e-5)


def test_the_call_traces_under_the_callers_grad_and_jit():
    model = m2jax.M2BertForSequenceClassification(CFG.replace(num_labels=3), rngs=nnx.Rngs(0))
    ids, types = _ids()
    before = _compiles()

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.sum(m(ids, types) ** 2))(model)

    g = grads(model)
    assert np.linalg.norm(np.asarray(g["classifier"]["kernel"][...])) > 0
    # Concrete ids with traced parameters: the checks still run, then the call traces in place.
    bad_ids = ids.at[0, 0].set(CFG.vocab_size)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        nnx.jit(lambda m: m(bad_ids))(model)
    assert _compiles() == before


# ---------------------------------------------------------------- one model, every platform

TRITON_CALL = "__gpu$xla.gpu.triton"


def _export_default_forward(platforms):
    cfg = CFG.replace(max_position_embeddings=128, long_conv_l_max=128)
    assert cfg.long_conv_implementation == "auto"  # the default
    model = m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 128)), jnp.int32)
    exported = jax.export.export(
        jax.jit(lambda st, i: nnx.merge(graphdef, st)(i)), platforms=platforms,
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(state, jax.ShapeDtypeStruct(ids.shape, ids.dtype))
    return exported, model, state, ids


def test_default_forward_exported_for_cuda_carries_the_triton_kernel():
    exported, _, _, _ = _export_default_forward(["cuda"])
    # The fused long-conv kernel (its lowering is shared by the layers' identical calls).
    assert TRITON_CALL in exported.mlir_module()


def test_default_forward_exported_for_cpu_and_cuda_runs_here():
    exported, model, state, ids = _export_default_forward(["cpu", "cuda"])
    assert exported.platforms == ("cpu", "cuda") and TRITON_CALL in exported.mlir_module()
    np.testing.assert_allclose(exported.call(state, ids), model(ids), rtol=1e-5, atol=1e-5)
