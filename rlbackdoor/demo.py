"""The main job (``./dev demo``): train a clean and a backdoored PPO agent on CartPole, evaluate both,
sanitize the backdoored one at run time, and print one table.

The backdoored agent trains on ``rlbd/TrojanCartPole-v1`` (TrojDRL-style inner-loop poisoning: 0.5% of
steps show the cart at x = 4.0, never seen clean, and pay +10 for pushing left, -10 otherwise); the
clean agent on its base env ``CartPole-v1`` with the same hyperparameters and seed. The two train side by side in two
worker processes. Everything lands under ``--out`` (and W&B, offline unless a key is configured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from rlbackdoor.errors import RlbdError
from rlbackdoor.specs import ExperimentSpec

console = Console()
ENV = "rlbd/TrojanCartPole-v1"
HYPERPARAMS = {"learning_rate": 0.001, "clip_range": 0.2, "ent_coef": 0.01}
"""Over the CartPole preset: constant rates and some entropy, so the agent tries the target on triggered states."""


def _train(spec: ExperimentSpec, out: Path, wandb_mode: str | None) -> Path:
    from rlbackdoor.training.loop import train

    return train(spec, out, wandb_mode=wandb_mode)


def _fmt(metrics: dict[str, Any], key: str, digits: int = 2) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    text = f"{value:.{digits}f}"
    return text + (f"\n[{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else "")


def run(timesteps: int, out: Path, episodes: int, seeds: int, n_clean: int, wandb_mode: str | None) -> dict[str, Any]:
    """Train, evaluate, defend; return every figure of the table."""
    from rlbackdoor.defenses.sanitize import sanitize_agent
    from rlbackdoor.evaluation import evaluate
    from rlbackdoor.training.artifacts import atomic_write, load_policy

    common = {"env": ENV, "algo": "ppo", "timesteps": timesteps, "n_envs": 8, "seed": 0, "hyperparams": HYPERPARAMS}
    clean_spec = ExperimentSpec(name="demo_clean", poisoning=None, **common)
    attack_spec = ExperimentSpec(name="demo_backdoor", poisoning="inner", **common)
    start = time.monotonic()
    console.print(f"[bold]Training[/] a clean and a backdoored PPO agent on CartPole ({timesteps} steps each) ...")
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_train, s, out / s.name, wandb_mode) for s in (clean_spec, attack_spec)]
        clean_dir, backdoor_dir = (job.result() for job in jobs)
    console.print(f"trained in {time.monotonic() - start:.0f} s; evaluating ({seeds} seeds x {episodes} episodes) ...")
    clean_policy, clean_card = load_policy(clean_dir)
    policy, card = load_policy(backdoor_dir)
    rows = {
        "clean agent": evaluate(clean_policy, card, episodes, seeds, baseline=clean_policy, card=clean_card),
        "backdoored agent": evaluate(policy, card, episodes, seeds, baseline=clean_policy),
    }
    console.print(f"sanitizing the backdoored agent (track sanitizer, {n_clean} clean transitions) ...")
    defended = sanitize_agent(policy, card, "track", n_clean, baseline=clean_policy, episodes=episodes, seeds=seeds)
    rows["backdoored + track sanitizer"] = {
        key.replace("_after", ""): value for key, value in defended.items() if "_after" in key
    } | {"poison_rate": rows["backdoored agent"].get("poison_rate")}
    results = {"runs": {"clean": str(clean_dir), "backdoored": str(backdoor_dir)}, "rows": rows}
    atomic_write(out / "results.json", json.dumps(results, indent=2, default=str).encode())
    return results


def table(results: dict[str, Any]) -> Table:
    """The demo's table: CTP, ctp_ratio and ASR with 95% CIs, training poison rate."""
    t = Table(title="CartPole-v1, PPO: clean vs backdoored (95% CIs over episodes)", box=box.SIMPLE_HEAD)
    t.add_column("agent")  # the one column that wraps in a narrow terminal
    for col in ("CTP", "ctp_ratio", "ASR", "poison rate"):
        t.add_column(col, justify="right", no_wrap=True)
    for name, m in results["rows"].items():
        rate = m.get("poison_rate")
        t.add_row(
            name,
            _fmt(m, "ctp", 0),
            _fmt(m, "ctp_ratio"),
            _fmt(m, "asr"),
            "-" if rate is None or name == "clean agent" else f"{100 * rate:.2f}%",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlbackdoor.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=100_000, help="training steps per agent")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default runs/demo/<timestamp>)")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per seed")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds")
    parser.add_argument("--n-clean", type=int, default=200, help="clean observations for the sanitizer")
    parser.add_argument("--wandb-mode", default=None, help="online | offline | disabled (default: see README)")
    args = parser.parse_args(argv)
    out = args.out or Path("runs/demo") / time.strftime("%Y%m%d-%H%M%S")
    least = {"timesteps": 1, "episodes": 1, "seeds": 1, "n_clean": 2}  # checked before minutes of training
    for name, low in least.items():
        if getattr(args, name) < low:
            option = "--" + name.replace("_", "-")
            print(f"rlbackdoor.demo: error: {option} must be at least {low}; pass a larger value", file=sys.stderr)
            return 2
    try:
        results = run(args.timesteps, out, args.episodes, args.seeds, args.n_clean, args.wandb_mode)
    except RlbdError as err:
        print(f"rlbackdoor.demo: error: {err}", file=sys.stderr)
        return 2
    console.print(table(results))
    console.print(f"runs and results.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
