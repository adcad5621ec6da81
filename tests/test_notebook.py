"""notebooks/quickstart.ipynb: stored without outputs, and runs top to bottom on a CPU.

The notebook is executed once (nbclient, a fresh kernel, the repository root as working
directory) with tiny settings injected after its `parameters` cell, as papermill does; the tests
then read what its cells printed and drew, and the files its training run wrote.
"""

import ast
import datetime
import json
import os
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
CELL_TIMEOUT_S = 300
MAX_TOTAL_S = 600  # the bound for the CPU run; about a minute measured

# Tiny settings: no install, no network, a model of a few thousand parameters per layer,
# 40 training steps, the timing at two short lengths on one narrow layer.
TRAIN_STEPS, LOG_EVERY, TOP_K, SEQ_LENS = 40, 5, 3, [128, 512]
CI_PARAMETERS = dict(
    INSTALL=False,
    ALLOW_DOWNLOADS=False,
    MODEL_NAME="tiny",
    MODEL_OVERRIDES=dict(vocab_size=30522, max_position_embeddings=32, long_conv_l_max=32),
    CHECKPOINT="",
    TRAIN_STEPS=TRAIN_STEPS,
    TRAIN_BATCH_SIZE=8,
    TRAIN_LOG_EVERY=LOG_EVERY,
    TRAIN_EVAL_EVERY=20,
    TRAIN_EVAL_STEPS=1,
    TRAIN_MODEL_OVERRIDES=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               hyena_filter_order=16, max_position_embeddings=32,
                               long_conv_l_max=32),
    TRAIN_TENSORBOARD=False,  # metrics.jsonl instead: no TensorFlow import (seconds) in CI
    RETRIEVAL_CHECKPOINT="",
    EMBED_BATCH_SIZE=4,
    SEARCH_TOP_K=TOP_K,
    BENCH_SEQ_LENS=SEQ_LENS,
    BENCH_TOKENS_PER_CALL=1024,
    BENCH_REPEATS=3,
    BENCH_TINY=True,
)


def _stored():
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, cell_id):
    [cell] = [c for c in nb.cells if c.get("id") == cell_id]
    return cell


