"""``rlbd cleanse RUN...``: PolicyCleanse on multi-agent victims: scores, recovered triggers, AUROC over a zoo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rlbackdoor.cli.train import WANDB_MODE_HELP, WandbMode
from rlbackdoor.specs import MAX_EPISODES, MAX_TIMESTEPS

console = Console()


def cleanse(
    runs: list[Path] = typer.Argument(..., help="finished multi-agent run directories (clean and backdoored victims)"),
    k: int = typer.Option(3, min=1, max=1000, help="probing steps (at least the trigger's length)"),
    window: int = typer.Option(6, min=1, max=1000, help="post-probe steps over which the victim's return is scored"),
    timesteps: int = typer.Option(6144, min=1, max=MAX_TIMESTEPS, help="PPO steps of each probing opponent"),
    episodes: int = typer.Option(
        50, min=1, max=MAX_EPISODES, help="episodes to score the random and the learned probe"
    ),
    seed: int = typer.Option(0, min=0, help="seeds the probers and the episodes"),
    prober: str | None = typer.Option(
        None, help="the seat the probing opponent plays \\[default: the other agent of a two-player env]"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report to this JSON file"),
    wandb_mode: WandbMode | None = typer.Option(None, help=WANDB_MODE_HELP),
) -> None:
    """Train a probing opponent against each frozen victim; a collapse of its return flags a backdoor."""
    from rlbackdoor import tracking
    from rlbackdoor.cli.checks import check_file_out, write_json_out
    from rlbackdoor.multiagent.cleanse import cleanse_runs

    options = {"k": k, "window": window, "timesteps": timesteps, "episodes": episodes, "seed": seed, "prober": prober}
    check_file_out(json_out, "--json")
    report = cleanse_runs(runs, **options)
    write_json_out(json_out, report)
    table = Table("run", "backdoored", "score", "return (random probe)", "return (learned probe)", "trigger", "seconds")
    for row in report["rows"]:
        table.add_row(
            Path(row["run"]).name,
            str(row["backdoored"]),
            f"{row['score']:.3f}",
            f"{row['random_return']:.3f}",
            f"{row['probed_return']:.3f}",
            " ".join(map(str, row["trigger"])) if row["score"] > 0 else "-",  # no collapse: no trigger found
            f"{row['seconds']:.1f}",
        )
    console.print(table)
    if report["auroc"] is not None:
        console.print(f"AUROC {report['auroc']:.3f}")
    config = {"detector": "policycleanse", "env": report["env"], "runs": [str(r) for r in runs], **options}
    mode = wandb_mode.value if wandb_mode else None
    with tracking.wandb_run("detect", f"detect-policycleanse-{len(runs)}", config, mode=mode) as tracker:
        summary = {"seconds_per_model": sum(r["seconds"] for r in report["rows"]) / max(1, len(report["rows"]))}
        if report["auroc"] is not None:
            summary["auroc"] = report["auroc"]
        tracker.summary(tracking.prefixed("detect", summary))
        columns = ["run", "backdoored", "score", "random_return", "probed_return", "trigger"]
        rows = [[r[c] if c != "trigger" else " ".join(map(str, r[c])) for c in columns] for r in report["rows"]]
        tracker.log_table("detect/policycleanse", columns, rows)
