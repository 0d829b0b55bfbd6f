"""Result records: what machine and software ran, the command, the date, the figures; JSON out; plots.

Every benchmark returns one dict (`make_record`) whose "benchmark" key names its kind; benchmarks/report.py
renders each kind into BENCHMARKS.md. Latencies are stored in milliseconds as summary statistics plus the
per-request samples (for CDF plots), rates in units per second."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata

PACKAGES = ("turboinfer", "torch", "transformers", "accelerate", "llama_cpp_python", "httpx", "triton")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_bytes": _ram_bytes(), "gpu": None}
    if "torch" in sys.modules or _installed("torch"):
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(), "memory_bytes": props.total_memory,
                           "cuda": torch.version.cuda, "driver_capability": f"{props.major}.{props.minor}"}
    return info


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def command_line(argv: list[str] | None) -> str:
    if argv is not None:
        return shlex.join(["turboinfer", "bench", *argv])
    prog = os.path.basename(sys.argv[0])
    if prog in ("turboinfer", "__main__.py"):
        return shlex.join(["turboinfer", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def make_record(kind: str, argv: list[str] | None, config: dict, engines: dict, **extra) -> dict:
    return {"benchmark": kind, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(argv), "machine": machine_info(), "versions": versions(), "config": config,
            "engines": engines, **extra}


def write_json(record: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(seconds: list[float]) -> dict:
    """{mean, p50, p90, p99, min, max, count} in milliseconds; None values when there are no samples."""
    xs = [s * 1000 for s in seconds if s is not None and math.isfinite(s)]
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None, "count": 0}
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "min": min(xs), "max": max(xs), "count": len(xs)}


def samples_ms(seconds: list[float], limit: int = 5000) -> list[float]:
    """Raw samples kept in the JSON for CDF plots, rounded and capped so files stay small."""
    xs = [round(s * 1000, 3) for s in seconds if s is not None and math.isfinite(s)]
    if len(xs) > limit:
        step = len(xs) / limit
        xs = [sorted(xs)[int(i * step)] for i in range(limit)]
    return xs


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if not ours or not theirs:
        return None
    return ours / theirs


# ---- plots ----------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        from turboinfer.errors import InvalidRequestError

        raise InvalidRequestError("--plot needs matplotlib: pip install 'turboinfer[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, series: dict[str, list[float]], xlabel: str) -> None:
    for label, xs in series.items():
        xs = sorted(x for x in xs if x is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_record(record: dict, path: str) -> None:
    """Latency CDFs for every kind; for `serve` with several concurrency levels, throughput vs concurrency too;
    for `throughput`, output tokens/s per engine."""
    plt = _pyplot()
    kind = record["benchmark"]
    engines = record["engines"]
    panels: list[tuple[str, object]] = []
    if kind == "bench_serve":
        levels = {name: e["levels"] for name, e in engines.items()}
        if any(len(v) > 1 for v in levels.values()):
            panels.append(("throughput", levels))
        for metric, label in (("ttft", "time to first token (ms)"), ("tpot", "time per output token (ms)"),
                              ("e2e", "end-to-end latency (ms)")):
            series = {f"{name} c={lv['concurrency']}" + (f" r={lv['request_rate']}" if lv["request_rate"] != "inf"
                                                         else ""): lv["samples"][metric]
                      for name, lvs in levels.items() for lv in lvs}
            panels.append((label, series))
    elif kind == "bench_throughput":
        panels.append(("bars", {name: e["output_tok_s"] for name, e in engines.items()}))
        panels.append(("request latency (ms)", {name: e["samples"].get("e2e", []) for name, e in engines.items()
                                                if e.get("samples")}))
    else:
        for metric, label in (("ttft", "time to first token (ms)"), ("itl", "inter-token latency (ms)"),
                              ("e2e", "end-to-end latency (ms)")):
            panels.append((label, {name: e["samples"].get(metric, []) for name, e in engines.items()}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (label, data) in zip(axes[0], panels):
        if label == "throughput":
            for name, lvs in data.items():
                ax.plot([lv["concurrency"] for lv in lvs], [lv["output_tok_s"] for lv in lvs], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel("output tokens/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        elif label == "bars":
            ax.bar(list(data), list(data.values()))
            ax.set_ylabel("output tokens/s")
        else:
            _cdf(ax, data, label)
    fig.suptitle(f"{kind.replace('bench_', 'turboinfer bench ')}: {record.get('model', '')}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
