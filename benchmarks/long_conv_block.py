"""Throughput of the M2 long-conv block alone, per implementation of `kernels.long_conv_block`.

Times the block (gate v*x1, bidirectional long conv + D, *x2, residual long conv of u) at
M2-BERT-base width H = 768, forward and forward+backward, with random inputs and Hyena-like
filters, for the XLA paths (FFT, Monarch-DFT matmuls, dense DFT where it takes L) and the Triton
kernel. The paths that take filter spectra (`SPECTRUM_IMPLEMENTATIONS`) are also timed forward
with the filters prepared once (`PREPARED`, what the compiled inference call runs). The kernel is
timed only where it is compiled (GPU); in the CPU interpreter its time means nothing, so CPU runs
time it only in `smoke` mode (to exercise the code path). Every implementation is checked against
`xla_fft` on the same inputs before it is timed (`rel_err_vs_xla`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks import common
from kernels.long_conv_block import (SPECTRUM_IMPLEMENTATIONS, ConvFilter, implementation_module,
                                     long_conv_block, prepare_filter)

REFERENCE = "xla_fft"
# The forward pass with the filters given as spectra, prepared before the timed calls.
PREPARED = "forward, prepared filters"


def _inputs(batch: int, hidden: int, seq_len: int, dtype: str):
    ks = jax.random.split(jax.random.key(seq_len), 10)
    sig = [jax.random.normal(ks[i], (batch, hidden, seq_len), jnp.float32).astype(dtype)
           for i in range(4)]
    decay = jnp.exp(-jnp.arange(seq_len) / (seq_len / 8))[None, :]
    k = lambda i: jax.random.normal(ks[i], (hidden, seq_len)) * decay / jnp.sqrt(seq_len / 8)
    gate = ConvFilter(k(4), k(5), jax.random.normal(ks[6], (hidden,)))
    res = ConvFilter(k(7), k(8), jax.random.normal(ks[9], (hidden,)))
    return sig, gate, res


def forward_and_backward(fwd: Callable[..., jax.Array], output_like: jax.Array
                         ) -> Callable[..., Any]:
    """A jitted function of `fwd`'s arguments that runs `fwd` and its VJP (the gradients of every
    argument) with a random cotangent shaped and typed like `output_like`, `fwd`'s output. The
    cotangent is an argument of the compiled call: with the gradient of a sum (a constant
    cotangent) XLA constant-folded whole backward stages at compile time ("Constant folding an
    instruction is taking > 8s") and timed something no training step runs."""
    cotangent = jax.random.normal(jax.random.key(1), output_like.shape, jnp.float32)
    step = jax.jit(lambda cot, *args: jax.vjp(fwd, *args)[1](cot))
    return functools.partial(step, cotangent.astype(output_like.dtype))


def run(seq_lens: Sequence[int], *, dtype: str, hidden: int, tokens_per_step: int, warmup: int,
        repeats: int, smoke: bool = False, backward: bool = True,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """One row per (implementation, pass, L): median ms and tokens/ms (tokens = B * L)."""
    rows = []
    # GPU: the kernel against the XLA FFT path (gpu_check.sh's time budget); CPU: the XLA paths
    # (the interpreted kernel's time means nothing). Smoke runs: every path.
    impls = ["xla_fft"]
    if common.is_gpu() or smoke:
        impls.insert(0, "pallas_triton")
    if not common.is_gpu() or smoke:
        impls += ["xla_monarch", "xla_dense_dft"]
    kernel = implementation_module("pallas_triton")
    passes = ["forward", "forward+backward"] if backward else ["forward"]
    for seq_len in seq_lens:
        batch = max(1, tokens_per_step // seq_len)
        (x1, x2, v, u), gate, res = _inputs(batch, hidden, seq_len, dtype)
        for impl in impls:
            if not implementation_module(impl).supports(seq_len, jnp.dtype(dtype)):
                continue
            for pas in passes + ([PREPARED] if impl in SPECTRUM_IMPLEMENTATIONS else []):
                row: dict[str, Any] = {"implementation": impl, "pass": pas, "seq_len": seq_len,
                                       "batch": batch, "hidden": hidden, "dtype": dtype,
                                       "kernel_supports_L": kernel.supports(seq_len, dtype),
                                       # An interpreted kernel's time is no kernel measurement.
                                       "interpreted": (impl == "pallas_triton"
                                                       and kernel.use_interpreter())}
                fwd = lambda x1, x2, v, u, gate, res, impl=impl: long_conv_block(
                    x1, x2, v, gate, u, res, implementation=impl)
                filters = (gate, res)
                if pas == PREPARED:
                    filters = tuple(prepare_filter(f, platform=jax.default_backend(), dtype=dtype,
                                                   implementation=impl) for f in filters)
                if pas in ("forward", PREPARED):
                    fn = jax.jit(fwd)
                else:
                    fn = forward_and_backward(fwd, v)
                try:
                    if (impl, pas) != (REFERENCE, "forward") and pas != "forward+backward":
                        # Correct first (METHOD.md): against the XLA FFT path, same inputs.
                        y_k = fn(x1, x2, v, u, *filters).astype(jnp.float32)
                        y_x = jax.jit(functools.partial(fwd, impl=REFERENCE))(
                            x1, x2, v, u, gate, res).astype(jnp.float32)
                        row["rel_err_vs_xla"] = float(jnp.linalg.norm(y_k - y_x)
                                                      / jnp.linalg.norm(y_x))
                    t = common.time_call(lambda: fn(x1, x2, v, u, *filters), warmup=warmup,
                                         repeats=repeats)
                    row.update(t)
                    row["tokens_per_ms"] = batch * seq_len / t["median_ms"]
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"  block {impl:13s} {pas:25s} L={seq_len:6d} B={batch:4d} "
                      + (f"{row['median_ms']:9.3f} ms" if "median_ms" in row else row["error"]),
                      flush=True)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Speed-up of each implementation over the XLA FFT path per (pass, L) where both ran
    (`PREPARED` rows against the FFT path's own `PREPARED` row)."""
    ms = {(r["implementation"], r["pass"], r["seq_len"]): r.get("median_ms") for r in rows}
    out = {}
    for (impl, pas, l), t in sorted(ms.items()):
        x = ms.get((REFERENCE, pas, l))
        if impl != REFERENCE and t and x:
            key = "forward_prepared" if pas == PREPARED else pas
            out[f"{impl}_speedup_{key}_L{l}"] = x / t
    return out
