"""Child process of tests/test_torch_pickle.py: loads checkpoint files with m2jax's torch reader.

    python tests/torch_file_probe.py --memory-mb 1024 FILE...
    python tests/torch_file_probe.py --memory-mb 1024 --fuzz SOURCE --seed 0 --count 100 \
        --marker /tmp/x/marker

Loads the reader module from its file (not through `m2jax`, so neither jax nor anything else
is imported), under an address-space limit. Prints one JSON line when it starts each file and
one when it is done, so the parent can name the file of a crash (a segfault ends the process):
`outcome` is "ok" (with a digest per tensor), "error" (the reader's CheckpointFileError) or
"foreign" (any other exception: a failure of the reader's contract).
"""

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
READER = os.path.join(HERE, "..", "m2jax", "torch_pickle.py")


def _digests(obj, out: dict, name: str, depth: int = 0) -> None:
    import numpy as np

    if depth > 20 or len(out) > 10_000:
        return
    if isinstance(obj, np.ndarray):
        # Shape and bytes: a file may legitimately declare another dtype of the same width.
        h = hashlib.sha1(repr(obj.shape).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
        out[name] = h.hexdigest()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _digests(v, out, f"{name}/{k}" if isinstance(k, (str, int)) else name, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _digests(v, out, f"{name}/{i}", depth + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--fuzz", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--marker", default=os.devnull)
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    limit = args.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    import importlib.util

    spec = importlib.util.spec_from_file_location("m2jax_torch_pickle_probe", READER)
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    sys.path.insert(0, HERE)
    import torch_files

    cases = [(f, f, None) for f in args.files]
    for n, source in enumerate(args.fuzz):
        with open(source, "rb") as f:
            data = f.read()
        for i, (desc, mutant) in enumerate(
            torch_files.mutants(data, args.seed + n, args.count, args.marker)
        ):
            cases.append((f"{os.path.basename(source)}#{i}", desc, mutant))
    scratch = tempfile.mkdtemp()
    for name, desc, data in cases:
        print(json.dumps({"name": name, "desc": desc, "state": "start"}), flush=True)
        path = name
        if data is not None:
            path = os.path.join(scratch, "pytorch_model.bin")
            with open(path, "wb") as f:
                f.write(data)
        record = {"name": name, "desc": desc, "state": "done"}
        try:
            arrays = {}
            _digests(reader.load_torch_file(path), arrays, "")
            record.update(outcome="ok", arrays=arrays)
        except reader.CheckpointFileError as e:
            record.update(outcome="error", message=str(e)[:500])
        except BaseException as e:  # noqa: BLE001 - reported to the parent as a contract failure
            record.update(outcome="foreign", type=type(e).__name__, message=repr(e)[:500])
        print(json.dumps(record), flush=True)
    # VmHWM: the resident peak of this program (getrusage's also counts the parent before exec).
    with open("/proc/self/status") as f:
        peak_mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    print(json.dumps({"state": "end", "peak_rss_mb": peak_mb}), flush=True)


if __name__ == "__main__":
    main()
