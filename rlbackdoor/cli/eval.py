"""``rlbd eval RUN_DIR``: CTP, ASR, untargeted effect and stealth of a trained run, with bootstrap 95% CIs.

The metrics go into the run's ``card.json`` (``metrics``, written atomically), to ``--json OUT`` and to
one W&B run (``job_type`` eval, summary keys ``eval/<metric>``, the updated card as an artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rlbackdoor.cli.checks import check_file_out, write_json_out
from rlbackdoor.cli.train import WANDB_MODE_HELP, WandbMode
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import MAX_EPISODES, MAX_SEED_COUNT, locate

HEADLINE = (
    "ctp",
    "ctp_ratio",
    "asr",
    "baseline_asr",
    "asr_raw",
    "triggered_return",
    "return_drop",
    "baseline_return_drop",
    "baseline_triggered_return",
    "random_return",
    "baseline_ctp",
)
"""The headline metrics, first in the tables in this order."""
COMPANIONS = ("_ci_low", "_ci_high", "_per_seed")
"""The suffixes of a metric's 95% CI and per-seed values, folded into its row."""

console = Console()


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def with_ci(metrics: dict[str, Any]) -> list[str]:
    """The metrics that have a 95% CI and per-seed values (all of :data:`COMPANIONS`): the :data:`HEADLINE` ones
    in that order, then the others (e.g. the team metrics of a multi-agent run) in the order of ``metrics``."""
    names = [name for name in metrics if all(f"{name}{s}" in metrics for s in COMPANIONS)]
    return sorted(names, key=lambda name: HEADLINE.index(name) if name in HEADLINE else len(HEADLINE))


def metrics_table(metrics: dict[str, Any]) -> Table:
    """A rich table: one row per metric with a 95% CI and per-seed values (see :func:`with_ci`), then the others."""
    table = Table("metric", "value", "95% CI", "per seed", title="evaluation")
    folded = with_ci(metrics)
    for name in folded:
        low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
        ci = "n/a" if low is None else f"[{_fmt(low)}, {_fmt(high)}]"
        table.add_row(name, _fmt(metrics[name]), ci, " ".join(_fmt(v) for v in metrics[f"{name}_per_seed"]))
    shown = {f"{n}{s}" for n in folded for s in ("", *COMPANIONS)}
    for name, value in metrics.items():
        if name not in shown:
            table.add_row(name, _fmt(value) if not isinstance(value, list) else " ".join(map(_fmt, value)), "", "")
    return table


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, defined entries of ``metrics`` (what W&B's summary gets)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_run(
    run_dir: Path = typer.Argument(..., help="a finished run directory (card.json, policy.safetensors)"),
    baseline: Path | None = typer.Option(None, help="a clean run of the same config, for ctp_ratio"),
    episodes: int = typer.Option(10, min=1, max=MAX_EPISODES, help="episodes per evaluation seed"),
    seeds: int = typer.Option(3, min=1, max=MAX_SEED_COUNT, help="evaluation seeds 0..N-1"),
    t0: int = typer.Option(0, min=0, help="step from which the trigger is on in triggered rollouts"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the metrics to this JSON file"),
    wandb_mode: WandbMode | None = typer.Option(None, help=WANDB_MODE_HELP),
    wandb_project: str = typer.Option("rlbackdoor", help="W&B project"),
) -> None:
    """Evaluate a run: print a table of metrics, store them in its card.json and log them to W&B."""
    from rlbackdoor import tracking
    from rlbackdoor.evaluation import evaluate_run
    from rlbackdoor.training.artifacts import CARD, read_card, write_json

    mode = tracking.resolve_mode(wandb_mode.value if wandb_mode else None)
    check_file_out(json_out, "--json")
    try:
        metrics = evaluate_run(run_dir, baseline, episodes=episodes, seeds=seeds, t0=t0)
    except SpecError as err:  # the card's attack does not fit its env: name the card and the attack block
        raise locate(err, str(run_dir / CARD), "attack.") from None
    card = read_card(run_dir)
    card["metrics"] = {**(card.get("metrics") or {}), **metrics}
    write_json_out(json_out, metrics)
    write_json(run_dir / CARD, card)
    console.print(metrics_table(metrics))

    name = str(card.get("name", run_dir.name))
    settings = {"run_dir": str(run_dir), "baseline": str(baseline) if baseline else None, "episodes": episodes}
    config = tracking.run_config(card, "eval", {**settings, "seeds": metrics["seeds"], "t0": t0})
    with tracking.wandb_run("eval", f"{name}-{run_dir.name}", config, mode, wandb_project, group=name) as tracker:
        tracker.summary(tracking.prefixed("eval", scalars(metrics)))
        rows = [[k, metrics[k], metrics[f"{k}_ci_low"], metrics[f"{k}_ci_high"]] for k in with_ci(metrics)]
        tracker.log_table("eval/metrics", ["metric", "value", "ci_low", "ci_high"], rows)
        tracker.log_artifact(run_dir / CARD, name=f"{name}-card", type="card")
