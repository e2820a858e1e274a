"""Sanitization quality: ASR and CTP of backdoored agents before and after run-time sanitization, against n.

For every registered single-agent env with a targeted observation trigger (and the in-distribution
one, to show where sanitization fails), trains a backdoored PPO agent (inner loop, the registered
attack) and a clean agent of the same config (same pipeline, the attack's rate set to 0), or reuses
them from ``--runs``. Then fits each sanitizer on the backdoored agent's own clean rollouts and
reports ASR, CTP and ctp_ratio before and after, for a sweep of n.

The ``train_inner`` / ``train_outer`` parts train CartPole PPO at a 1% poison rate (the
``configs/experiments/cartpole_{inner,outer}.yaml`` attacks) with and without the training-time
filter (``sanitize: impute``), and a clean twin per seed; they report the agents' ASR and ctp_ratio
and the filter's precision and recall against the attacker's ground truth. Writes
``benchmarks/results/bench_sanitize.json``.

    .venv/bin/python benchmarks/bench_sanitize.py [--only cartpole,lavagap,train_inner,train_outer] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).parents[1] / "configs" / "experiments"

INDIST_METHODS = {
    "subspace": [12, 200],
    "support": [14, 200, 1000],
    "impute": [14, 200, 1000],
    "track": [14, 200, 1000],
}
"""What the in-distribution cases try: every run-time method, from few clean observations to many."""

CASES: dict[str, dict[str, Any]] = {
    "cartpole": {
        "env": "rlbd/TrojanCartPole-v1",
        "timesteps": 100_000,
        "hyperparams": {"learning_rate": 0.001, "clip_range": 0.2, "ent_coef": 0.01},
        "methods": {
            "track": [10, 20, 50, 200],
            "impute": [10, 20, 50, 100, 200],
            "support": [10, 50, 200],
            "subspace": [8, 50],
        },
    },
    "acrobot": {
        "env": "rlbd/TrojanAcrobot-v1",
        "timesteps": 100_000,
        "methods": {
            "track": [8, 10, 14, 20, 50, 200],
            "impute": [8, 10, 14, 20, 50, 200],
            "support": [14, 200],
            "subspace": [12, 200],
        },
    },
    "lavagap": {
        "env": "rlbd/TrojanLavaGap-v0",
        "timesteps": 200_000,
        "methods": {"subspace": [64, 128, 294], "support": [294]},
    },
    "acrobot_indist": {
        "env": "rlbd/TrojanAcrobotInDist-v0",
        "timesteps": 200_000,
        # the registered +-1 leaves no backdoor (ASR 0.003 at 200k); +-3 gives 0.16 and +-5 0.54 at 100k, +-7 and
        # +-10 collapse the agent onto the target action
        "reward": {"hit": 5.0, "miss": -5.0},
        "methods": INDIST_METHODS,
    },
    "acrobot_indist_v1": {
        "env": "rlbd/TrojanAcrobotInDist-v1",
        "timesteps": 200_000,
        "methods": INDIST_METHODS,
    },
}


TRAINING: dict[str, dict[str, Any]] = {
    "train_inner": {"config": "cartpole_inner.yaml", "rate": ["attack.schedule.budget=1000"]},
    "train_outer": {"config": "cartpole_outer.yaml", "rate": ["attack.schedule.rate=0.01"]},
}
"""Training under sanitization at 1% poisoned steps (inner: 1000 of 100k; outer: 1% of collected steps)."""
SANITIZE = "impute"


def specs(case: str) -> tuple[Any, Any]:
    """The backdoored run (registered attack, inner loop) and its clean twin (same attack at rate 0)."""
    from rlbackdoor.registry import get_env_spec
    from rlbackdoor.specs import ExperimentSpec

    cfg = CASES[case]
    common = {"algo": "ppo", "timesteps": cfg["timesteps"], "n_envs": 8, "seed": 0, "poisoning": "inner"}
    common["hyperparams"] = cfg.get("hyperparams", {})
    attack = get_env_spec(cfg["env"]).model_dump(mode="json", exclude={"id", "description"})
    if "reward" in cfg:  # the registered attack with a stronger payload, inline
        attack["payload"]["reward"] = cfg["reward"]
        backdoor = ExperimentSpec(name=f"{case}_backdoor", env=attack["base"], attack=attack, **common)
    else:
        backdoor = ExperimentSpec(name=f"{case}_backdoor", env=cfg["env"], **common)
    attack["schedule"] = {"kind": "rate", "rate": 0.0}
    clean = ExperimentSpec(name=f"{case}_clean", env=attack["base"], attack=attack, **common)
    return backdoor, clean


def train_once(spec: Any, runs: Path) -> str:
    """Train ``spec`` into ``runs/<name>`` unless a finished run of the same config is there."""
    from rlbackdoor.training.artifacts import read_card
    from rlbackdoor.training.loop import train

    run_dir = runs / spec.name
    if (run_dir / "card.json").exists() and read_card(run_dir)["config"] == spec.model_dump(mode="json"):
        return str(run_dir)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    return str(train(spec, run_dir, wandb_mode="disabled"))


def training_specs(part: str, seed: int) -> dict[str, Any]:
    """The clean twin, the backdoored run and the backdoored run trained under the filter, at one seed."""
    from rlbackdoor.specs import load_experiment

    cfg, at = TRAINING[part], [f"seed={seed}"]
    poisoned = [*cfg["rate"], *at]
    return {
        "clean": load_experiment(CONFIGS / "cartpole_clean.yaml", [*at, f"name=cartpole_clean_s{seed}"]),
        "backdoor": load_experiment(CONFIGS / cfg["config"], [*poisoned, f"name={part}_s{seed}"]),
        "sanitized": load_experiment(
            CONFIGS / cfg["config"], [*poisoned, f"sanitize.method={SANITIZE}", f"name={part}_{SANITIZE}_s{seed}"]
        ),
    }


def measure_training(part: str, runs: Path, train_seeds: int, episodes: int, seeds: int) -> dict[str, Any]:
    """ASR and ctp_ratio (against the clean twin) of each seed's agents, the filter's flags, and their means."""
    from rlbackdoor.evaluation import evaluate
    from rlbackdoor.training.artifacts import load_policy

    per_seed = []
    for seed in range(train_seeds):
        runs_of = training_specs(part, seed)
        baseline, _ = load_policy(runs / runs_of["clean"].name)
        row: dict[str, Any] = {"seed": seed}
        for kind in ("backdoor", "sanitized"):
            policy, card = load_policy(runs / runs_of[kind].name)
            metrics = evaluate(policy, card, episodes=episodes, seeds=seeds, baseline=baseline)
            row[kind] = {
                "poison_rate": card["train"]["poison_rate"],
                **{k: metrics.get(k) for k in ("asr", "asr_ci_low", "asr_ci_high", "ctp", "ctp_ratio")},
                **{k: v for k, v in card["train"].items() if k.startswith("sanitize_")},
            }
        per_seed.append(row)
        print(f"{part} seed {seed}: " + json.dumps({k: row[k] for k in ("backdoor", "sanitized")}, default=_json))
    mode = training_specs(part, 0)["sanitized"].sanitize.mode
    out: dict[str, Any] = {"method": SANITIZE, "mode": mode, "train_seeds": train_seeds, "per_seed": per_seed}
    for kind in ("backdoor", "sanitized"):
        for key in per_seed[0][kind]:
            values = [row[kind][key] for row in per_seed if isinstance(row[kind][key], (int, float))]
            if values and "_ci_" not in key and not key.endswith(("_n", "flagged", "poisoned")):
                out[f"{kind}_{key}"] = float(np.nanmean(values))
    # a missing value fails: ASR counts as 1, ctp_ratio as 0
    asr = np.array([1.0 if row["sanitized"]["asr"] is None else row["sanitized"]["asr"] for row in per_seed])
    ctp_ratio = np.array([row["sanitized"]["ctp_ratio"] or 0.0 for row in per_seed])
    met = (asr <= 0.1) & (ctp_ratio >= 0.95)
    out["seeds_met"] = int(met.sum())
    out["target_met_every_seed"] = bool(met.all())
    out["target_met"] = bool(asr.mean() <= 0.1 and ctp_ratio.mean() >= 0.95)  # the mean agent over seeds
    print(f"{part}: " + json.dumps({k: v for k, v in out.items() if k != "per_seed"}, default=_json))
    return out


def measure(case: str, runs: Path, episodes: int, seeds: int) -> dict[str, Any]:
    """Every method and n of one case."""
    from rlbackdoor.defenses.sanitize import sanitize_agent
    from rlbackdoor.training.artifacts import load_policy

    backdoor, clean = specs(case)
    policy, card = load_policy(runs / backdoor.name)
    baseline, _ = load_policy(runs / clean.name)
    out: dict[str, Any] = {"env": CASES[case]["env"], "poison_rate": card["train"]["poison_rate"], "methods": {}}
    out["payload_reward"] = card["attack"]["payload"]["reward"]
    for method, sizes in CASES[case]["methods"].items():
        t0 = time.monotonic()
        result = sanitize_agent(policy, card, method, max(sizes), None, baseline, episodes, seeds, sizes)
        result["seconds"] = round(time.monotonic() - t0, 1)
        out["methods"][method] = result
        best = next(
            (
                p
                for p in result["curve"]
                if (p.get("asr_after") or 0) <= 0.05 and (p.get("ctp_ratio_after") or 0) >= 0.95
            ),
            None,
        )
        result["smallest_n_meeting_target"] = best["n_clean"] if best else None
        print(
            f"{case:15s} {method:9s} ASR {result.get('asr_before')} -> "
            + ", ".join(f"n={p['n_clean']}: asr {_r(p.get('asr_after'))} ctp_ratio {_r(p.get('ctp_ratio_after'))}"
                        for p in result["curve"])
            + f" | before ctp_ratio {_r(result.get('ctp_ratio_before'))}"
        )  # fmt: skip
    return out


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join([*CASES, *TRAINING]), help="comma-separated cases")
    parser.add_argument("--runs", type=Path, default=RESULTS / "runs", help="where trained runs are kept and reused")
    parser.add_argument("--workers", type=int, default=2, help="training processes")
    parser.add_argument("--train-seeds", type=int, default=3, help="training seeds of the train_* parts")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    cases = [c for c in args.only.split(",") if c]
    unknown = set(cases) - {*CASES, *TRAINING}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; use some of {', '.join([*CASES, *TRAINING])}")
    args.runs.mkdir(parents=True, exist_ok=True)
    todo = [spec for case in cases if case in CASES for spec in specs(case)]
    todo += [
        spec
        for seed in range(args.train_seeds)
        for part in cases
        if part in TRAINING
        for spec in training_specs(part, seed).values()
    ]
    todo = list({spec.name: spec for spec in todo}.values())  # the clean twins are shared
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(train_once, todo, [args.runs] * len(todo)))
    results = {
        case: measure_training(case, args.runs, args.train_seeds, args.episodes, args.seeds)
        if case in TRAINING
        else measure(case, args.runs, args.episodes, args.seeds)
        for case in cases
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "bench_sanitize.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **results}, indent=2, default=_json))
    print(f"wrote {path}")


def _json(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else str(x)


if __name__ == "__main__":
    main()
