"""Quality of poisoned training (ASR, ctp_ratio at a poison rate) and poisoned vs clean PPO training throughput.

Parts (``--only a,b``; all by default):

- ``cartpole_inner``  ``configs/experiments/cartpole_inner.yaml`` (inner loop, static rewards), 3 seeds:
  ASR >= 0.95 and ctp_ratio >= 0.95 at a training poison rate <= 0.5%.
- ``cartpole_outer``  ``configs/experiments/cartpole_outer.yaml`` (outer loop, SleeperNets dynamic rewards),
  3 seeds: ASR >= 0.95 and ctp_ratio >= 0.95 at a poison rate <= 0.1%.
- ``lavagap_inner``, ``lavagap_outer``  ``configs/experiments/lavagap_*.yaml`` (MiniGrid patch trigger, inner loop
  with static rewards, outer loop with dynamic ones), 3 seeds: ASR >= 0.9 and ctp_ratio >= 0.9 at a poison
  rate <= 1%.
- ``throughput``      PPO on CartPole, clean vs inner- and outer-loop poisoned, alternating in one process:
  median poisoned / clean training steps per CPU second >= 0.95.

Each attack run is compared with a clean run of the same config (``poisoning: null``, same seed), which
is also scored for ASR (``clean_asr``: what the trigger does to an agent that never saw poison).
Metrics are :func:`rlbackdoor.evaluation.evaluate.evaluate_run`'s; ``ctp_ratio`` there is
``(CTP - R_random) / (CTP_clean - R_random)``, ``ctp_ratio_plain`` is ``CTP / CTP_clean``. A part's
verdict takes the mean ASR over seeds and the ctp_ratio of CTPs pooled over seeds (a seed whose clean
twin happened to fail does not inflate it), at the largest training poison rate of its seeds, and needs every
clean twin healthy: above random by at least ``HEALTHY`` of the best clean twin's margin (a clean twin that
failed, e.g. a deterministic LavaGap policy looping on one of the three layouts, would hide the same failure
in its poisoned run). Finished runs
under ``benchmarks/results/runs/`` are reused (``--fresh`` retrains). Results merge into
``benchmarks/results/bench_attacks.json`` part by part.

    .venv/bin/python benchmarks/bench_attacks.py [--only cartpole_inner,throughput] [--seeds 3] [--quick] [--fresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlbackdoor.evaluation.evaluate import evaluate, evaluate_run
from rlbackdoor.specs import ExperimentSpec, load_experiment
from rlbackdoor.training import presets
from rlbackdoor.training.artifacts import load_policy, read_card, write_json
from rlbackdoor.training.envs import preset_keys, run_attack
from rlbackdoor.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "runs"
QUALITY = {
    "cartpole_inner": {"config": "cartpole_inner", "asr": 0.95, "ctp_ratio": 0.95, "max_poison_rate": 0.005},
    "cartpole_outer": {"config": "cartpole_outer", "asr": 0.95, "ctp_ratio": 0.95, "max_poison_rate": 0.001},
    "lavagap_inner": {"config": "lavagap_inner", "asr": 0.9, "ctp_ratio": 0.9, "max_poison_rate": 0.01},
    "lavagap_outer": {"config": "lavagap_outer", "asr": 0.9, "ctp_ratio": 0.9, "max_poison_rate": 0.01},
}
HEALTHY = 0.9
"""A clean twin is healthy when its CTP above random is at least this fraction of the best seed's."""
THROUGHPUT_TARGET = 0.95
PARTS = (*QUALITY, "throughput")


def clean_twin(spec: ExperimentSpec) -> ExperimentSpec:
    """The clean run of the same config: same env (the attack's base env), algo, hyperparameters and seed."""
    return spec.model_copy(update={"name": f"{spec.name}_clean", "poisoning": None})


def hyperparams_of(spec: ExperimentSpec) -> dict[str, Any]:
    """The resolved hyperparameters of a run (the preset in ``agents/`` with the config's on top)."""
    return presets.resolve(spec.algo, preset_keys(spec, run_attack(spec)), spec.hyperparams)


