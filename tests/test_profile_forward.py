"""benchmarks/profile_forward.py: the traced op-by-op breakdown of the default call."""

import gzip
import json
import sys

import pytest
from train_fixtures import ROOT

sys.path.insert(0, ROOT)
from benchmarks import common, profile_forward  # noqa: E402


def _write_trace(directory, events):
    run = directory / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_only_xla_operations_are_summed_per_instruction(tmp_path):
    _write_trace(tmp_path, [
        {"ph": "X", "name": "fft.3", "dur": 10.0},
        {"ph": "X", "name": "fft.3", "dur": 5.0},
        {"ph": "X", "name": "ynn_fusion", "dur": 7.5},
        {"ph": "X", "name": "copy_bitcast_fusion.12", "dur": 2.0},
        # Runtime spans, Python frames, the end markers of asynchronous operations, instants:
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 100.0},
        {"ph": "X", "name": "PjitFunction(_compiled_call)", "dur": 90.0},
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 80.0},
        {"ph": "X", "name": "end: fft.3", "dur": 1.0},
        {"ph": "X", "name": "ParseArguments", "dur": 3.0},
        {"ph": "i", "name": "fft.4"},
        {"ph": "X", "name": "fft.5"},  # no duration
    ])
    assert profile_forward.operation_times(str(tmp_path)) == {
        "fft.3": 15.0, "ynn_fusion": 7.5, "copy_bitcast_fusion.12": 2.0}
    assert profile_forward.hlo_group("copy_bitcast_fusion.12") == "copy_bitcast_fusion"
    assert profile_forward.hlo_group("ynn_fusion") == "ynn_fusion"


def test_the_tiny_models_forward_is_profiled_and_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["profile_forward.py", "--model", "tiny", "--shapes",
                                      "2x16", "--calls", "1", "--top", "4", "--out", str(out)])
    profile_forward.main()
    [row] = json.loads(out.read_text())["rows"]
    assert (row["batch"], row["seq_len"], row["calls"]) == (2, 16, 1)
    groups = {g["group"]: g for g in row["groups"]}
    # On CPU the default call at L <= 128 runs the long convolutions as dense DFT matmuls
    # (kernels' `auto` with the memoised spectra): no FFT; they and the dense layers are dots.
    assert "fft" not in groups
    assert sum(g["ms"] for name, g in groups.items() if name in ("dot", "ynn_fusion")) > 0
    assert row["operations_ms"] == pytest.approx(sum(g["ms"] for g in row["groups"]))
    assert sum(g["share"] for g in row["groups"]) == pytest.approx(1.0)
    assert [g["ms"] for g in row["groups"]] == sorted((g["ms"] for g in row["groups"]),
                                                      reverse=True)
    assert len(row["top_operations"]) == 4 and row["operation_count"] >= 4
    assert row["outside_ms"] == pytest.approx(row["traced_call_ms"] - row["operations_ms"])
    assert row["call_ms"] > 0
    printed = capsys.readouterr().out
    assert "B=2 L=16" in printed and "| operation kind | ms/call | share |" in printed
    assert f"wrote {out}" in printed


@pytest.mark.parametrize("flags, message", [
    (["--calls", "0"], "--calls must be >= 1; got 0"),
    (["--shapes", "8x128,2048"], "--shapes: shape '2048' in '8x128,2048' is not BxL"),
])
def test_bad_flags_are_usage_errors(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(sys, "argv", ["profile_forward.py", *flags])
    with pytest.raises(SystemExit) as exc:
        profile_forward.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_shapes_are_parsed_as_batch_and_length():
    assert common.parse_shapes("8x128, 1X2048") == [(8, 128), (1, 2048)]
    for bad in ("8x", "0x128", "8x128x2", "axb"):
        with pytest.raises(ValueError, match="is not BxL"):
            common.parse_shapes(bad)
