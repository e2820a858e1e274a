"""Scaling of ``rlbd bench``: the small matrix with 1 worker and with 2, on the local process pool and on Ray.

Each run computes every cell of ``configs/bench/small.yaml`` from scratch (a fresh bench folder, so no
agent is reused) and is timed by wall clock from start to the last result line (process or Ray startup
included, the report excluded). The speedup of a backend is (1-worker seconds) / (2-worker seconds);
the target is >= 1.7 on a 2-core machine. Wall time is what parallelism buys, so other jobs on a shared
machine depress the figure: the load average before and after each run is recorded next to it, and
``concurrency`` (the cells' summed wall seconds / the run's) shows how many cells the backend kept
running at once, whatever each of them was slowed by; training CPU seconds against training wall seconds
show whether the cells were slowed by a lack of free cores (wall grows, CPU does not). The
cells' results are checked to be identical across the four runs (same seeds, same numbers).
Writes ``benchmarks/results/bench_scale.json``.

    .venv/bin/python benchmarks/bench_scale.py [--config configs/bench/small.yaml] [--set timesteps=10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from rlbackdoor.bench.matrix import expand, load_bench
from rlbackdoor.bench.runner import RESULTS as RESULTS_FILE
from rlbackdoor.bench.runner import read_results, run_cells

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.7
RESULTS = Path(__file__).resolve().parent / "results" / "bench_scale.json"
_SCALARS = ("ctp", "asr", "asr_after", "auroc")


def run(config: Path, overrides: list[str], backend: str, workers: int) -> dict[str, Any]:
    """One timed run of the whole matrix into a fresh folder."""
    spec = load_bench(config, overrides)
    cells = expand(spec, config.parent)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{backend}-{workers}-") as out:
        start = time.monotonic()
        summary = run_cells(cells, out, workers=workers, backend=backend)
        seconds = time.monotonic() - start
        records = read_results(Path(out) / RESULTS_FILE)
    cell_seconds = [r["seconds"] for r in records.values()]
    return {
        "backend": backend,
        "workers": workers,
        "seconds": round(seconds, 2),
        "cells": summary.as_dict(),
        "cell_seconds_sum": round(sum(cell_seconds), 2),
        "cell_seconds_min": round(min(cell_seconds), 2),
        "concurrency": round(sum(cell_seconds) / seconds, 2),
        "train_cpu_seconds_sum": round(
            sum((r.get("metrics", {}).get("train") or {}).get("cpu_seconds") or 0.0 for r in records.values()), 2
        ),
        "train_seconds_sum": round(
            sum((r.get("metrics", {}).get("train") or {}).get("seconds") or 0.0 for r in records.values()), 2
        ),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "metrics": {cid: {k: r.get("metrics", {}).get(k) for k in _SCALARS} for cid, r in sorted(records.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "bench" / "small.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    parser.add_argument("--backends", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    speedups: dict[str, float] = {}
    for backend in args.backends:
        by_workers = {}
        for workers in (1, 2):
            result = run(args.config, args.overrides, backend, workers)
            runs.append(result)
            by_workers[workers] = result
            print(
                f"{backend:<5} workers={workers}: {result['seconds']:.1f} s "
                f"({result['cells']['computed']} cells, {result['cell_seconds_sum']:.0f} cell-seconds, "
                f"{result['concurrency']:.2f} cells at a time; training {result['train_seconds_sum']:.0f} s wall, "
                f"{result['train_cpu_seconds_sum']:.0f} s CPU; "
                f"load {result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f})",
                flush=True,
            )
        speedups[backend] = round(by_workers[1]["seconds"] / by_workers[2]["seconds"], 3)
        verdict = "met" if speedups[backend] >= TARGET else "NOT met"
        print(f"{backend:<5} speedup 2 vs 1 workers: {speedups[backend]:.2f} (target {TARGET}: {verdict})", flush=True)
    differing = sorted({c for r in runs for c, m in r["metrics"].items() if m != runs[0]["metrics"].get(c)})
    identical = not differing
    print(
        f"identical cell results across runs: {identical}" + (f" (cells differing: {differing})" if differing else "")
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": str(args.config),
        "overrides": args.overrides,
        "target": TARGET,
        "speedup": speedups,
        "met": {k: v >= TARGET for k, v in speedups.items()},
        "identical_results": identical,
        "differing_cells": {c: [r["metrics"].get(c) for r in runs] for c in differing},
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in runs],
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
