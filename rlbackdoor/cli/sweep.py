"""``rlbd sweep SWEEP.yaml``: run a W&B grid or random sweep without a W&B server (see :mod:`rlbackdoor.bench.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rlbackdoor.bench.sweep import MAX_RUNS
from rlbackdoor.cli.checks import check_out_dir
from rlbackdoor.errors import SpecError


def sweep(
    path: Path = typer.Argument(..., help="a W&B sweep file (see configs/sweeps/)"),
    count: int | None = typer.Option(
        None, min=1, max=MAX_RUNS, help="at most N runs (random sweeps need it, or run_cap)"
    ),
    out: Path | None = typer.Option(
        None, help="folder for runs.jsonl and run logs \\[default: runs/sweeps/<name>/<timestamp>-<pid>]"
    ),
    seed: int | None = typer.Option(None, min=0, help="seeds a random sweep's draws \\[default: 0]"),
    workers: int = typer.Option(1, min=1, help="runs at a time"),
    backend: str = typer.Option("local", help="local (process pool) | ray"),
    ray_address: str | None = typer.Option(None, help="an existing Ray cluster (host:port); default: a local one"),
) -> None:
    """Expand SWEEP's parameters and run its command once per point, each run logged offline in the sweep's group."""
    from rlbackdoor.bench.sweep import Sweep, run_sweep
    from rlbackdoor.training.loop import default_run_dir

    spec = Sweep(path)  # read and checked once, before anything is written
    if seed is not None and spec.method == "grid":
        raise SpecError("--seed seeds the draws of a random sweep; a grid sweep draws nothing: drop --seed")
    target = out or default_run_dir(spec.name, Path("runs") / "sweeps")
    check_out_dir(target, "--out" if out is not None else "sweep folder")
    if (target / "runs.jsonl").exists():
        raise SpecError(f"--out {target}: it holds the runs of an earlier sweep (runs.jsonl); pick another folder")

    def progress(record: dict[str, Any]) -> None:
        status = "ok" if record.get("returncode") == 0 else f"failed (exit {record.get('returncode')})"
        typer.echo(f"run {record['index']}: {record['command']}: {status}", err=True)

    records = run_sweep(spec, target, count, seed or 0, workers, backend, ray_address, progress)
    failed = sum(r.get("returncode") != 0 for r in records)
    typer.echo(f"{len(records)} runs, {failed} failed; log in {target / 'runs.jsonl'}")
    if failed:
        raise typer.Exit(1)
