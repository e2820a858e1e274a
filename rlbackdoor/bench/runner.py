"""Running a matrix: cells in dependency order on a backend, one JSON line per finished cell, resumable.

``OUT/results.jsonl`` gets one line per cell as it finishes (a single ``write`` of the whole line on an
``O_APPEND`` descriptor, then ``fsync``), so a killed bench loses only the cells that were running. A
restart skips every cell with an ``ok`` line and deletes the agents a killed run left half-trained
(``runs/.<name>-<pid>``; one bench at a time per folder); failed cells run again. A cell that fails is retried once,
then recorded as ``{"status": "failed", "error": ...}``; the cells that need it are recorded as failed
too, and the rest of the matrix completes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlbackdoor.bench.backends import check_backend, make_backend
from rlbackdoor.bench.cells import METRICS, RUNS, SOURCE, init_worker, run_cell
from rlbackdoor.bench.matrix import Cell
from rlbackdoor.errors import ArtifactError, RlbdError
from rlbackdoor.jsonfile import loads, read_bytes, read_json

RESULTS = "results.jsonl"
BENCH = "bench.json"
"""The bench's config and cells, as the last run into the folder expanded them."""
ATTEMPTS = 2
"""Tries of a cell before it is recorded as failed."""
MAX_RESULTS_BYTES = 256 * 2**20
"""The largest ``results.jsonl`` read (256 MiB: some 180,000 records of the 1-2 KB a cell writes)."""


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, in one write, and fsync it."""
    data = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _number(value: Any) -> bool:
    """A JSON number as Python reads it: a float, or an int within float range (a bool is no number)."""
    return isinstance(value, float) or (type(value) is int and abs(value) <= sys.float_info.max)


def _roc(value: Any) -> bool:
    """``None``, or a ROC curve: ``fpr`` and ``tpr`` lists of numbers of one length."""
    if value is None:
        return True
    fpr, tpr = (value.get(k) if isinstance(value, dict) else None for k in ("fpr", "tpr"))
    curve = isinstance(fpr, list) and isinstance(tpr, list) and len(fpr) == len(tpr)
    return curve and all(map(_number, fpr + tpr))


def well_formed(record: Any) -> bool:
    """Whether ``record`` has the shape :func:`run_cells` writes, in every field the runner and the report read.

    A str ``id``; a known ``kind``; the labels (str ``env``, ``poisoning`` and ``defense``, int ``seed``,
    ``poison_rate`` a number or ``None``); ``status`` ``failed`` with a str ``error``, or ``ok`` with a ``metrics``
    mapping whose table metrics are numbers or ``None`` and whose ROC curves (``roc``, ``population_roc``) are
    ``None`` or curves.
    """
    if not (isinstance(record, dict) and isinstance(record.get("id"), str) and record.get("kind") in METRICS):
        return False
    labels = all(isinstance(record.get(k), str) for k in ("env", "poisoning", "defense"))
    rate, status, metrics = record.get("poison_rate"), record.get("status"), record.get("metrics")
    if not (labels and type(record.get("seed")) is int and (rate is None or _number(rate))):
        return False
    if status == "failed":
        return isinstance(record.get("error"), str)
    if status != "ok" or not isinstance(metrics, dict):
        return False
    values = [metrics.get(SOURCE.get(m, m)) for m in METRICS[record["kind"]]]
    curves = [metrics.get(k) for k in ("roc", "population_roc")]
    return all(v is None or _number(v) for v in values) and all(map(_roc, curves))


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of every cell id in a results file; a line that is not JSON (torn by a crash) or not a
    record of the shape the runner writes (:func:`well_formed`) is skipped, so its cell runs again.

    :raises ArtifactError: the file is unreadable or larger than :data:`MAX_RESULTS_BYTES`.
    """
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    try:
        data = read_bytes(path, MAX_RESULTS_BYTES)
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err}); move it away (every cell then runs again)") from None
    for line in data.splitlines():
        try:
            record = loads(line)
        except ValueError:
            continue
        if well_formed(record):
            records[record["id"]] = record
    return records


