"""The report of a matrix: IQM and 95% bootstrap CIs over training seeds, tables, plots and one W&B run.

Every metric of a group of cells that differ only in their training seed (env, poisoning, poison rate,
defense) is summarised by its interquartile mean over seeds and a bootstrap 95% CI of that IQM
(:func:`rlbackdoor.evaluation.stats.bootstrap_ci` with :func:`scipy.stats.trim_mean`, cut 0.25); with one
seed the CI is undefined. Files, all under the bench folder:

- ``results.csv``: one row per (group, metric): ``iqm``, ``ci_low``, ``ci_high``, ``n`` seeds, ``per_seed``.
- ``results.md``: the same, one table per section (agents, sanitizers, detectors).
- ``asr_ctp_vs_rate.png``: ASR and CTP against the poison rate, one line per attack, per env.
- ``roc_<detector>.png``: a detector's ROC curve over each (env, seed) population.
- ``sanitizers.png``: ASR before and after each sanitizer, per attack and rate.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from rlbackdoor.bench.cells import METRICS, SOURCE
from rlbackdoor.bench.matrix import BenchSpec, Cell
from rlbackdoor.bench.runner import RESULTS, read_results
from rlbackdoor.evaluation.stats import bootstrap_ci, finite, iqm
from rlbackdoor.training.artifacts import atomic_write

SECTIONS = {"train": "Agents", "sanitize": "Sanitizers (run time)", "detect": "Detectors (per-seed population)"}
GROUP = ("env", "poisoning", "poison_rate", "defense")
COLUMNS = ["kind", *GROUP, "metric", "n", "iqm", "ci_low", "ci_high", "per_seed"]


def _iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return stats.trim_mean(x, 0.25, axis=axis)


def summarise(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """IQM over seeds with its bootstrap 95% CI (``None`` with fewer than two values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(x):
        return {"n": 0, "iqm": None, "ci_low": None, "ci_high": None}
    low, high = bootstrap_ci([x], _iqm, seed) if len(x) > 1 else (float("nan"), float("nan"))
    return {"n": len(x), "iqm": iqm(x), "ci_low": finite(low), "ci_high": finite(high)}


def table_rows(cells: list[Cell], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kind, group, metric) over the finished cells, in matrix order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for cell in cells:
        record = records.get(cell.id)
        if record is None or record.get("status") != "ok":
            continue
        key = (cell.kind, *(cell.labels.get(k) for k in GROUP))
        groups.setdefault(key, []).append(record)
    rows = []
    for key, members in groups.items():
        for metric in METRICS[key[0]]:
            values = [(m["seed"], m["metrics"].get(SOURCE.get(metric, metric))) for m in members]
            if all(v is None for _, v in values):
                continue
            per_seed = ";".join(f"{s}:{'' if v is None else f'{v:.4g}'}" for s, v in values)
            rows.append({**dict(zip(["kind", *GROUP], key, strict=True)), "metric": metric, "per_seed": per_seed})
            rows[-1].update(summarise([v for _, v in values]))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(spec: BenchSpec, rows: list[dict[str, Any]], records: dict[str, Any], cells: list[Cell]) -> str:
    """``results.md``: a table per section, ``IQM [CI low, CI high]`` per metric, then the failed cells."""
    lines = [f"# Bench `{spec.name}`", ""]
    lines.append(f"IQM over training seeds {spec.seed_list} with bootstrap 95% CIs; cells: {len(cells)}.")
    for kind, title in SECTIONS.items():
        section = [r for r in rows if r["kind"] == kind]
        if not section:
            continue
        metrics = [m for m in METRICS[kind] if any(r["metric"] == m for r in section)]
        keys = list(dict.fromkeys(tuple(r[k] for k in GROUP) for r in section))
        lines += ["", f"## {title}", "", "| " + " | ".join([*GROUP, *metrics]) + " |"]
        lines.append("|" + "---|" * (len(GROUP) + len(metrics)))
        for key in keys:
            by_metric = {r["metric"]: r for r in section if tuple(r[k] for k in GROUP) == key}
            values = []
            for m in metrics:
                r = by_metric.get(m)
                if r is None or r["iqm"] is None:
                    values.append("–")
                elif r["ci_low"] is None:
                    values.append(_fmt(r["iqm"]))
                else:
                    values.append(f"{_fmt(r['iqm'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
            lines.append("| " + " | ".join([*map(_fmt, key), *values]) + " |")
    failed = [c for c in cells if records.get(c.id, {}).get("status") == "failed"]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- `{c.id}` {c.kind} {c.labels}: {records[c.id].get('error')}" for c in failed]
    missing = [c for c in cells if c.id not in records]
    if missing:
        lines += ["", f"{len(missing)} cells have not run yet; rerun the bench to complete them."]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        atomic_write(path, buffer.getvalue())
    finally:
        plt.close(fig)
    return path


def plot_rates(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """ASR and CTP (IQM with CI) against the poison rate, a line per attack; the clean agents' CTP dashed."""
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    envs = list(dict.fromkeys(r["env"] for r in train if r["poisoning"] != "clean"))
    if not envs:
        return None
    fig, axes = plt.subplots(len(envs), 2, figsize=(9, 3.4 * len(envs)), squeeze=False)
    for row, env in zip(axes, envs, strict=True):
        for ax, metric in zip(row, ("asr", "ctp"), strict=True):
            for attack in dict.fromkeys(r["poisoning"] for r in train if r["env"] == env):
                points = sorted(
                    (r["poison_rate"], r["iqm"], r["ci_low"], r["ci_high"])
                    for r in train
                    if r["env"] == env and r["poisoning"] == attack and r["metric"] == metric and r["iqm"] is not None
                )
                if not points:
                    continue
                if attack == "clean":
                    ax.axhline(points[0][1], color="grey", linestyle="--", label="clean agent")
                    continue
                x = np.array([p[0] for p in points])
                y = np.array([p[1] for p in points])
                low = np.array([p[1] if p[2] is None else p[2] for p in points])
                high = np.array([p[1] if p[3] is None else p[3] for p in points])
                ax.errorbar(x, y, yerr=[y - low, high - y], marker="o", capsize=3, label=attack)
            ax.set_xscale("log")
            ax.set_xlabel("poison rate (share of training steps)")
            ax.set_ylabel(metric.upper())
            if metric == "asr":
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{env}: {metric.upper()}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    return _save(fig, path)


def plot_roc(detector: str, records: list[dict[str, Any]], path: Path) -> Path:
    """ROC curves of one detector, one per (env, seed) population, with the chance diagonal."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    for r in records:
        m = r["metrics"]
        roc = m.get("roc") or m.get("population_roc")
        if roc:
            label = f"{r['env']} seed {r['seed']} (AUROC {_fmt(m.get('auroc'))})"
            ax.plot(roc["fpr"], roc["tpr"], marker=".", label=label)
    if not any((r["metrics"].get("roc") or r["metrics"].get("population_roc")) for r in records):
        ax.text(0.5, 0.5, "no model-level ROC\n(input-level detector)", ha="center", va="center")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"detector {detector}: backdoored vs clean agents")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_sanitizers(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """ASR before and after each sanitizer (IQM with CI), a bar pair per (env, attack, rate); none where undefined."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["kind"] == "sanitize"]
    methods = list(dict.fromkeys(r["defense"] for r in rows))
    if not methods:
        return None
    lookup = {(r["env"], r["poisoning"], r["poison_rate"], r["defense"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(1, len(methods), figsize=(max(5, 4.5 * len(methods)), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        keys = list(dict.fromkeys((r["env"], r["poisoning"], r["poison_rate"]) for r in rows if r["defense"] == method))
        x = np.arange(len(keys))
        for offset, when in ((-0.2, "before"), (0.2, "after")):
            y, err = [], [[], []]
            for key in keys:
                r = lookup.get((*key, method, f"asr_{when}"))
                value = r["iqm"] if r and r["iqm"] is not None else np.nan
                y.append(value)
                err[0].append(0.0 if not r or r["ci_low"] is None else value - r["ci_low"])
                err[1].append(0.0 if not r or r["ci_high"] is None else r["ci_high"] - value)
            ax.bar(x + offset, y, width=0.4, yerr=err, capsize=3, label=f"ASR {when}")
        several = len({env for env, _, _ in keys}) > 1
        names = [
            (f"{env}\n" if several else "") + (f"{p}\n{rate:g}" if rate is not None else p) for env, p, rate in keys
        ]
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("ASR")
        ax.set_title(f"sanitizer {method}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(
    spec: BenchSpec,
    cells: list[Cell],
    out: str | Path,
    wandb_mode: str | None = None,
    wandb_project: str = "rlbackdoor",
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and the plots from ``out/results.jsonl``; log them to one W&B run.

    :param spec: the bench.
    :param cells: its matrix (cells of other configs in the same results file are left out).
    :param out: the bench folder.
    :param wandb_mode: see :mod:`rlbackdoor.tracking`.
    :param wandb_project: the W&B project.
    :return: the files written, by name.
    """
    import matplotlib

    from rlbackdoor import tracking

    matplotlib.use("Agg")
    root = Path(out)
    records = read_results(root / RESULTS)
    rows = table_rows(cells, records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files = {"results.csv": root / "results.csv", "results.md": root / "results.md"}
    atomic_write(files["results.csv"], buffer.getvalue().encode())
    atomic_write(files["results.md"], markdown(spec, rows, records, cells).encode())
    plots: dict[str, Path | None] = {
        "asr_ctp_vs_rate": plot_rates(rows, root / "asr_ctp_vs_rate.png"),
        "sanitizers": plot_sanitizers(rows, root / "sanitizers.png"),
    }
    detected = [records[c.id] for c in cells if c.kind == "detect" and records.get(c.id, {}).get("status") == "ok"]
    for name in dict.fromkeys(r["defense"] for r in detected):
        plots[f"roc_{name}"] = plot_roc(name, [r for r in detected if r["defense"] == name], root / f"roc_{name}.png")
    files |= {f"{key}.png": path for key, path in plots.items() if path is not None}

    states = [records.get(c.id, {}).get("status", "pending") for c in cells]
    counts = {s: states.count(s) for s in ("ok", "failed", "pending")}
    config = {**spec.model_dump(mode="json"), "out": str(root), "cells": len(cells)}
    with tracking.wandb_run("bench", f"bench-{spec.name}", config, wandb_mode, wandb_project, spec.name) as tracker:
        tracker.summary(
            tracking.prefixed("bench", {"cells": len(cells), **{f"cells_{k}": v for k, v in counts.items()}})
        )
        tracker.log_table("bench/results", COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
        for key, path in plots.items():
            if path is not None:
                tracker.log_image(f"bench/{key}", path)
    return files
