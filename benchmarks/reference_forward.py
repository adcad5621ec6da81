"""Serves timed calls of the PyTorch reference's MLM forward on an m2jax checkpoint (torch venv).

Run OUT OF TREE with the reference's environment, as tests/fixtures does; `cpu_vs_reference.py`
starts it and sends one command per line on stdin, so that the two sides' calls alternate:

    /work/refenv/bin/python benchmarks/reference_forward.py --reference /work/refm2/bert \
        --checkpoint DIR --ids IDS.npy

The model is the reference's `BertForMaskedLM` built from the checkpoint's `config.json`, with
its `model.safetensors` loaded strictly; eval mode, `torch.no_grad()`, float32, the encoder and
the MLM head on all tokens. After loading, it runs one untimed call and prints one JSON line
``{"ready": true, "first_ms": ..., "torch": ..., "torch_threads": ...}``. Commands:

* ``call``: one timed forward; prints ``{"ms": ...}``;
* ``logits PATH``: saves the last call's logits (float32 .npy) for the correctness check;
  prints ``{"saved": PATH}``;
* ``matmuls PATH``: times matrix products alone, for `matmul_floor.py`'s comparison: PATH is a
  JSON list of ``{"bmkn": [b, m, k, n], "repeats": r}``; each runs as ``torch.matmul`` of random
  float32 (b, m, k) and (b, k, n) tensors (2-D when b = 1), median of r after one untimed call;
  prints ``{"ms": [...]}``;
* ``exit`` (or end of input): stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
from make_parity_fixtures import import_reference, load_saved_model  # noqa: E402


def _reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def time_matmuls(products: list[dict]) -> list[float]:
    """Median ms of each product alone (the ``matmuls`` command)."""
    medians = []
    for p in products:
        b, m, k, n = p["bmkn"]
        lhs, rhs = torch.randn(b, m, k), torch.randn(b, k, n)
        if b == 1:
            lhs, rhs = lhs[0], rhs[0]
        times = []
        with torch.no_grad():
            for i in range(p["repeats"] + 1):
                t0 = time.perf_counter()
                torch.matmul(lhs, rhs)
                if i:  # the first call is untimed
                    times.append((time.perf_counter() - t0) * 1e3)
        medians.append(float(np.median(times)))
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="the reference's bert/ folder")
    p.add_argument("--checkpoint", required=True, help="an m2jax save_pretrained directory")
    p.add_argument("--ids", required=True, help=".npy of int token ids (B, L)")
    args = p.parse_args()

    bl, cb = import_reference(args.reference)
    model = load_saved_model(bl, cb, args.checkpoint)
    ids = torch.from_numpy(np.load(args.ids)).long()
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits

    t0 = time.perf_counter()
    logits = forward()
    _reply({"ready": True, "first_ms": (time.perf_counter() - t0) * 1e3,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "call":
            t0 = time.perf_counter()
            logits = forward()
            _reply({"ms": (time.perf_counter() - t0) * 1e3})
        elif command == "logits":
            np.save(arg, logits.numpy().astype(np.float32))
            _reply({"saved": arg})
        elif command == "matmuls":
            with open(arg) as f:
                _reply({"ms": time_matmuls(json.load(f))})
        elif command == "exit":
            break
        else:
            _reply({"error": f"unknown command {line.strip()!r}"})


if __name__ == "__main__":
    main()
