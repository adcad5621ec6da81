"""Compile the Mosaic TPU kernels ahead of time for TPU generations, without a TPU.

With ``libtpu`` installed (the wheel jax[tpu] pins: ``pip install "libtpu==0.0.42.*"`` for
jax 0.10.2, best in a separate virtualenv), `jax.experimental.topologies` gives a compile-only
TPU client on any host, and ``jit(...).lower(...).compile()`` runs the real Mosaic compiler.
That catches what the `tpu` export tests cannot (they stop at the Mosaic MLIR): layouts Mosaic
cannot handle, and programs that do not fit VMEM. For every L, dtype and chip it compiles each
kernel (block forward, block backward, filter spectrum and its adjoint) with a 1 KiB scoped-VMEM
limit, so that the compiler's error states the kernel's VMEM need, and compares that need with the
16 MiB default limit (v4 has 16 MiB of VMEM in all). Prints a table, writes JSON.

    python benchmarks/tpu_aot_check.py --chips v4,v5e,v5p,v6e --seq_lens 128,1024,32768

Exit status 1 if any kernel fails to compile or needs more than the default limit.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

# libtpu reads these at start-up; without them it looks for a TPU VM's metadata server.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from kernels.long_conv_block import pallas_mosaic_tpu as tpu  # noqa: E402

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
DEFAULT_LIMIT_MIB = 16.0
_NEED = re.compile(r"Scoped allocation with size ([0-9.]+)([KMG])")


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels(cfg, b: int, h: int, dtype):
    """(name, function, argument specs) of the four pallas_calls of one block call."""
    plan = cfg.plan
    sig = jax.ShapeDtypeStruct(plan.signal_shape(b, h), dtype)
    spec = jax.ShapeDtypeStruct(plan.spectrum_shape(h), jnp.float32)
    taps = jax.ShapeDtypeStruct(plan.taps_shape(h), jnp.float32)
    n_spec = 2 * plan.num_spectrum_planes
    fwd = lambda s, k: tpu._block_call(tpu._forward_kernel, cfg, cfg.tile_forward, s, k, None)
    bwd = lambda dy, s, k: tpu._block_call(tpu._backward_kernel, cfg, cfg.tile_backward,
                                           (dy,) + s, k, (dtype,) * 4)
    return (
        ("block_forward", fwd, ((sig,) * 4, (spec,) * n_spec)),
        ("block_backward", bwd, (sig, (sig,) * 4, (spec,) * n_spec)),
        ("taps_to_spectrum", lambda t: tpu._taps_call(cfg, "taps_to_spectrum", (t,)), (taps,)),
        ("spectrum_to_taps", lambda r, i: tpu._taps_call(cfg, "spectrum_to_taps", (r, i)),
         (spec, spec)),
    )


def compile_kernel(fn, args, device) -> tuple[str, float | None, float]:
    """("ok" | "vmem" | error text, VMEM need in MiB, seconds) for one kernel on one chip."""
    sharded = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)), args)
    start = time.perf_counter()
    try:
        jax.jit(fn).trace(*sharded).lower(lowering_platforms=("tpu",)).compile()
        return "ok", None, time.perf_counter() - start
    except Exception as err:  # the compiler's message is the result
        text = str(err)
        seconds = time.perf_counter() - start
        need = _NEED.search(text)
        if need is None:
            return text.splitlines()[0][:300], None, seconds
        scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}[need.group(2)]
        return "vmem", float(need.group(1)) * scale, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", default="v4,v5e,v5p,v6e")
    parser.add_argument("--seq_lens", default="128,512,1024,8192,32768")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--json", default="tpu_aot_check.json")
    args = parser.parse_args(argv)
    if not libtpu_available():
        print("libtpu is not installed: nothing to compile (see the module docstring).")
        return 0
    from jax.experimental import topologies

    tpu.VMEM_LIMIT_BYTES = 1024  # every kernel fails with its VMEM need in the message
    rows, failed = [], False
    for chip in args.chips.split(","):
        device = topologies.get_topology_desc(platform="tpu",
                                              topology_name=TOPOLOGIES[chip]).devices[0]
        for l in (int(x) for x in args.seq_lens.split(",")):
            for dtype in (jnp.dtype(d) for d in args.dtypes.split(",")):
                cfg, hp = tpu.make_config((args.batch, args.hidden, l), dtype, True, False)
                for name, fn, specs in _kernels(cfg, args.batch, hp, dtype):
                    status, need, secs = compile_kernel(fn, specs, device)
                    ok = status == "vmem" and need <= DEFAULT_LIMIT_MIB
                    failed |= not ok
                    rows.append({"chip": chip, "seq_len": l, "dtype": dtype.name, "kernel": name,
                                 "plan": cfg.plan.kind, "vmem_mib": need,
                                 "fits_default_limit": ok, "compile_s": round(secs, 1),
                                 "error": None if status == "vmem" else status})
                    print(f"{chip:4s} L={l:<6d} {dtype.name:9s} {name:17s} "
                          f"{'-' if need is None else f'{need:6.2f} MiB'} "
                          f"{'ok' if ok else 'FAIL ' + status}", flush=True)
    common.write_json(args.json, {"hidden": args.hidden, "batch": args.batch,
                                  "default_limit_mib": DEFAULT_LIMIT_MIB, "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
