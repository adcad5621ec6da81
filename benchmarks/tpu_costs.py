"""Expected cost of the Mosaic TPU long-conv kernels, to judge a TPU run against (docs/perf.md).

Counts, per token and channel, the MXU FLOPs (one multiply-add = 2 FLOPs) and the HBM bytes of
the block's forward and backward kernels for the two DFT forms of `kernels.long_conv_block.
tpu_plan`, and turns them into a lower bound on time from the peak numbers of one TensorCore.

    python benchmarks/tpu_costs.py            # the table docs/perf.md quotes
"""

from __future__ import annotations

import dataclasses

from kernels.long_conv_block import tpu_plan

# One TensorCore, as jax's `pltpu.get_tpu_info_for_chip(chip, 1)` lists them (jax 0.10.2):
# bf16 MXU FLOP/s, HBM bytes/s, VMEM bytes. A v4 / v5p chip has two such cores (megacore).
PEAKS = {
    "v4": {"bf16_flops": 137.5e12, "hbm_bytes": 615e9, "vmem": 16 * 2 ** 20},
    "v5e": {"bf16_flops": 197e12, "hbm_bytes": 820e9, "vmem": 128 * 2 ** 20},
    "v5p": {"bf16_flops": 229.5e12, "hbm_bytes": 1230e9, "vmem": 64 * 2 ** 20},
    "v6e": {"bf16_flops": 920e12, "hbm_bytes": 1640e9, "vmem": 128 * 2 ** 20},
}
# MXU passes per matmul: bf16 operands take one; float32 at Precision.HIGHEST is assumed to take
# six bf16 passes, as XLA's HIGHEST does on TPU (Mosaic's fp32 contraction: check on the chip).
PASSES = {"bfloat16": 1, "float32": 6}


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per token and channel: MXU FLOPs (before the precision's passes) and HBM bytes."""

    flops: float
    bytes: float


def transform_flops(seq_len: int) -> tuple[float, float]:
    """(forward, inverse) MXU FLOPs of one real tile's DFT, per token and channel."""
    p = tpu_plan.make_plan(seq_len)
    if p.kind == "dense":
        # x @ (ar, ai): two (L, L) matmuls; Zr @ ar + Zi @ ai_t: two more.
        return 4.0 * seq_len, 4.0 * seq_len
    lanes = tpu_plan.LANES
    # Stage 1: two (N1, R) @ (R, 128) per sequence = 4 N1 per token; stage 2: four
    # (N1, 128) @ (128, 128) = 8 * 128 * N1 * 128 / L = 16 * 128 per token. The inverse mirrors it.
    stage1 = 4.0 * p.n1
    stage2 = 8.0 * lanes * p.n1 * lanes / seq_len
    return stage1 + stage2, stage1 + stage2


def block_costs(seq_len: int, dtype: str) -> dict[str, Costs]:
    """Forward and backward kernel costs of the block with residual, per token and channel.

    Forward: 2 forward + 2 inverse transforms; reads x1, x2, v, u, writes y. Backward: 4 forward
    transforms (v*x1, dy*x2, dy, u) + 3 inverse; reads dy, x1, x2, v, u, writes 4 gradients.
    Left out, because they are per channel and so shrink with the batch: the spectra and their
    cotangents (moved once per channel tile) and the filter-spectrum kernels (2 transforms of the
    2L taps per filter).
    """
    fwd, inv = transform_flops(seq_len)
    item = 2 if dtype == "bfloat16" else 4
    return {"forward": Costs(2 * fwd + 2 * inv, 5 * item),
            "backward": Costs(4 * fwd + 3 * inv, 9 * item)}


def expected_ns_per_token(seq_len: int, dtype: str, chip: str,
                          hidden: int = 768) -> dict[str, dict[str, float]]:
    """Lower bounds (ns per token, all H channels) from the MXU and from HBM, per kernel."""
    peak = PEAKS[chip]
    out = {}
    for name, c in block_costs(seq_len, dtype).items():
        mxu = c.flops * PASSES[dtype] * hidden / peak["bf16_flops"] * 1e9
        hbm = c.bytes * hidden / peak["hbm_bytes"] * 1e9
        out[name] = {"mxu_ns": mxu, "hbm_ns": hbm, "bound": "MXU" if mxu > hbm else "HBM",
                     "ns": max(mxu, hbm)}
    return out


def markdown_table(chips=("v4", "v5e", "v5p", "v6e"), hidden: int = 768) -> str:
    lines = ["| L | form | dtype | fwd FLOP/tok/ch | bwd FLOP/tok/ch | fwd B/tok/ch | "
             + " | ".join(f"{c} fwd ns/token" for c in chips) + " |",
             "|" + "---|" * (6 + len(chips))]
    for l in (128, 512, 1024, 2048, 8192, 32768):
        for dtype in ("bfloat16", "float32"):
            c = block_costs(l, dtype)
            cells = []
            for chip in chips:
                e = expected_ns_per_token(l, dtype, chip, hidden)["forward"]
                cells.append(f"{e['ns']:.1f} ({e['bound']})")
            lines.append(f"| {l} | {tpu_plan.make_plan(l).kind} | {dtype} | "
                         f"{c['forward'].flops:.0f} | {c['backward'].flops:.0f} | "
                         f"{c['forward'].bytes:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