@dataclass
class BenchSummary:
    """What a run of the matrix did: cells in the matrix, computed now, skipped as finished, failed."""

    cells: int
    computed: int
    skipped: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def run_cells(
    cells: list[Cell],
    out: str | Path,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> BenchSummary:
    """Run every unfinished cell of ``cells`` under ``out``; append each result to ``out/results.jsonl``.

    :param cells: the matrix (:func:`rlbackdoor.bench.matrix.expand`).
    :param out: the bench folder.
    :param workers: parallel workers.
    :param backend: ``local`` (process pool) or ``ray``.
    :param ray_address: ``ray``: an existing cluster; else a local instance of ``workers`` CPUs.
    :param on_record: called with each record as it is written (progress).
    """
    root = Path(out).resolve()
    results = root / RESULTS
    previous = read_results(results)
    root.mkdir(parents=True, exist_ok=True)
    for partial in (root / RUNS).glob(".*"):  # agents a killed bench was training
        shutil.rmtree(partial, ignore_errors=True)
    finished = {c.id for c in cells if previous.get(c.id, {}).get("status") == "ok"}
    todo = [c for c in cells if c.id not in finished]
    summary = BenchSummary(len(cells), 0, len(finished), 0)
    if not todo:
        return summary
    failed: set[str] = set()
    attempts: dict[str, int] = {}

    def record(cell: Cell, outcome: dict[str, Any]) -> None:
        line = {"id": cell.id, "kind": cell.kind, **cell.labels, **outcome, "attempts": attempts.get(cell.id, 0)}
        append_line(results, line)
        if on_record is not None:
            on_record(line)

    pool = make_backend(backend, max(1, min(workers, len(todo))), ray_address, init_worker)
    try:
        running: dict[Any, Cell] = {}
        waiting = list(todo)
        while waiting or running:
            for cell in list(waiting):
                broken = [n for n in cell.needs if n in failed]
                if broken:
                    waiting.remove(cell)
                    failed.add(cell.id)
                    summary.failed += 1
                    record(cell, {"status": "failed", "error": f"needs cell {broken[0]}, which failed"})
                elif all(n in finished for n in cell.needs):
                    waiting.remove(cell)
                    attempts[cell.id] = 1
                    running[pool.submit(run_cell, asdict(cell), str(root))] = cell
            if not running:
                break
            done, _ = pool.wait(running)
            for handle in done:
                cell = running.pop(handle)
                try:
                    outcome = pool.result(handle)
                except Exception as err:  # the worker died (killed, out of memory)
                    outcome = {"status": "failed", "error": f"worker lost: {type(err).__name__}: {err}"}
                if outcome["status"] == "ok":
                    finished.add(cell.id)
                    summary.computed += 1
                    record(cell, outcome)
                elif attempts[cell.id] < ATTEMPTS:
                    attempts[cell.id] += 1
                    running[pool.submit(run_cell, asdict(cell), str(root))] = cell
                else:
                    failed.add(cell.id)
                    summary.failed += 1
                    record(cell, outcome)
    finally:
        pool.close()
    return summary


def run_bench(
    config: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    wandb_mode: str | None = None,
    wandb_project: str = "rlbackdoor",
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[BenchSummary, dict[str, Path]]:
    """``rlbd bench``: validate the config, run the unfinished cells, write the report and its W&B run.

    :param config: the bench YAML (``configs/bench/``).
    :param out: the bench folder (``results.jsonl``, ``runs/``, tables and plots).
    :param overrides: ``key.path=value`` overrides of the config.
    :param workers: parallel workers.
    :param backend: ``local`` or ``ray``.
    :param ray_address: ``ray``: an existing cluster.
    :param wandb_mode: the bench run's W&B mode (see :mod:`rlbackdoor.tracking`); cells' training is not tracked.
    :param wandb_project: the W&B project.
    :param on_record: called with each cell's record as it is written.
    :return: what ran, and the report files by name.
    """
    from rlbackdoor import tracking
    from rlbackdoor.bench.matrix import expand, load_bench
    from rlbackdoor.bench.report import write_report
    from rlbackdoor.training.artifacts import write_json

    spec = load_bench(config, overrides)
    cells = expand(spec, Path(config).parent, str(config))
    mode = tracking.resolve_mode(wandb_mode)  # a bad mode or backend fails before anything is written
    check_backend(backend, workers, ray_address)
    _check_trainable(str(config), cells)
    root = Path(out)
    read_results(root / RESULTS)  # a results file that cannot be read fails before anything is written
    _check_same_bench(root, spec.name)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / BENCH, {"config": spec.model_dump(mode="json"), "cells": [asdict(c) for c in cells]})
    summary = run_cells(cells, root, workers, backend, ray_address, on_record)
    files = write_report(spec, cells, root, mode, wandb_project)
    return summary, files


def _check_same_bench(root: Path, name: str) -> None:
    """Refuse a folder that holds another bench's results (a rerun of the same bench, extended or not, may add to
    it: its finished cells are skipped)."""
    if not (root / BENCH).is_file():
        return
    try:
        earlier = read_json(root / BENCH, MAX_RESULTS_BYTES)["config"]["name"]
    except (RlbdError, KeyError, TypeError):  # a damaged record of the earlier bench: it is rewritten
        return
    if earlier != name:
        raise ArtifactError(f"{root}: holds the results of bench '{earlier}', not '{name}'; choose another --out")


def _check_trainable(source: str, cells: list[Cell]) -> None:
    """Build the env and the model of every distinct kind of agent the cells train (env, algo, hyperparameters,
    envs, loop), as training would first, so that a bad one fails before anything is written (errors name
    ``source``, the bench file)."""
    from rlbackdoor.errors import RlbdError, in_context
    from rlbackdoor.specs import ExperimentSpec
    from rlbackdoor.training.loop import check_trainable

    seen = set()
    for cell in cells:
        if cell.kind != "train":
            continue
        experiment = cell.config["experiment"]
        key = json.dumps([experiment.get(k) for k in ("env", "algo", "hyperparams", "n_envs", "poisoning")])
        if key in seen:
            continue
        seen.add(key)
        try:
            check_trainable(ExperimentSpec.model_validate(experiment))
        except RlbdError as err:
            raise in_context(err, f"{source}: env {experiment['env']}") from None
