"""The torch checkpoint reader on crafted, damaged and malicious files (issue 10 items 7-9).

Files are written by `torch_files` (no torch needed) and read by `torch_file_probe.py` in a
child process under an address-space limit, so a crash (a segfault is exit -11) or a memory
blow-up fails the test instead of the test run.
"""

import json
import os
import re
import subprocess
import sys
import zlib

import ml_dtypes
import numpy as np
import pytest

import torch_files as tf
from m2jax.torch_pickle import CheckpointFileError, load_torch_file

HERE = os.path.dirname(__file__)
PROBE = os.path.join(HERE, "torch_file_probe.py")
FIXTURES = os.path.join(HERE, "fixtures")
REAL_FILES = [os.path.join(FIXTURES, "tiny_mlm_bin", "pytorch_model.bin"),
              os.path.join(FIXTURES, "tiny_mlm_composer", "model.pt")]
MEMORY_MB = 512  # address-space limit of the child (numpy alone needs ~150 MB of it)
PEAK_RSS_MB = 150  # the child's resident peak; loading the fixtures takes ~45 MB


def _probe(*args):
    """Runs the probe; returns its records by file name, and the end record."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, PROBE, "--memory-mb", str(MEMORY_MB), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r for r in records if r["state"] == "start"]
    done = {r["name"]: r for r in records if r["state"] == "done"}
    if proc.returncode != 0:
        crashed = [r["desc"] for r in started if r["name"] not in done]
        pytest.fail(f"the reader process died (exit {proc.returncode}) on {crashed}: "
                    f"{proc.stderr[-2000:]}")
    return done, records[-1]


def _storage(n, dtype=np.float32):
    return np.arange(n).astype(dtype).tobytes()


T = tf.Tensor
# name -> (tensors, storages, expected error (regex) or None for a valid file)
CRAFTED = {
    "valid_views": ([T("w", "0", 0, (2, 2), (2, 1), numel=4),
                     T("tied", "0", 0, (2, 2), (2, 1), numel=4),
                     T("wT", "0", 0, (2, 2), (1, 2), numel=4),
                     T("empty", "1", 0, (0, 3), (3, 1), numel=0)],
                    {"0": _storage(4), "1": b""}, None),
    "offset_past_end": ([T("w", "0", 10, (2,), (1,), numel=4)], {"0": _storage(4)},
                        r"tensor on storage 0: the view \(offset 10, 2 elements\) "
                        r"reaches element 12 of a storage of 4"),
    "size_past_end_reads_the_heap": ([T("w", "0", 0, (100000,), (1,), numel=4)], {"0": _storage(4)},
                                     r"reaches element 100000 of a storage of 4"),
    "huge_stride_segfaults": ([T("w", "0", 0, (2, 2), (2**40, 1), numel=4)], {"0": _storage(4)},
                              r"reaches element 1099511627778 of a storage of 4"),
    "stride_overflows_int64": ([T("w", "0", 0, (3,), (2**63,), numel=4)], {"0": _storage(4)},
                               r"of a storage of 4"),
    "stride_wraps_to_minus_one": ([T("w", "0", 3, (4,), (2**64 - 1,), numel=4)], {"0": _storage(4)},
                                  r"of a storage of 4"),
    "negative_stride": ([T("w", "0", 3, (4,), (-1,), numel=4)], {"0": _storage(4)},
                        r"negative strides are not supported"),
    "negative_offset": ([T("w", "0", -2, (2,), (1,), numel=4)], {"0": _storage(4)},
                        r"negative offset or size"),
    "negative_size": ([T("w", "0", 0, (-1, 4), (4, 1), numel=4)], {"0": _storage(4)},
                      r"negative offset or size"),
    "float_size": ([T("w", "0", 0, (4.0,), (1,), numel=4)], {"0": _storage(4)},
                   r"offset, sizes and strides must be integers"),
    "sizes_and_strides_differ": ([T("w", "0", 0, (2, 2), (1,), numel=4)], {"0": _storage(4)},
                                 r"2 sizes but 1 strides"),
    "broadcast_bomb": ([T("w", "0", 0, (2**16, 2**16), (0, 0), numel=1)], {"0": _storage(1)},
                       r"expand 4 bytes of storage into 17179869184 bytes of copies"),
    "numel_beyond_entry": ([T("w", "0", 0, (1000,), (1,), numel=1000)], {"0": _storage(4)},
                           r"entry archive/data/0 holds 16 bytes but its tensors need 4000"),
    "numel_huge": ([T("w", "0", 0, (2**70,), (1,), numel=2**70)], {"0": _storage(4)},
                   r"holds 16 bytes but its tensors need 4722366482869645213696"),
    "storage_larger_than_its_tensors": ([T("w", "0", 0, (2,), (1,), numel=4)], {"0": _storage(4)},
                                        r"storage 0 declares 4 elements but its tensors use 2"),
    "storage_key_is_a_path": ([T("w", "../../etc/passwd", 0, (1,), (1,), numel=1)], {},
                              r"a storage key that is not a short name"),
    "unknown_storage_type": ([T("w", "0", 0, (1,), (1,), "ComplexFloatStorage", numel=1)],
                             {"0": _storage(2)}, r"storage 0: unsupported storage type"),
    "missing_storage_entry": ([T("w", "7", 0, (1,), (1,), numel=1)], {"0": _storage(1)},
                              r"entry archive/data/7 is missing"),
    "storage_declared_twice": ([T("a", "0", 0, (4,), (1,), numel=4),
                                T("b", "0", 0, (2,), (1,), "LongStorage", numel=2)],
                               {"0": _storage(4)}, r"storage 0 is declared twice"),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    paths = []
    for name, (tensors, storages, _) in CRAFTED.items():
        path = str(folder / f"{name}.bin")
        tf.write_checkpoint(path, tensors, storages)
        paths.append(path)
    # Not little-endian.
    path = str(folder / "big_endian.bin")
    tf.write_zip(path, {"data.pkl": tf.torch_pickle([]), "byteorder": b"big"})
    paths.append(path)
    done, _ = _probe(*paths)
    return {os.path.basename(p)[: -len(".bin")]: (p, done[p]) for p in paths}


@pytest.mark.parametrize("case", sorted(k for k, v in CRAFTED.items() if v[2]) + ["big_endian"])
def test_crafted_tensor_views_are_refused_naming_file_and_entry(crafted, case):
    path, record = crafted[case]
    assert record["outcome"] == "error", record
    expected = CRAFTED[case][2] if case in CRAFTED else "big-endian checkpoints are not supported"
    assert record["message"].startswith(path) and re.search(expected, record["message"]), record


def test_valid_views_read_right_in_process(crafted):
    path, record = crafted["valid_views"]
    assert record["outcome"] == "ok"
    sd = load_torch_file(path)
    w = np.arange(4, dtype=np.float32).reshape(2, 2)
    np.testing.assert_array_equal(sd["w"], w)
    np.testing.assert_array_equal(sd["wT"], w.T)
    assert sd["tied"] is sd["w"]  # one storage, one view: one array, as torch shares it
    assert sd["empty"].shape == (0, 3) and sd["wT"].flags.c_contiguous


def test_bf16_and_scalar_tensors(tmp_path):
    path = str(tmp_path / "x.bin")
    tf.write_checkpoint(path, [T("h", "0", 0, (3,), (1,), "BFloat16Storage", numel=3),
                               T("step", "1", 0, (), (), "LongStorage", numel=1)],
                        {"0": _storage(3, ml_dtypes.bfloat16), "1": _storage(1, np.int64)})
    sd = load_torch_file(path)
    assert sd["h"].dtype == ml_dtypes.bfloat16 and list(sd["h"].astype(np.float32)) == [0, 1, 2]
    assert sd["step"].shape == () and int(sd["step"]) == 0


def test_code_in_the_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    paths = []
    for kind in range(3 * len(tf.CODE_GLOBALS)):
        path = str(tmp_path / f"code{kind}.bin")
        tf.write_zip(path, {"data.pkl": tf.code_pickle(str(marker), kind), "byteorder": b"little"})
        paths.append(path)
    done, _ = _probe("--marker", str(marker), *paths)
    assert not marker.exists()
    for path in paths:  # refused, or read with the call left as an inert stub
        assert done[path]["outcome"] in ("error", "ok") and not done[path].get("arrays"), done[path]
    # The payloads are live: Python's own unpickler runs them.
    import pickle

    live = tmp_path / "live"
    pickle.loads(tf.code_pickle(str(live), 0))  # os.system("touch live")
    assert live.exists()


def test_zip_bombs_are_refused_before_inflating(tmp_path):
    """A ~200 KB file whose storage entry inflates to 200 MB (the issue's case at 1/15 scale)."""
    stream, crc = tf.zeros_deflated(200 << 20)
    files = {
        # the tensors need 4000 bytes; the entry declares (and inflates to) 200 MB
        "declared_beyond_need": ([T("w", "0", 0, (1000,), (1,), numel=1000)],
                                 r"entry archive/data/0 holds 209715200 bytes but its tensors "
                                 r"need 4000"),
        # the pickle asks for 200 MB and the entry holds them, deflated 1000-fold
        "inflation_ratio": ([T("w", "0", 0, (50 << 20,), (1,), numel=50 << 20)],
                            r"would inflate 20\d+ bytes to 209715200 .*zip bomb"),
    }
    paths = {}
    for name, (tensors, _) in files.items():
        pkl = tf.torch_pickle(tensors)
        paths[name] = str(tmp_path / f"{name}.bin")
        tf.write_raw_zip(paths[name], [("archive/data.pkl", 0, zlib.crc32(pkl), len(pkl), pkl),
                                       ("archive/data/0", 8, crc, 200 << 20, stream)])
        assert os.path.getsize(paths[name]) < 300_000
    pkl_bomb = str(tmp_path / "pickle_bomb.bin")
    big, big_crc = tf.zeros_deflated(300 << 20)
    tf.write_raw_zip(pkl_bomb, [("archive/data.pkl", 8, big_crc, 300 << 20, big)])
    done, end = _probe(*paths.values(), pkl_bomb)
    for name, (_, expected) in files.items():
        record = done[paths[name]]
        assert record["outcome"] == "error" and re.search(expected, record["message"]), record
    assert re.search(r"data.pkl declares 314572800 bytes \(limit 268435456\)",
                     done[pkl_bomb]["message"])
    assert end["peak_rss_mb"] < PEAK_RSS_MB, end


def test_fuzzed_checkpoints_give_the_right_tensors_or_our_error(tmp_path):
    """300 seeded mutations of the two torch-format fixtures: truncations, flipped bytes, edited
    pickle opcodes (numbers, names, code-running globals) and edited zip headers."""
    marker = tmp_path / "pwned"
    originals, _ = _probe(*REAL_FILES)
    right = {digest for r in originals.values() for digest in r["arrays"].values()}
    assert len(right) > 50  # distinct tensors of the fixtures
    args = ["--seed", "10", "--count", "150", "--marker", str(marker)]
    for path in REAL_FILES:
        args += ["--fuzz", path]
    done, end = _probe(*args)
    assert len(done) == 300
    outcomes = {}
    for record in done.values():
        outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
        assert record["outcome"] in ("ok", "error"), record  # never a foreign exception
        if record["outcome"] == "ok":  # every tensor is one of the file's, bit for bit
            assert set(record["arrays"].values()) <= right, record["desc"]
    assert not marker.exists()
    assert end["peak_rss_mb"] < PEAK_RSS_MB, end
    assert outcomes["error"] > 200 and outcomes["ok"] > 10, outcomes  # the mutations bite


def test_reader_errors_are_value_errors_naming_the_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(open(REAL_FILES[0], "rb").read()[:5000])
    with pytest.raises(CheckpointFileError, match=re.escape(str(path))):
        load_torch_file(str(path))
    assert issubclass(CheckpointFileError, ValueError)
