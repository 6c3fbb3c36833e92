"""Shared helpers for the benchmarks: timing statistics, peak memory, result files."""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(fn, *a, **k) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(),
              "peak_rss_mb": round(peak_rss_mb(), 1)} | result
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return path
