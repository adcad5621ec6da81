"""benchmarks/matmul_floor.py: the default call's matrix products, found in its trace and timed."""

import json
import sys

import numpy as np
import pytest
from flax import nnx
from train_fixtures import ROOT

sys.path.insert(0, ROOT)
import m2jax  # noqa: E402
from benchmarks import matmul_floor  # noqa: E402


def _model_flops(cfg, tokens: int) -> float:
    """Multiply-adds x 2 of the encoder's and the MLM head's dense and block-diagonal layers."""
    h, i, nb = cfg.hidden_size, cfg.intermediate_size, cfg.monarch_mlp_nblocks
    per_layer = 3 * h * h + h * h + h * 2 * i // nb + i * h // nb  # in, out, GLU up, GLU down
    head = h * h + h * cfg.vocab_size  # transform, decoder
    return 2.0 * tokens * (cfg.num_hidden_layers * per_layer + head)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = m2jax.get_model_config("tiny")
    return m2jax.M2BertForMaskedLM(cfg, rngs=nnx.Rngs(0))


def test_the_products_are_the_layers_and_the_head_and_not_the_long_convolution(
        tiny_model, monkeypatch):
    cfg = tiny_model.config
    ids = np.ones((2, 16), np.int32)
    products = matmul_floor.forward_products(tiny_model, ids)
    assert sum(p["count"] for p in products) == 4 * cfg.num_hidden_layers + 2
    assert sum(p["gflop"] for p in products) * 1e9 == pytest.approx(_model_flops(cfg, 32))
    [decoder] = [p for p in products if cfg.vocab_size in p["rhs_shape"]]
    assert decoder["bmkn"] == [1, 32, cfg.hidden_size, cfg.vocab_size] and decoder["count"] == 1
    for p in products:
        b, m, k, n = p["bmkn"]
        assert np.prod(p["lhs_shape"]) * np.prod(p["rhs_shape"]) == b * m * k * b * k * n
    # On CPU the call's long convolutions are dense DFT matmuls: counting inside the op adds them.
    monkeypatch.setattr(matmul_floor, "LONG_CONV_JIT_NAME", "no such jit")
    with_dft = matmul_floor.forward_products(tiny_model, ids)
    assert sum(p["gflop"] for p in with_dft) > sum(p["gflop"] for p in products)


def test_product_dims_multiply_the_batch_free_and_contracted_axes():
    # "bkpl,kqp->bkql" as the GLU traces it: lhs (k, q, p) weight, rhs (b, k, p, l).
    dn = (((2,), (2,)), ((0,), (1,)))
    assert matmul_floor.product_dims((4, 6, 3), (2, 4, 3, 5), dn) == (4, 6, 3, 10)
    assert matmul_floor.product_dims((7, 3), (3, 5), (((1,), (0,)), ((), ()))) == (1, 7, 3, 5)


def test_each_product_is_timed_both_ways_and_the_floor_sums_the_counts(tiny_model):
    products = matmul_floor.forward_products(tiny_model, np.ones((1, 16), np.int32))
    timed = matmul_floor.time_products(products, repeats=2)
    assert len(timed) == len(products)
    for t in timed:
        assert t["as_traced_ms"] > 0 and t["plain_ms"] > 0
        assert t["jax_ms"] == min(t["as_traced_ms"], t["plain_ms"])
    assert matmul_floor.floor_ms(timed) == pytest.approx(
        sum(t["count"] * t["jax_ms"] for t in timed))
    assert matmul_floor.floor_ms(timed, "plain_ms") == pytest.approx(
        sum(t["count"] * t["plain_ms"] for t in timed))


def test_the_command_line_writes_a_row_per_shape(tmp_path, monkeypatch, capsys):
    out = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["matmul_floor.py", "--model", "tiny", "--shapes",
                                      "2x16,1x8", "--repeats", "1", "--out", str(out)])
    matmul_floor.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["seq_len"]) for r in rows] == [(2, 16), (1, 8)]
    cfg = m2jax.get_model_config("tiny")
    for r in rows:
        assert r["gflop"] * 1e9 == pytest.approx(_model_flops(cfg, r["batch"] * r["seq_len"]))
        assert r["floor_ms"] == pytest.approx(matmul_floor.floor_ms(r["products"]))
    assert "GFLOP of matmuls per call" in capsys.readouterr().out
