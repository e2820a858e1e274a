"""Speed of the backdoor wrappers: env steps/s with and without the attack, measured side by side.

(a) one env: the clean base env (for ``rlbd/TrojanCartPole-v0``, ``gymnasium.make("CartPole-v1")``) vs
    ``gymnasium.make("rlbackdoor:<id>")``;
(b) SB3 ``DummyVecEnv`` of 8 clean base envs vs ``BackdoorVecEnv`` around an identical ``DummyVecEnv``.

The issue's targets are for ``rlbd/TrojanCartPole-v0`` (the default); ``--env`` measures another registered
id the same way, to see the fixed per-step cost against a costlier env step.

All step through the same pre-drawn actions; the runs alternate within each repetition (the order
rotates every repetition) and a reported ratio is the median over repetitions of poisoned / clean
steps per second. Time is this process's CPU time, so other work on a shared machine does not count.
Two references bracket the attack's own cost:

- *pass-through*: a wrapper that only adds an empty ``info["rlbd"]`` (around ``gymnasium.make("CartPole-v1")``,
  which is how a registered id wraps its base; for (b) a ``VecEnvWrapper``): what any wrapper costs;
- *floor*: a wrapper that does what every step of a backdoor wrapper must, and nothing else: an ``info["rlbd"]``
  entry with the running counts and the clean reward (for (b) one entry per batch, shared by its envs, without
  their clean rewards: lower than any per-env report). No attack implementation that reports every step can
  beat it.

For (b), *checked* is the attack as training runs it: ``BackdoorVecEnv`` over ``FiniteVecEnv``, which checks every
observation and reward for NaN and inf (the backdoor wrappers leave that to it).
Writes ``benchmarks/results/bench_wrappers.json`` (other ids: ``bench_wrappers-<Name>.json``).

    .venv/bin/python benchmarks/bench_wrappers.py [--repeats 9] [--steps 20000] [--env rlbd/TrojanAcrobot-v0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

import rlbackdoor
from rlbackdoor import BackdoorVecEnv, get_env_spec, make_base_env
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import AttackSpec
from rlbackdoor.wrappers.vec import FiniteVecEnv

ENV_ID = "rlbd/TrojanCartPole-v0"
N_ENVS = 8
TARGETS = {"single": 0.85, "vec": 0.97}
RESULTS = Path(__file__).resolve().parent / "results"


def single_rate(env: gym.Env, actions: list[Any]) -> float:
    """Steps per second of one env through ``actions`` (resetting at episode ends)."""
    env.reset(seed=0)
    step, reset = env.step, env.reset
    start = time.process_time()
    for action in actions:
        _, _, terminated, truncated, _ = step(action)
        if terminated or truncated:
            reset()
    return len(actions) / (time.process_time() - start)


def vec_rate(venv: DummyVecEnv | BackdoorVecEnv, actions: np.ndarray) -> float:
    """Env steps per second of a vectorized env through ``actions`` (``(steps, n_envs)``; auto-reset)."""
    venv.seed(0)
    venv.reset()
    step = venv.step
    start = time.process_time()
    for batch in actions:
        step(batch)
    return actions.size / (time.process_time() - start)


class PassThrough(gym.Wrapper):
    """Adds an empty ``info["rlbd"]``: the reference cost of a wrapper."""

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["rlbd"] = {}
        return obs, reward, terminated, truncated, info


class PassThroughVec(VecEnvWrapper):
    """Adds an empty ``info["rlbd"]`` to every env: the reference cost of a ``VecEnvWrapper``."""

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            info["rlbd"] = {}
        return obs, rewards, dones, infos


_ENTRY = {"poisoned": False, "triggered": False, "hit": False, "target": 0, "clean_reward": 0.0}
_ENTRY |= {"n_steps": 0, "n_poisoned": 0, "n_triggered": 0, "n_hits": 0}


class Floor(gym.Wrapper):
    """Adds an ``info["rlbd"]`` entry with running counts and the clean reward."""

    n_steps = 0

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.n_steps += 1
        entry = _ENTRY.copy()
        entry["n_steps"] = self.n_steps
        entry["clean_reward"] = reward = float(reward)
        info["rlbd"] = entry
        return obs, reward, terminated, truncated, info


class FloorVec(VecEnvWrapper):
    """Gives the envs of every batch one shared ``info["rlbd"]`` entry with running counts."""

    n_steps = 0

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        self.n_steps += self.num_envs
        entry = _ENTRY.copy()
        entry["n_steps"] = self.n_steps
        for info in infos:
            info["rlbd"] = entry
        return obs, rewards, dones, infos


def _clean_vec(spec: AttackSpec) -> DummyVecEnv:
    return DummyVecEnv([lambda: make_base_env(spec)] * N_ENVS)


def compare(envs: dict[str, Any], rate: Callable[[Any, Any], float], actions: Any, repeats: int) -> dict[str, Any]:
    """Interleaved repetitions of ``rate`` on every env of ``envs`` (``clean`` first).

    :return: each env's median steps/s, and the median over repetitions of each one's ratio to ``clean``.
    """
    names = list(envs)
    for env in envs.values():
        rate(env, actions[: len(actions) // 10])  # warm up
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(rate(envs[name], actions))
    out: dict[str, Any] = {f"{name}_steps_per_s": statistics.median(rates[name]) for name in names}
    for name in names[1:]:
        ratios = [x / c for x, c in zip(rates[name], rates["clean"], strict=True)]
        key = "ratio" if name == "poisoned" else f"{name}_ratio"
        out[key], out[f"{key}s"] = statistics.median(ratios), ratios
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=20000, help="env steps per run (vectorized: over all envs)")
    parser.add_argument("--env", default=ENV_ID, help="a registered rlbd/ id (the targets are for the default)")
    args = parser.parse_args(argv)

    try:
        spec = get_env_spec(args.env)
    except SpecError as err:
        parser.error(str(err))
    space = make_base_env(spec).action_space
    space.seed(0)
    drawn = np.stack([space.sample() for _ in range(args.steps // N_ENVS * N_ENVS)])
    vec_actions = drawn.reshape(args.steps // N_ENVS, N_ENVS, *space.shape)
    single_actions = drawn.tolist() if isinstance(space, gym.spaces.Discrete) else list(drawn)  # as an agent gives them
    single = {
        "clean": make_base_env(spec),
        "poisoned": gym.make(f"rlbackdoor:{args.env}"),
        "reference": PassThrough(make_base_env(spec)),  # where a registered id puts the BackdoorWrapper
        "floor": Floor(make_base_env(spec)),
    }
    vec = {
        "clean": _clean_vec(spec),
        "poisoned": BackdoorVecEnv(_clean_vec(spec), spec, seed=0),
        "reference": PassThroughVec(_clean_vec(spec)),
        "floor": FloorVec(_clean_vec(spec)),
        "checked": BackdoorVecEnv(FiniteVecEnv(_clean_vec(spec)), spec, seed=0),
    }
    results = {
        "single": compare(single, single_rate, single_actions, args.repeats),
        "vec": compare(vec, vec_rate, vec_actions, args.repeats),
    }
    if args.env == ENV_ID:
        for name, target in TARGETS.items():
            results[name]["target"] = target
    report = {
        **results,
        "env": args.env,
        "n_envs": N_ENVS,
        "steps": args.steps,
        "repeats": args.repeats,
        "clock": "process CPU time",
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "gymnasium": gym.__version__,
            "rlbackdoor": rlbackdoor.__version__,
        },
        "machine": platform.machine(),
    }
    suffix = "" if args.env == ENV_ID else "-" + args.env.removeprefix("rlbd/")
    out = RESULTS / f"bench_wrappers{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(args.env)
    for name, label in (("single", "single env (gymnasium.make)"), ("vec", f"DummyVecEnv x{N_ENVS}")):
        r = results[name]
        target = f" (target >= {r['target']})" if "target" in r else ""
        print(
            f"{label:28s} clean {r['clean_steps_per_s']:9.0f} steps/s  poisoned {r['poisoned_steps_per_s']:9.0f} steps/s"
            f"  ratio {r['ratio']:.3f}{target}; floor {r['floor_ratio']:.3f}, pass-through {r['reference_ratio']:.3f}"
            + (f"; checked as in training {r['checked_ratio']:.3f}" if "checked_ratio" in r else "")
        )
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
