"""Multi-agent backdoors: attack quality, PolicyCleanse detection, and the wrapper's speed.

Parts (``--only a,b``; all by default):

- ``rps``       ``configs/experiments/rps_inner.yaml`` (action-sequence backdoor, the opponent's rock x3) and
  its clean twin (``poisoning: null``: the same opponent and trigger sequences, clean rewards), ``--seeds``
  each. Targets: the backdoored victims' mean ``return_drop`` >= 0.5 and mean ``ctp_ratio`` >= 0.95 (CTP
  against the clean twin of the same seed, both relative to a random victim).
- ``detect``    PolicyCleanse on the ``rps`` zoo (clean and backdoored victims): AUROC of its scores
  (scikit-learn) and the recovered trigger sequences.
- ``spread``    ``configs/experiments/spread_shared_inner.yaml`` (cooperative, parameter sharing) and its
  clean twin, one seed: team and victim returns, clean and triggered.
- ``speed``     ``BackdoorParallelEnv`` vs the bare parallel env, random actions, alternating in one
  process: steps per second and their ratio.

Metrics are :func:`rlbackdoor.multiagent.evaluation.evaluate`'s (3 evaluation seeds x ``--episodes``).
Finished runs under
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


def zoo(config: str, seeds: list[int], quick: bool, fresh: bool) -> list[tuple[int, Path, Path]]:
    """Run dirs of ``config`` and of its clean twin for every seed: ``(seed, backdoored, clean)``."""
    base = load_experiment(CONFIGS / f"{config}.yaml")
    if quick:
        base = base.model_copy(update={"timesteps": max(2048, base.timesteps // 20)})
    out = []
    for seed in seeds:
        dirs = []
        for kind, poisoning in (("backdoored", base.poisoning), ("clean", None)):
            spec = base.model_copy(update={"seed": seed, "poisoning": poisoning, "name": f"{base.name}_{kind}"})
            run_dir = RUNS / ("quick" if quick else "full") / f"{spec.name}_s{seed}"
            start = time.monotonic()
            dirs.append(finished_run(spec, run_dir, fresh))
            print(f"  {spec.name} seed {seed}: {time.monotonic() - start:.0f} s", flush=True)
        out.append((seed, dirs[0], dirs[1]))
    return out


HEADLINE = ("ctp", "ctp_ratio", "triggered_return", "return_drop", "asr", "team_ctp", "team_return_drop")


def attack_quality(config: str, seeds: list[int], quick: bool, fresh: bool, episodes: int) -> dict[str, Any]:
    """Evaluate each backdoored victim against its clean twin (``ctp_ratio``), and the clean twin itself."""
    rows = []
    for seed, backdoored, clean in zoo(config, seeds, quick, fresh):
        policy, card = load_policy(backdoored)
        reference, _ = load_policy(clean)
        sharing = bool(card["config"].get("sharing"))
        for kind, agent, baseline in (("backdoored", policy, reference), ("clean", reference, None)):
            metrics = evaluate(card["env"], agent, sharing=sharing, episodes=episodes, seeds=3, baseline=baseline)
            run = backdoored if kind == "backdoored" else clean
            rows.append(
                {
                    "kind": kind,
                    "seed": seed,
                    "run": str(run.relative_to(ROOT)),
                    "train_poison_rate": read_card(run)["train"]["poison_rate"],
                    **{k: v for k, v in metrics.items() if not k.endswith("_per_seed")},
                }
            )
    summary = {}
    for kind in ("backdoored", "clean"):
        for key in HEADLINE:
            values = [r[key] for r in rows if r["kind"] == kind and r.get(key) is not None]
            if values:
                summary[f"{kind}_{key}"] = statistics.mean(values)
    return {"rows": rows, "summary": summary}


def detection(seeds: list[int], quick: bool, fresh: bool, episodes: int) -> dict[str, Any]:
    """PolicyCleanse on the rps zoo: one score per victim, AUROC over clean (0) vs backdoored (1)."""
    rows = []
    victims = [
        (kind, seed, run)
        for seed, *runs in zoo("rps_inner", seeds, quick, fresh)
        for kind, run in zip(("backdoored", "clean"), runs, strict=True)
    ]
    for kind, seed, run_dir in victims:
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
    parser.add_argument("--episodes", type=int, default=20, help="episodes per evaluation seed")
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
                key: summary.get(f"backdoored_{key}", -np.inf) >= target for key, target in TARGETS.items()
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
