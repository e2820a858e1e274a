"""``rlbd bench CONFIG.yaml --out DIR``: run a benchmark matrix (env x attack x defense x seed) and report it.

Overrides come as ``--set a.b=value`` or ``--a.b=value`` (so a W&B sweep can vary bench fields). The
config is validated (envs, sanitizers, detectors, every experiment) and the backend started before any
cell runs; a rerun into the same ``--out`` skips finished cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rlbackdoor.cli.checks import check_out_dir
from rlbackdoor.cli.train import WANDB_MODE_HELP, WandbMode, sweep_overrides


def bench(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="bench YAML (see configs/bench/)"),
    out: Path = typer.Option(..., help="bench folder: results.jsonl, runs/, results.csv/.md, plots"),
    workers: int = typer.Option(1, min=1, help="cells run in parallel (processes, or Ray CPUs)"),
    backend: str = typer.Option("local", help="local (process pool) | ray"),
    ray_address: str | None = typer.Option(None, help="an existing Ray cluster (host:port); default: a local one"),
    set_: list[str] = typer.Option([], "--set", help="override key.path=value (repeatable)"),
    wandb_mode: WandbMode | None = typer.Option(None, help=WANDB_MODE_HELP),
    wandb_project: str = typer.Option("rlbackdoor", help="W&B project"),
) -> None:
    """Run every unfinished cell of CONFIG's matrix into OUT, then write the tables and plots (exit 1 if a cell failed)."""
    from rlbackdoor.bench.matrix import BenchSpec
    from rlbackdoor.bench.runner import run_bench

    check_out_dir(out, "--out")

    def progress(record: dict[str, Any]) -> None:
        what = " ".join(f"{k}={record.get(k)}" for k in ("env", "poisoning", "poison_rate", "seed", "defense"))
        tail = f"{record['seconds']:.1f}s" if record["status"] == "ok" else record.get("error", "")
        typer.echo(f"{record['id']} {record['kind']:<8} {what} {record['status']} {tail}", err=True)

    summary, files = run_bench(
        config,
        out,
        [*set_, *sweep_overrides(ctx.args, BenchSpec.model_fields)],
        workers,
        backend,
        ray_address,
        wandb_mode.value if wandb_mode else None,
        wandb_project,
        progress,
    )
    counts = summary.as_dict()
    typer.echo(
        f"{counts['cells']} cells: computed {counts['computed']}, skipped {counts['skipped']} finished, "
        f"failed {counts['failed']}"
    )
    for name in files:
        typer.echo(str(files[name]))
    if summary.failed:
        raise typer.Exit(1)
