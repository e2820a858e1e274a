"""Running one cell of the matrix in a worker: train (or reuse) and evaluate, sanitize, or detect.

:func:`run_cell` never raises: a failure comes back as ``{"status": "failed", "error": "..."}`` so the
scheduler can retry it and record it. Trained agents live in ``OUT/runs/<hash of the experiment>``; an
artifact is written under a temporary name and renamed when complete, so a killed bench leaves none
half-written, and a finished one is reused by every cell (and every later bench in ``OUT``) that needs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlbackdoor.errors import detail

RUNS = "runs"
ZOOS = "zoos"
METRICS: dict[str, tuple[str, ...]] = {
    "train": ("ctp", "ctp_ratio", "asr", "asr_raw", "return_drop", "measured_poison_rate"),
    "sanitize": ("asr_before", "asr_after", "ctp_after", "ctp_ratio_after"),
    "detect": ("auroc", "population_auroc"),
}
"""The numeric metrics (or ``None``) each kind of cell contributes to the report's tables, by table name."""
SOURCE = {"measured_poison_rate": "poison_rate"}
"""Table names of cell metrics whose own name is taken (the configured ``poison_rate`` labels the group)."""


def init_worker() -> None:
    """Per-process setup of a worker: one torch, BLAS and OpenMP thread (the cells of a bench run side by side)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def artifact(root: Path, name: str, experiment: dict[str, Any]) -> Path:
    """The run directory of ``experiment`` under ``root/runs/name``, trained first unless it is finished.

    :param root: the bench's output folder.
    :param name: the artifact name (a hash of the experiment).
    :param experiment: an :class:`~rlbackdoor.specs.ExperimentSpec` as JSON.
    """
    from rlbackdoor.specs import ExperimentSpec
    from rlbackdoor.training.artifacts import CARD
    from rlbackdoor.training.loop import train

    final = root / RUNS / name
    if (final / CARD).is_file():
        return final
    tmp = root / RUNS / f".{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    train(ExperimentSpec.model_validate(experiment), tmp, wandb_mode="disabled", checkpoint_every=0)
    if (final / CARD).is_file():  # another worker finished the same experiment first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def _train(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    from rlbackdoor.evaluation import evaluate_run
    from rlbackdoor.training.artifacts import read_card

    run_dir = artifact(root, config["artifact"], config["experiment"])
    baseline = root / RUNS / config["baseline"] if config["baseline"] else None
    metrics = evaluate_run(run_dir, baseline, episodes=config["eval"]["episodes"], seeds=config["eval"]["seeds"])
    summary = read_card(run_dir).get("train") or {}
    train = {k: summary.get(k) for k in ("poison_rate", "steps", "seconds", "cpu_seconds", "ep_return_mean")}
    return {**metrics, "train": train, "run_dir": str(run_dir)}


def _sanitize(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    from rlbackdoor.defenses.sanitize import sanitize_run

    evaluation = config["eval"]
    out = sanitize_run(
        root / RUNS / config["artifact"],
        config["method"],
        config["n_clean"],
        baseline_dir=root / RUNS / config["baseline"],
        episodes=evaluation["episodes"],
        seeds=evaluation["seeds"],
    )
    out.pop("curve", None)
    return out


def _detect(root: Path, cell_id: str, config: dict[str, Any]) -> dict[str, Any]:
    from rlbackdoor.defenses.detectors import detect
    from rlbackdoor.zoo import ZooAgent, write_manifest

    zoo = root / ZOOS / cell_id
    zoo.mkdir(parents=True, exist_ok=True)
    agents = [ZooAgent((root / RUNS / name).resolve(), bad, None) for name, bad in config["population"].items()]
    write_manifest(zoo, agents, {"name": cell_id})
    report = detect(zoo, config["detector"], n_clean=config["n_clean"], seed=config["seed"]).to_json()
    model_level = report["auroc"] is not None
    auroc = report["auroc"] if model_level else (report["inputs"] or {}).get("auroc")
    return {
        "auroc": auroc,
        "level": "model" if model_level else "input",
        "roc": report["roc"],
        "population_auroc": (report["population"] or {}).get("auroc"),
        "population_roc": (report["population"] or {}).get("roc"),
        "scores": [{k: m[k] for k in ("path", "backdoored", "score")} for m in report["models"]],
        "seconds_per_model": report["seconds_per_model"],
        "note": report["note"],
    }


def seed_globals(cell_id: str) -> None:
    """Seed Python's, numpy's and torch's global generators from the cell id.

    Library code that draws from them (SB3's stochastic ``predict`` in the defender's clean rollouts)
    then gives a cell the same result whichever cells its worker ran before.
    """
    import random

    import numpy as np
    import torch

    seed = int(cell_id, 16) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_cell(cell: dict[str, Any], root: str) -> dict[str, Any]:
    """Run one cell (a :class:`~rlbackdoor.bench.matrix.Cell` as a dict) under the bench folder ``root``.

    :return: ``status`` (``ok`` or ``failed``), ``metrics`` or ``error``, and when and where it ran.
    """
    init_worker()
    seed_globals(cell["id"])
    start, wall = datetime.now(timezone.utc), time.monotonic()
    path, kind, config = Path(root), cell["kind"], cell["config"]
    out: dict[str, Any] = {"started": start.isoformat(timespec="seconds"), "host": socket.gethostname()}
    try:
        if kind == "train":
            metrics = _train(path, config)
        elif kind == "sanitize":
            metrics = _sanitize(path, config)
        else:
            metrics = _detect(path, cell["id"], config)
        out |= {"status": "ok", "metrics": metrics}
    except Exception as err:
        out |= {"status": "failed", "error": f"{type(err).__name__}: {detail(err)}"}
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out | {"finished": finished, "seconds": round(time.monotonic() - wall, 3), "pid": os.getpid()}
