"""``rlbd envs``: list the registered backdoor envs and show one spec with its stealth figures."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Column, Table

from rlbackdoor.attack import Attack, make_base_env, sample_observations
from rlbackdoor.multiagent import get_parallel_spec, parallel_env_specs
from rlbackdoor.multiagent.registry import is_multiagent
from rlbackdoor.registry import FACTORY_ID, env_specs, get_env_spec
from rlbackdoor.specs import AttackSpec

app = typer.Typer(help="Registered backdoor environments.", no_args_is_help=True)
console = Console()

FACTORY_NOTE = (
    "gymnasium.make('rlbackdoor:rlbd/Backdoor-v0', env_id=<a Gymnasium id>, trigger={...}, schedule={...}, "
    "payload={...}) attacks any env: the attack fields of a spec in envs/ as keyword arguments"
)


@app.command("list")
def list_envs() -> None:
    """Print every registered id with its base env, trigger, schedule and payload; multi-agent ids are marked."""
    columns = [Column(name, no_wrap=True) for name in ("id", "trigger", "schedule", "payload")]
    table = Table(*columns[:1], Column("base", overflow="fold"), *columns[1:], box=None, pad_edge=False)
    table.caption = "* multi-agent (a PettingZoo parallel env)"
    for env_id, spec in env_specs().items():
        table.add_row(env_id, spec.base, spec.trigger.kind, spec.schedule.kind, spec.payload.kind)
    for env_id, ma_spec in parallel_env_specs().items():
        base = f"{ma_spec.base.rsplit('.', 1)[-1]} *"
        table.add_row(env_id, base, ma_spec.trigger.kind, ma_spec.schedule.kind, ma_spec.payload.kind)
    table.add_row(FACTORY_ID, "env_id=...", "kwargs", "kwargs", "kwargs")
    console.print(table)


def stealth_report(env_id: str, n: int = 512) -> dict[str, float]:
    """Stealth figures of a registered env's trigger over ``n`` clean random-policy observations."""
    spec = get_env_spec(env_id)
    env = make_base_env(spec)
    attack = Attack.for_env(spec, env)
    if attack.obs_trigger is None:
        return {"l0": float(len(spec.trigger.sequence)), "note": "action-sequence trigger: L0 counts actions"}  # type: ignore[union-attr]
    return attack.obs_trigger.stealth(sample_observations(env, n, spec.seed))


@app.command("show")
def show(
    env_id: str = typer.Argument(..., help="a registered id, e.g. rlbd/TrojanCartPole-v0 or rlbd/TrojanRPS-v0"),
) -> None:
    """Print a spec's resolved fields and its trigger's stealth figures (L0/L2/Linf, absolute and relative);
    a multi-agent spec's figures are per victim (an action-sequence trigger's L0 counts its actions)."""
    if env_id.removeprefix("rlbackdoor:") == FACTORY_ID:  # no spec of its own: its kwargs are one
        fields = [name for name in AttackSpec.model_fields if name != "base"]
        console.print_json(json.dumps({"id": FACTORY_ID, "kwargs": ["env_id", *fields], "note": FACTORY_NOTE}))
        return
    if is_multiagent(env_id):
        from rlbackdoor.multiagent.evaluation import stealth

        ma_spec = get_parallel_spec(env_id)
        console.print_json(json.dumps({**ma_spec.model_dump(mode="json"), "stealth": stealth(env_id)}))
        return
    spec = get_env_spec(env_id)
    console.print_json(json.dumps({**spec.model_dump(mode="json"), "stealth": stealth_report(env_id)}))
