"""Times the PyTorch reference's MLM forward on an m2jax `save_pretrained` checkpoint (torch venv).

Run OUT OF TREE with the reference's environment, as tests/fixtures does; `cpu_vs_reference.py`
calls it:

    /work/refenv/bin/python benchmarks/reference_forward.py --reference /work/refm2/bert \
        --checkpoint DIR --ids IDS.npy --repeats 5 --out OUT.json

The model is the reference's `BertForMaskedLM` built from the checkpoint's `config.json`, with
its `model.safetensors` loaded strictly; eval mode, `torch.no_grad()`, float32, the encoder and
the MLM head on all tokens. One untimed call first, then `--repeats` timed calls. Writes the times
(ms), torch's thread count and the logits of the last call (`.npy` next to OUT) for the
correctness check.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="the reference's bert/ folder")
    p.add_argument("--checkpoint", required=True, help="an m2jax save_pretrained directory")
    p.add_argument("--ids", required=True, help=".npy of int token ids (B, L)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    bl, cb = import_reference(args.reference)
    model = load_saved_model(bl, cb, args.checkpoint)
    ids = torch.from_numpy(np.load(args.ids)).long()
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits

    t0 = time.perf_counter()
    forward()
    first_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        logits = forward()
        times.append((time.perf_counter() - t0) * 1e3)
    np.save(os.path.splitext(args.out)[0] + ".logits.npy", logits.numpy().astype(np.float32))
    with open(args.out, "w") as f:
        json.dump({"times_ms": times, "first_ms": first_ms, "torch": torch.__version__,
                   "torch_threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
