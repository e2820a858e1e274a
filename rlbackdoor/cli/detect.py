"""``rlbd detect TARGET --detector NAME``: score a run directory or every agent of a zoo; ``--list`` the detectors."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rlbackdoor.cli.checks import check_file_out, check_single_agent_runs, write_json_out
from rlbackdoor.cli.train import WANDB_MODE_HELP, WandbMode
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import MAX_CLEAN, apply_overrides

console = Console()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def list_detectors() -> None:
    """Print every detector with its levels and the access it needs."""
    from rlbackdoor.defenses.detectors import DETECTORS

    table = Table("detector", "levels", "access", "what it does")
    for name, cls in DETECTORS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, ", ".join(cls.levels), ", ".join(a.value for a in cls.access), doc)
    console.print(table)


def detect(
    target: Path | None = typer.Argument(None, help="a run directory or a zoo directory (manifest.json)"),
    detector: str | None = typer.Option(None, "--detector", "-d", help="detector name (see --list)"),
    list_: bool = typer.Option(False, "--list", help="list the detectors and the access each needs"),
    param: list[str] = typer.Option([], "--param", help="detector parameter key=value (repeatable)"),
    n_clean: int = typer.Option(1024, min=16, max=MAX_CLEAN, help="clean observations per fit"),
    seed: int = typer.Option(0, min=0, help="seeds rollouts, subsets and the detector"),
    inputs: Path | None = typer.Option(
        None, help="trajectory .npz whose steps an input-level detector scores (run dir)"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the full report as JSON here"),
    wandb_mode: WandbMode | None = typer.Option(None, help=WANDB_MODE_HELP),
) -> None:
    """Run a detector on TARGET: per-model scores, and for a zoo AUROC, cross-entropy and ROC."""
    if list_:
        list_detectors()
        return
    if target is None or detector is None:
        raise SpecError("give TARGET and --detector NAME (rlbd detect --list shows the detectors)")
    from rlbackdoor.defenses.detectors import detect as run
    from rlbackdoor.defenses.detectors import log_report

    check_file_out(json_out, "--json")
    check_single_agent_runs(target, "detect")
    params = apply_overrides({}, param, "--param")
    report = run(target, detector, params, n_clean=n_clean, seed=seed, inputs=inputs)
    payload = report.to_json()
    write_json_out(json_out, payload)
    config = {"detector": detector, "target": str(target), "params": params, "n_clean": n_clean, "seed": seed}
    log_report(report, config, wandb_mode.value if wandb_mode else None)
    table = Table("agent", "backdoored", "score", "P(backdoored)", "population", "input AUROC", "seconds")
    for m in report.models:
        input_auroc = (m.inputs or {}).get("auroc")
        label = "?" if m.backdoored is None else str(m.backdoored)
        table.add_row(
            Path(m.path).name,
            label,
            _fmt(m.score),
            _fmt(m.probability),
            _fmt(m.population_score),
            _fmt(input_auroc),
            f"{m.seconds:.1f}",
        )
    console.print(table)
    if report.zoo:
        line = f"model-level AUROC {_fmt(report.auroc)}  cross-entropy {_fmt(report.cross_entropy)}"
        if report.population:
            line += f"  |  population AUROC {_fmt(report.population['auroc'])}  cross-entropy {_fmt(report.population['cross_entropy'])}"
        console.print(line)
    if report.input_summary:
        console.print(
            "input level: "
            + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.input_summary.items())
        )
    if report.note:
        console.print(report.note)
    console.print(f"seconds per model {payload['seconds_per_model']:.1f}")
