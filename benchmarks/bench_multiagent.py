"""Multi-agent backdoors: attack quality, PolicyCleanse detection, and the wrapper's speed.

Parts (``--only a,b``; all by default):

- ``rps``       ``configs/experiments/rps_inner.yaml`` (action-sequence backdoor, the opponent's rock x3) and
  its clean twin ``rps_clean.yaml`` (same opponent and trigger sequences, clean rewards), ``--seeds`` each.
  Targets: the backdoored victim's triggered return drop >= 0.5, and its clean return >= 95% of the clean
  victims' (``ctp_ratio``).
- ``detect``    PolicyCleanse on the ``rps`` zoo (clean and backdoored victims): AUROC of its scores
  (scikit-learn) and the recovered trigger sequences.
- ``spread``    ``configs/experiments/spread_shared_inner.yaml`` (cooperative, parameter sharing) and its
  clean twin, one seed: team and victim returns, clean and triggered.
- ``speed``     ``BackdoorParallelEnv`` vs the bare parallel env, random actions, alternating in one
  process: steps per second and their ratio.

Metrics are :func:`rlbackdoor.multiagent.evaluation.evaluate`'s. Finished runs under
``benchmarks/results/runs/`` are reused (``--fresh`` retrains). Results merge into
``benchmarks/results/bench_multiagent.json`` part by part.

    .venv/bin/python benchmarks/bench_multiagent.py [--only rps,detect] [--seeds 3] [--quick] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from rlbackdoor.multiagent import get_parallel_spec, make_base_parallel, make_parallel
from rlbackdoor.multiagent.cleanse import policy_cleanse
from rlbackdoor.multiagent.evaluation import evaluate
from rlbackdoor.specs import ExperimentSpec, load_experiment
from rlbackdoor.training.artifacts import load_policy, read_card, write_json
from rlbackdoor.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "runs"
OUT = RESULTS / "bench_multiagent.json"
TARGETS = {"return_drop": 0.5, "ctp_ratio": 0.95}
PARTS = ("rps", "detect", "spread", "speed")


def finished_run(spec: ExperimentSpec, run_dir: Path, fresh: bool) -> Path:
    """Train ``spec`` into ``run_dir`` unless a finished run of the same config is there."""
    if not fresh and (run_dir / "card.json").exists() and read_card(run_dir)["config"] == spec.model_dump(mode="json"):
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    return train(spec, run_dir, wandb_mode="disabled", checkpoint_every=0)


def zoo(config: str, seeds: list[int], quick: bool, fresh: bool) -> list[tuple[str, int, Path]]:
    """Run dirs of ``config`` and its clean twin for every seed: ``(kind, seed, run_dir)``."""
    base = load_experiment(CONFIGS / f"{config}.yaml")
    if quick:
        base = base.model_copy(update={"timesteps": max(2048, base.timesteps // 20)})
    out = []
    for seed in seeds:
        for kind, poisoning in (("backdoored", base.poisoning), ("clean", None)):
            spec = base.model_copy(update={"seed": seed, "poisoning": poisoning, "name": f"{base.name}_{kind}"})
            run_dir = RUNS / ("quick" if quick else "full") / f"{spec.name}_s{seed}"
            start = time.monotonic()
            finished_run(spec, run_dir, fresh)
            print(f"  {spec.name} seed {seed}: {time.monotonic() - start:.0f} s", flush=True)
            out.append((kind, seed, run_dir))
    return out


def attack_quality(config: str, seeds: list[int], quick: bool, fresh: bool, episodes: int) -> dict[str, Any]:
    """Evaluate every victim of the zoo; compare the backdoored victims with the clean ones."""
    rows = []
    for kind, seed, run_dir in zoo(config, seeds, quick, fresh):
        policy, card = load_policy(run_dir)
        sharing = bool(card["config"].get("sharing"))
        metrics = evaluate(card["env"], policy, sharing=sharing, episodes=episodes, seed=1000)
        rows.append(
            {
                "kind": kind,
                "seed": seed,
                "run": str(run_dir.relative_to(ROOT)),
                **metrics,
                "train_poison_rate": card["train"]["poison_rate"],
                "train_seconds": card["train"]["seconds"],
            }
        )
    clean_ctp = statistics.mean(r["ctp"] for r in rows if r["kind"] == "clean")
    for row in rows:
        row["ctp_ratio"] = row["ctp"] / clean_ctp if clean_ctp > 0 else None
    backdoored = [r for r in rows if r["kind"] == "backdoored"]
    summary = {
        key: statistics.mean(r[key] for r in backdoored)
        for key in ("ctp", "triggered_return", "return_drop", "ctp_ratio", "asr", "train_poison_rate")
        if all(r.get(key) is not None for r in backdoored)
    }
    summary["clean_ctp"] = clean_ctp
    summary["clean_return_drop"] = statistics.mean(r["return_drop"] for r in rows if r["kind"] == "clean")
    return {"rows": rows, "summary": summary}


def detection(seeds: list[int], quick: bool, fresh: bool, episodes: int) -> dict[str, Any]:
    """PolicyCleanse on the rps zoo: one score per victim, AUROC over clean (0) vs backdoored (1)."""
    rows = []
    for kind, seed, run_dir in zoo("rps_inner", seeds, quick, fresh):
        policy, card = load_policy(run_dir)
        start = time.monotonic()
        found = policy_cleanse(card["env"], policy, timesteps=1536 if quick else 6144, episodes=episodes, seed=seed)
        rows.append(
            {
                "kind": kind,
                "seed": seed,
                "score": found.score,
                "random_return": found.random_return,
                "probed_return": found.probed_return,
                "trigger": list(found.trigger),
                "seconds": round(time.monotonic() - start, 1),
            }
        )
    labels = [int(r["kind"] == "backdoored") for r in rows]
    auroc = roc_auc_score(labels, [r["score"] for r in rows]) if 0 < sum(labels) < len(labels) else None
    sequence = get_parallel_spec("rlbd/TrojanRPS-v0").trigger.sequence  # type: ignore[union-attr]
    recovered = [r["trigger"] == sequence for r in rows if r["kind"] == "backdoored"]
    return {"rows": rows, "auroc": auroc, "trigger_recovered": sum(recovered) / max(1, len(recovered))}


def speed(steps: int, rounds: int = 5) -> dict[str, Any]:
    """Steps per second of the attacked and the bare parallel env, alternating rounds; median ratio."""
    out = {}
    for env_id in ("rlbd/TrojanRPS-v0", "rlbd/TrojanSpread-v0"):
        envs = {"bare": make_base_parallel(get_parallel_spec(env_id)), "attacked": make_parallel(env_id)}
        rates: dict[str, list[float]] = {name: [] for name in envs}
        for r in range(rounds):
            for name, env in envs.items():
                rng = np.random.default_rng(r)
                env.reset(seed=r)
                n = {agent: int(env.action_space(agent).n) for agent in env.possible_agents}
                start = time.perf_counter()
                for _ in range(steps):
                    if not env.agents:
                        env.reset()
                    env.step({agent: np.int64(rng.integers(n[agent])) for agent in env.agents})
                rates[name].append(steps / (time.perf_counter() - start))
        ratios = [a / b for a, b in zip(rates["attacked"], rates["bare"], strict=True)]
        out[env_id] = {
            "bare_steps_per_s": statistics.median(rates["bare"]),
            "attacked_steps_per_s": statistics.median(rates["attacked"]),
            "ratio": statistics.median(ratios),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts among {', '.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument(
        "--quick", action="store_true", help="tiny training budgets: checks the script, not the targets"
    )
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already exist")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose among {', '.join(PARTS)}")
    seeds = list(range(args.seeds))
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()}
    for part in parts:
        print(f"{part}:", flush=True)
        start = time.monotonic()
        if part == "rps":
            result = attack_quality("rps_inner", seeds, args.quick, args.fresh, args.episodes)
            summary = result["summary"]
            result["targets"] = TARGETS
            result["met"] = {
                "return_drop": summary["return_drop"] >= TARGETS["return_drop"],
                "ctp_ratio": summary.get("ctp_ratio", 0.0) >= TARGETS["ctp_ratio"],
            }
            print(f"  {json.dumps(summary)}\n  met: {result['met']}")
        elif part == "detect":
            result = detection(seeds, args.quick, args.fresh, args.episodes)
            print(f"  auroc {result['auroc']}, trigger recovered in {result['trigger_recovered']:.0%} of backdoored")
        elif part == "spread":
            result = attack_quality("spread_shared_inner", seeds[:1], args.quick, args.fresh, args.episodes)
            print(f"  {json.dumps(result['summary'])}")
        else:
            result = speed(500 if args.quick else 5000)
            for env_id, row in result.items():
                print(f"  {env_id}: attacked / bare steps per second = {row['ratio']:.2f}")
        results[part] = {**result, "quick": args.quick, "seconds": round(time.monotonic() - start, 1)}
        write_json(OUT, results)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