def _stdout(nb, cell_id):
    return "".join(
        o.get("text", "") for o in _cell(nb, cell_id).outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


def _has_png(nb, cell_id):
    return any("image/png" in o.get("data", {}) for o in _cell(nb, cell_id).outputs)


def _cell_seconds(nb):
    """Wall seconds per executed code cell, from nbclient's timing metadata."""
    out = {}
    for c in nb.cells:
        t = c.metadata.get("execution", {})
        if "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            out[c.id] = (end - start).total_seconds()
    return out


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(the notebook run with CI_PARAMETERS, its work directory)."""
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    nb = _stored()
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    settings = {**CI_PARAMETERS, "WORKDIR": workdir}
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in settings.items()), id="injected-parameters")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    total = time.perf_counter() - t0
    print(f"\nquickstart notebook executed in {total:.0f} s; slowest cells:",
          ", ".join(f"{k} {v:.0f} s" for k, v in sorted(_cell_seconds(nb).items(),
                                                        key=lambda kv: -kv[1])[:4]))
    assert total < MAX_TOTAL_S, f"the notebook took {total:.0f} s (issue: under 10 minutes)"
    return nb, workdir


def test_stored_notebook_has_no_outputs_and_explains_every_code_cell():
    nb = _stored()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"cell {c.id} has outputs"
    for prev, c in zip(nb.cells, nb.cells[1:]):
        if c.cell_type == "code":
            assert prev.cell_type == "markdown", f"code cell {c.id} has no markdown before it"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert [c.id for c in tagged] == ["parameters"]
    assert nb.cells.index(tagged[0]) < nb.cells.index(_cell(nb, "install"))


def test_ci_settings_only_override_existing_parameters():
    names = {t.id for node in ast.parse(_cell(_stored(), "parameters").source).body
             for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}
    assert set(CI_PARAMETERS) | {"WORKDIR"} <= names, set(CI_PARAMETERS) - names


def test_build_and_load_print_the_model(executed):
    nb, workdir = executed
    assert re.search(r"tiny: [\d,]+ parameters, logits \(2, 32, 30522\)", _stdout(nb, "build"))
    assert sorted(os.listdir(os.path.join(workdir, "random-m2"))) == [
        "config.json", "model.safetensors"]
    assert "vocab 30522, length 32" in _stdout(nb, "load")


def test_fill_mask_prints_top_5_per_mask(executed):
    nb, _ = executed
    pred = r"\S+ ([\d.]+(?:e-\d+)?)"  # a token and its probability, 3 significant digits
    for cell_id, masks in (("fill-mask", 3), ("trained-fill-mask", 1)):
        lines = re.findall(rf"\[MASK\] \d: ({pred}(?:, {pred}){{4}})$", _stdout(nb, cell_id),
                           flags=re.M)
        assert len(lines) == masks, _stdout(nb, cell_id)
        for line, *_ in lines:
            probs = [float(p) for p in re.findall(r" ([\d.]+(?:e-\d+)?)(?:,|$)", line)]
            assert len(probs) == 5 and all(0 < p <= 1 for p in probs), line
            assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3


def test_training_ran_lowered_the_loss_and_plotted_it(executed):
    nb, workdir = executed
    with open(os.path.join(workdir, "smoke", "results.json")) as f:
        results = json.load(f)
    assert results["status"] == "completed" and results["step"] == TRAIN_STEPS
    steps = [h["step"] for h in results["train"]]
    losses = [h["loss"] for h in results["train"]]
    assert steps == [1, *range(LOG_EVERY, TRAIN_STEPS + 1, LOG_EVERY)]  # the first step, then
    assert losses[-1] < losses[0] - 1.0, losses
    assert [e["step"] for e in results["eval"]] == [20, 40]
    assert os.path.exists(os.path.join(workdir, "smoke", "final", "config.json"))
    written = os.listdir(os.path.join(workdir, "smoke"))  # TRAIN_TENSORBOARD=False reached it
    assert "metrics.jsonl" in written and not any(f.startswith("events.") for f in written)
    printed = re.search(r"train loss ([\d.]+) at step (\d+) -> ([\d.]+) at step (\d+)",
                        _stdout(nb, "loss-plot"))
    assert printed, _stdout(nb, "loss-plot")
    assert [float(printed[1]), int(printed[2]), float(printed[3]), int(printed[4])] == [
        round(losses[0], 3), 1, round(losses[-1], 3), TRAIN_STEPS]
    assert _has_png(nb, "loss-plot")


def test_search_prints_ranked_top_k_with_scores(executed):
    nb, _ = executed
    assert "6 documents -> embeddings (6, 64)" in _stdout(nb, "embed")
    out = _stdout(nb, "search")
    blocks = re.split(r"^query: .*$", out, flags=re.M)[1:]
    assert len(blocks) == 2, out
    for block in blocks:
        scores = [float(s) for s in re.findall(r"^  \d\. (-?\d\.\d{3})  \S", block, flags=re.M)]
        assert len(scores) == TOP_K, block
        assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)


def test_timing_table_has_both_models_at_both_lengths(executed):
    nb, _ = executed
    out = _stdout(nb, "timing")
    rows = re.findall(r"^\| (\S+) \| (\d+) \| \d+ \| [\d.]+ \| ([\d.]+) \|$", out, flags=re.M)
    found = {(model.startswith("m2"), int(length)): float(tpm) for model, length, tpm in rows}
    assert set(found) == {(m2, l) for m2 in (True, False) for l in SEQ_LENS}, out
    assert all(v > 0 for v in found.values())
    ratios = re.findall(r"^L=(\d+): M2 / Transformer = ([\d.]+)x$", _stdout(nb, "timing-plot"),
                        flags=re.M)
    assert [int(l) for l, _ in ratios] == SEQ_LENS
    assert _has_png(nb, "timing-plot")