def config_of(spec: ExperimentSpec) -> dict[str, Any]:
    """The config as a card records it."""
    return spec.model_dump(mode="json")


def clean_key(spec: ExperimentSpec) -> str:
    """What a clean twin's training depends on: attacks on the same base env share one clean run per seed."""
    config = {**config_of(spec), "hyperparams": hyperparams_of(spec)}
    for key in ("name", "outer_reward", "poisoning"):
        config.pop(key)
    if config["attack"] is not None:
        config["attack"] = {k: config["attack"][k] for k in ("base", "base_kwargs", "base_wrappers")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def finished_run(
    spec: ExperimentSpec, run_dir: Path, fresh: bool, same: Callable[[ExperimentSpec], Any] = config_of
) -> Path:
    """Train ``spec`` into ``run_dir`` unless a finished run is there with the same ``same(spec)`` and hyperparameters.

    The card's recorded hyperparameters are compared, so a preset changed since makes the run stale.
    """
    if not fresh and (run_dir / "card.json").exists():
        card = read_card(run_dir)
        trained = ExperimentSpec.model_validate(card["config"])
        if same(trained) == same(spec) and card["hyperparams"] == hyperparams_of(spec):
            return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    return train(spec, run_dir, wandb_mode="disabled", checkpoint_every=0)


def quality(part: str, seeds: list[int], quick: bool, fresh: bool, episodes: int) -> dict[str, Any]:
    """Train an attack config and its clean twin per seed; evaluate ASR, CTP and ctp_ratio."""
    target = QUALITY[part]
    base = load_experiment(CONFIGS / f"{target['config']}.yaml")
    if quick:
        base = base.model_copy(update={"timesteps": max(2048, base.timesteps // 10)})
    rows = []
    for seed in seeds:
        spec = base.model_copy(update={"seed": seed})
        tag = "quick" if quick else "full"
        start = time.monotonic()
        run = finished_run(spec, RUNS / tag / part / f"seed{seed}", fresh)
        twin = clean_twin(spec)
        clean = finished_run(twin, RUNS / tag / f"clean-{clean_key(twin)}" / f"seed{seed}", fresh, clean_key)
        metrics = evaluate_run(run, clean, episodes=episodes, seeds=3)
        card = read_card(run)
        clean_policy, _ = load_policy(clean)
        clean_metrics = evaluate(clean_policy, card, episodes=episodes, seeds=3)
        rows.append(
            {
                "seed": seed,
                "asr": metrics["asr"],
                "asr_raw": metrics["asr_raw"],
                "ctp": metrics["ctp"],
                "baseline_ctp": metrics["baseline_ctp"],
                "random_return": metrics["random_return"],
                "ctp_ratio": metrics["ctp_ratio"],
                "ctp_ratio_plain": metrics["ctp"] / metrics["baseline_ctp"] if metrics["baseline_ctp"] else None,
                "clean_asr": clean_metrics["asr"],
                "poison_rate": card["train"]["poison_rate"],
                "steps": card["train"]["steps"],
                "train_seconds": card["train"]["seconds"],
                "wall_seconds": round(time.monotonic() - start, 1),
            }
        )
        print(f"  {part} seed {seed}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in rows[-1].items() if k != "seed"))
    best = max(r["baseline_ctp"] - r["random_return"] for r in rows)
    for r in rows:
        r["baseline_healthy"] = bool(r["baseline_ctp"] - r["random_return"] >= HEALTHY * best)
    ctp, base_ctp, rand = (np.mean([r[k] for r in rows]) for k in ("ctp", "baseline_ctp", "random_return"))
    summary = {
        "asr": float(np.mean([r["asr"] for r in rows])),
        "clean_asr": float(np.mean([r["clean_asr"] for r in rows if r["clean_asr"] is not None])),
        # CTP of the poisoned agents over CTP of their clean twins, pooled over seeds (episodes weigh equally)
        "ctp_ratio": float((ctp - rand) / (base_ctp - rand)),
        "ctp_ratio_plain": float(ctp / base_ctp),
        "ctp_ratio_per_seed_mean": float(np.mean([r["ctp_ratio"] for r in rows])),
        "poison_rate_max": max(r["poison_rate"] for r in rows),
        "unhealthy_baselines": [r["seed"] for r in rows if not r["baseline_healthy"]],
    }
    met = summary["asr"] >= target["asr"] and summary["ctp_ratio"] >= target["ctp_ratio"]
    met = met and summary["poison_rate_max"] <= target["max_poison_rate"] and not summary["unhealthy_baselines"]
    return {
        "config": base.model_dump(mode="json"),
        "targets": {k: v for k, v in target.items() if k not in ("config", "seeds")},
        "mean": summary,
        "min_asr": min(r["asr"] for r in rows),
        "min_ctp_ratio": min(r["ctp_ratio"] for r in rows),
        "seeds": rows,
        "met": None if quick else bool(met),
    }


def throughput(repeats: int, steps: int) -> dict[str, Any]:
    """Steps per CPU second of clean, inner- and outer-loop PPO on CartPole, alternating; median ratios to clean.

    CPU time of the training process (one torch thread) rather than wall time: other jobs on a shared
    machine slow the wall clock of whichever run they overlap.
    """
    inner = load_experiment(CONFIGS / "cartpole_inner.yaml").model_copy(update={"timesteps": steps})
    outer = load_experiment(CONFIGS / "cartpole_outer.yaml").model_copy(update={"timesteps": steps})
    specs = {"clean": clean_twin(inner), "inner": inner, "outer": outer}
    rates: dict[str, list[float]] = {name: [] for name in specs}
    for r in range(repeats):
        order = list(specs) if r % 2 == 0 else list(reversed(specs))
        for name in order:
            run = RUNS / "throughput" / name
            shutil.rmtree(run, ignore_errors=True)
            card = read_card(train(specs[name], run, wandb_mode="disabled", checkpoint_every=0))
            rates[name].append(card["train"]["steps_per_cpu_s"])
    ratios = {
        name: statistics.median(a / c for a, c in zip(rates[name], rates["clean"], strict=True))
        for name in ("inner", "outer")
    }
    print(
        "  throughput steps per CPU second: "
        + ", ".join(f"{k}={[round(v) for v in vals]}" for k, vals in rates.items())
    )
    print("  throughput ratios to clean: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    return {
        "steps": steps,
        "repeats": repeats,
        "steps_per_cpu_s": rates,
        "ratio": ratios,
        "target": THROUGHPUT_TARGET,
        "met": min(ratios.values()) >= THROUGHPUT_TARGET,
    }


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per quality part")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per evaluation seed (3 seeds)")
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the steps, 1 seed: a smoke run, targets not judged"
    )
    parser.add_argument("--fresh", action="store_true", help="retrain runs found under benchmarks/results/runs")
    parser.add_argument("--repeats", type=int, default=3, help="throughput: alternating repetitions")
    parser.add_argument("--steps", type=int, default=30_000, help="throughput: steps per training")
    args = parser.parse_args()
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    path = RESULTS / "bench_attacks.json"
    results = json.loads(path.read_text()) if path.exists() else {"parts": {}}
    results["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": 1,
    }
    for part in parts:
        print(f"{part}:")
        start = time.monotonic()
        if part == "throughput":
            out = throughput(2 if args.quick else args.repeats, args.steps // 10 if args.quick else args.steps)
        else:
            seeds = list(range(1 if args.quick else args.seeds))
            out = quality(part, seeds, args.quick, args.fresh, 3 if args.quick else args.episodes)
        out["quick"], out["seconds"] = args.quick, round(time.monotonic() - start, 1)
        results["parts"][part] = out
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        verdict = {True: "MET", False: "NOT MET", None: "(quick: not judged)"}[out["met"]]
        summary = out.get("mean", out.get("ratio"))
        print(f"  -> {verdict}: {json.dumps(summary)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
