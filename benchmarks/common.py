"""Shared helpers of the throughput benchmarks: timing, environment record, table, JSON, plot.

Timing follows /work/.library/device/METHOD.md: compile and warm up first, then time each call
with a host clock after `block_until_ready` (device work is asynchronous), and report the median
of several calls. Inputs are random, never zeros.
"""

from __future__ import annotations

import argparse

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"8x128,1x2048" -> [(8, 128), (1, 2048)]: the (B, L) shapes of a `--shapes` flag.

    Raises ValueError naming the entry that is not two positive integers joined by "x".
    """
    shapes = []
    for entry in text.split(","):
        parts = entry.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {entry!r} in {text!r} is not BxL (e.g. 8x128)")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def time_call(fn: Callable[[], Any], *, warmup: int, repeats: int) -> dict[str, Any]:
    """Median wall time of ``fn()`` in ms (blocked until ready) after `warmup` untimed calls.

    Returns:
        {"median_ms", "min_ms", "max_ms", "times_ms", "compile_and_first_ms"}; the first untimed
        call includes compilation and is reported separately.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": times, "compile_and_first_ms": first_ms}


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other jobs on a shared machine slow a CPU benchmark: record the load it ran under.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def is_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) `columns`; floats with 1-3 decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def write_report(args, env: dict[str, Any], rows: list[dict[str, Any]]) -> pathlib.Path:
    """The forward benchmarks' JSON at `args.out`: the environment (with the load average after
    the run), the settings and the rows."""
    env = {**env, "load_average_1m_after": os.getloadavg()[0]}
    return write_json(args.out, {"environment": env, "settings": vars(args), "rows": rows})


def plot_throughput(path: str | os.PathLike, series: dict[str, list[tuple[int, float]]],
                    ylabel: str, title: str) -> pathlib.Path | None:
    """tokens/ms vs L on a log-2 x axis; returns None (and says so) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped the plot {path}")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(p for p in pts if p[1] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(out_dir: str | os.PathLike) -> None:
    """The short closing table of gpu_check.sh from block.json and forward.json in `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    for name in ("block.json", "forward.json"):
        path = out_dir / name
        if not path.exists():
            print(f"{name}: missing (stage failed or was cut before its first row)")
            continue
        data = json.loads(path.read_text())
        env = data.get("environment", {})
        print(f"{name} on {env.get('device_kind')} ({env.get('date_utc')})"
              + ("  [PARTIAL]" if data.get("partial") else ""))
        if "block" in data:
            ms = {(r["implementation"], r["pass"], r["seq_len"]): r.get("median_ms")
                  for r in data["block"]}
            rows = []
            for (impl, pas, l), t in sorted(ms.items(), key=lambda kv: (kv[0][1], kv[0][2])):
                if impl != "pallas_triton":
                    continue
                x = ms.get(("xla_fft", pas, l))
                err = next((r.get("rel_err_vs_xla") for r in data["block"]
                            if (r["implementation"], r["pass"], r["seq_len"]) == (impl, pas, l)),
                           None)
                rows.append({"pass": pas, "L": l, "pallas_ms": t, "xla_ms": x,
                             "speedup": x / t if x and t else None, "rel_err": err})
            print(format_table(rows, [("pass", "pass"), ("L", "L"), ("pallas_ms", "kernel ms"),
                                      ("xla_ms", "XLA ms"), ("speedup", "speed-up"),
                                      ("rel_err", "rel err vs XLA")]))
        if "forward" in data:
            tpm: dict = {}
            for r in data["forward"]:
                tpm.setdefault(r["seq_len"], {})[r["model"]] = r.get("tokens_per_ms")
            rows = []
            for l in sorted(tpm):
                m2 = next((v for k, v in tpm[l].items() if k.startswith("m2")), None)
                bert = tpm[l].get("bert-base-transformer")
                rows.append({"L": l, "m2": m2, "bert": bert,
                             "ratio": m2 / bert if m2 and bert else None})
            print(format_table(rows, [("L", "L"), ("m2", "M2-BERT tokens/ms"),
                                      ("bert", "BERT tokens/ms"), ("ratio", "M2 / BERT")]))
        print()


def model_shapes_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The command line the 80M forward benchmarks share: --shapes, --model, --seed, --out."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x128,1x2048", help="comma-separated BxL")
    p.add_argument("--model", default="m2-bert-base-80m", help="m2jax.get_model_config name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)
    return p


def parse_args_and_shapes(p: argparse.ArgumentParser, positive: tuple[str, ...] = ()
                          ) -> tuple[argparse.Namespace, list[tuple[int, int]]]:
    """`p.parse_args()` and its --shapes parsed; exits with a usage error naming the flag for a
    bad shape or a count in `positive` below 1."""
    args = p.parse_args()
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    try:
        return args, parse_shapes(args.shapes)
    except ValueError as e:
        p.error(f"--shapes: {e}")
