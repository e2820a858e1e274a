"""``rlbd zoo CONFIG.yaml --out DIR``: train a population of clean and backdoored agents and write its manifest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rlbackdoor.cli.checks import check_out_dir
from rlbackdoor.cli.train import WandbMode

console = Console(stderr=True)


def zoo(
    config: Path = typer.Argument(..., help="zoo YAML (see configs/zoo/)"),
    out: Path = typer.Option(..., help="zoo directory (finished agents in it are kept)"),
    workers: int = typer.Option(1, min=1, help="training processes, one thread each"),
    set_: list[str] = typer.Option([], "--set", help="override key.path=value (repeatable)"),
    wandb_mode: WandbMode | None = typer.Option(
        None, help="W&B mode of every training run \\[default: see rlbd train]"
    ),
) -> None:
    """Train CONFIG's agents (half clean, half backdoored) under OUT and write OUT/manifest.json."""
    from rlbackdoor.zoo import build_zoo, load_zoo

    check_out_dir(out, "--out")
    spec = load_zoo(config, set_)
    agents = build_zoo(
        spec,
        out,
        workers=workers,
        wandb_mode=wandb_mode.value if wandb_mode else None,
        on_done=lambda name: console.print(f"[green]done[/] {name}"),
    )
    table = Table("agent", "backdoored", "trigger", "target")
    for agent in agents:
        attack = agent.attack or {}
        trigger = attack.get("trigger", {})
        target = attack.get("payload", {}).get("target_action", "")
        table.add_row(agent.path.name, str(agent.backdoored), trigger.get("kind", ""), str(target))
    console.print(table)
    typer.echo(str(out / "manifest.json"))
