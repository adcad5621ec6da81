"""The compiled call computes the long-convolution filters once per weights and length
(`m2jax.filter_cache`), and never serves stale ones."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m2jax
from kernels.long_conv_block import FilterSpectrum
from m2jax import filter_cache

CFG = m2jax.get_model_config("tiny")


def _ids(B=2, L=16, seed=0):
    return jnp.asarray(
        np.random.default_rng(seed).integers(1, CFG.vocab_size, (B, L)), jnp.int32
    )


def _traced(model, ids):
    """The forward traced inside a caller's jit: filters computed in the forward, no memo."""
    zeros, ones = jnp.zeros_like(ids), jnp.ones_like(ids)
    return jax.jit(lambda m, i: m.apply(i, zeros, ones))(model, ids)


@pytest.fixture
def computations(monkeypatch):
    """Counts the filter computations the memo runs."""
    calls = []
    compute = filter_cache._compute

    def counting(fn, module, seq_len, platform):
        calls.append(seq_len)
        return compute(fn, module, seq_len, platform)

    monkeypatch.setattr(filter_cache, "_compute", counting)
    return calls


def test_filters_are_computed_once_and_recomputed_when_a_filter_weight_changes(computations):
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    ids = _ids()
    first = model(ids)
    second = model(_ids(seed=1))
    assert computations == [16]  # the second call reused the first one's filters
    # On CPU the memo holds what the XLA spectrum paths take: the filters' spectra.
    kept = filter_cache._entries[model.bert].filters
    assert all(isinstance(f, FilterSpectrum) for m in kept for f in m)
    np.testing.assert_array_equal(first, model(ids))
    np.testing.assert_allclose(first, _traced(model, ids), rtol=1e-6, atol=1e-6)
    assert not np.allclose(first, second)

    z = model.bert.layers[1].attention.filter_fn.z  # a filter weight, changed in place
    z[...] = z[...] + 0.5
    changed = model(ids)
    assert computations == [16, 16]
    assert not np.allclose(changed, first)
    np.testing.assert_allclose(changed, _traced(model, ids), rtol=1e-6, atol=1e-6)

    params = model.params  # and through nnx.update, as an optimizer step does
    bias_D = params["bert"]["layers"][0]["attention"]["filter_fn2"]["bias_D"]
    bias_D[...] = bias_D[...] * 2.0
    nnx.update(model, params)
    updated = model(ids)
    assert computations == [16, 16, 16]
    np.testing.assert_allclose(updated, _traced(model, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:input length")
def test_a_new_length_recomputes_and_every_model_keeps_its_own(computations):
    a = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    b = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(1))
    short, long = _ids(L=8), _ids(L=16)
    a(short), b(short), a(long)
    assert computations == [8, 8, 16]
    np.testing.assert_allclose(a(short), _traced(a, short), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b(short), _traced(b, short), rtol=1e-6, atol=1e-6)
    assert computations == [8, 8, 16, 8]  # a keeps one length: back to 8 recomputes; b reuses


def test_over_the_memory_limit_nothing_is_kept(computations, monkeypatch):
    model = m2jax.M2BertForSequenceClassification(CFG, rngs=nnx.Rngs(0))
    ids = _ids()
    monkeypatch.setattr(filter_cache, "MAX_BYTES", filter_cache.filter_bytes(CFG, 16) - 1)
    out = model(ids)
    assert computations == [] and model.bert not in filter_cache._entries
    np.testing.assert_allclose(out, _traced(model, ids), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(filter_cache, "MAX_BYTES", filter_cache.filter_bytes(CFG, 16))
    # Kept, the call runs token-major (`M2BertModel.encode`): same numbers up to rounding.
    np.testing.assert_allclose(model(ids), out, rtol=1e-6, atol=1e-6)
    assert computations == [16] and model.bert in filter_cache._entries


def test_the_size_estimate_is_the_larger_form_of_the_filters():
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    for cfg in (CFG, CFG.replace(residual_long_conv=False), CFG.replace(bidirectional=False)):
        model = m2jax.model.M2BertModel(cfg, add_pooler=False, rngs=nnx.Rngs(0))
        as_they_are = nbytes(model.filters(12))
        spectra = nbytes(model.reusable_filters(12, "cpu"))
        assert as_they_are != spectra  # the FFT path's form is what CPU keeps
        assert filter_cache.filter_bytes(cfg, 12) == max(as_they_are, spectra)
    base = m2jax.get_model_config("m2-bert-base-80m")
    assert filter_cache.filter_bytes(base, 2048) < filter_cache.MAX_BYTES  # the benchmark shapes


def test_the_memo_goes_with_its_model():
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    model(_ids())
    bert = weakref.ref(model.bert)
    assert bert() in filter_cache._entries
    del model
    gc.collect()
    assert bert() is None  # the memo does not keep the model (or its memory) alive


def test_filters_in_numpy_arrays_are_not_memoised(computations):
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    freq = model.bert.layers[0].attention.filter_fn.freq
    freq.set_value(np.array(freq.get_value()))  # mutable in place: identity says nothing
    if not isinstance(freq.get_value(), np.ndarray):
        pytest.skip("this flax converts variable values to jax arrays")
    ids = _ids()
    out = model(ids)
    assert computations == []
    np.testing.assert_allclose(out, _traced(model, ids), rtol=1e-6, atol=1e-6)


def test_gradients_through_the_call_reach_the_filters():
    """Under the caller's grad the filters are computed in the traced forward (no memo)."""
    model = m2jax.M2BertForMaskedLM(CFG, rngs=nnx.Rngs(0))
    ids = _ids()
    model(ids)  # a memo exists for this model and length
    grads = nnx.grad(lambda m: jnp.sum(m(ids) ** 2))(model)
    filter_grads = grads["bert"]["layers"][0]["attention"]["filter_fn"]
    assert float(jnp.linalg.norm(filter_grads["z"][...])) > 0
    assert float(jnp.linalg.norm(filter_grads["mlp_fwd"][0]["kernel"][...])) > 0


def test_the_lowering_platform_of_device_and_host_arrays():
    assert m2jax.model.lowering_platform(jnp.zeros(3)) == jax.devices()[0].platform == "cpu"
    assert m2jax.model.lowering_platform(np.zeros(3)) == "cpu"  # host arrays: default device
