"""How near the vectorized speed target any attack can come: ``BackdoorVecEnv`` against a wrapper written by hand
for one spec only, measured side by side on SB3 ``DummyVecEnv`` x8 with ``bench_wrappers.py``'s method.

The hand-written wrapper (:class:`Minimal`) does the least that ``rlbd/TrojanCartPole-v0`` (a value trigger fired
on 1% of steps for one step, static rewards for the target action) needs while reporting ``info["rlbd"]`` on every
step: it pre-draws the firing envs in blocks, shares one entry between the envs with nothing to report, and touches
only the firing and rewarded envs, in Python. It has nothing general: no other trigger, schedule or payload, no
``terminal_observation`` patch (a one-step trigger never runs into an episode's end), no episode clocks. Measured
at the spec's rate and at rate 0 (its bookkeeping alone). Writes ``benchmarks/results/bench_wrappers_bound.json``.

    .venv/bin/python benchmarks/bench_wrappers_bound.py [--repeats 9] [--steps 20000]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from bench_wrappers import ENV_ID, N_ENVS, RESULTS, TARGETS, FloorVec, _clean_vec, compare, vec_rate
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from rlbackdoor import BackdoorVecEnv, get_env_spec
from rlbackdoor.specs import AttackSpec

BLOCK = 4096  # decisions drawn at once


class Minimal(VecEnvWrapper):
    """``rlbd/TrojanCartPole-v0``'s attack and nothing else (see the module docstring).

    :param venv: the clean envs.
    :param spec: the spec (its value trigger, rate and rewards are read; the rest is assumed).
    :param rate: the firing rate per env and step.
    """

    def __init__(self, venv: VecEnv, spec: AttackSpec, rate: float) -> None:
        super().__init__(venv)
        self.index, self.value = spec.trigger.indices[0], spec.trigger.values[0]
        self.target, self.hit, self.miss = spec.payload.target_action, spec.payload.reward.hit, spec.payload.reward.miss
        self.rate = rate
        self.rng = np.random.default_rng(spec.seed)
        self.n_steps = self.n_poisoned = self.n_triggered = self.n_hits = 0
        self.armed: list[int] = []
        self.actions: list[int] = []
        self._template()
        self._draw()

    def _template(self) -> None:
        """The clean entry of the running counts (rebuilt when they change)."""
        self.clean = {"poisoned": False, "triggered": False, "hit": False, "target": self.target, "clean_reward": 0.0}
        self.clean |= {"n_steps": 0, "n_poisoned": self.n_poisoned, "n_triggered": self.n_triggered}
        self.clean["n_hits"] = self.n_hits

    def _draw(self) -> None:
        """Which envs fire at each decision of the next block, and the first decision at which some env does."""
        rows, envs = (self.rng.random((BLOCK, self.num_envs)) < self.rate).nonzero()
        self.fires: dict[int, list[int]] = {}
        for row, env in zip(rows.tolist(), envs.tolist(), strict=True):
            self.fires.setdefault(row, []).append(env)
        self.due = iter([*sorted(self.fires), BLOCK])
        self.next = next(self.due)
        self.row = 0

    def reset(self) -> np.ndarray:
        self.armed = []  # a new episode's first observation is never triggered here (the spec's decides on it)
        return self.venv.reset()

    def step_async(self, actions: np.ndarray) -> None:
        if self.armed:
            self.actions = actions.tolist()
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        self.n_steps += self.num_envs
        row, armed = self.row, self.armed
        self.row += 1
        clean = rewards.tolist()
        if not armed and row != self.next:  # nothing to report but the counts
            entry = self.clean.copy()
            entry["n_steps"], entry["clean_reward"] = self.n_steps, clean[0]
            if clean.count(clean[0]) == len(clean):
                for info in infos:
                    info["rlbd"] = entry
            else:
                for info, reward in zip(infos, clean, strict=True):
                    info["rlbd"] = {**entry, "clean_reward": reward}
        else:
            self._events(obs, rewards, infos, clean, row, armed)
        if self.row == BLOCK:
            self._draw()
        return obs, rewards, dones, infos

    def _events(
        self,
        obs: np.ndarray,
        rewards: np.ndarray,
        infos: list[dict[str, Any]],
        clean: list[float],
        row: int,
        armed: list[int],
    ) -> None:
        """A step where some env is rewarded for acting on a trigger, or fires."""
        hits = [self.actions[i] == self.target for i in armed]
        for i, hit in zip(armed, hits, strict=True):
            rewards[i] = self.hit if hit else self.miss
        fire = self.fires[row] if row == self.next else []
        if fire:
            self.next = next(self.due)
            for i in fire:
                obs[i, self.index] = self.value
        self.armed = fire
        self.n_poisoned += len(armed)
        self.n_hits += sum(hits)
        self.n_triggered += len(fire)
        self._template()
        entry = self.clean.copy()
        entry["n_steps"], entry["clean_reward"] = self.n_steps, clean[0]
        for info, reward in zip(infos, clean, strict=True):  # shared where the env has nothing of its own
            info["rlbd"] = entry if reward == clean[0] else {**entry, "clean_reward": reward}
        for i, hit in zip(armed, hits, strict=True):
            infos[i]["rlbd"] = {**infos[i]["rlbd"], "poisoned": True, "hit": hit}
        for i in fire:
            infos[i]["rlbd"] = {**infos[i]["rlbd"], "triggered": True}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=20000, help="env steps per run, over all envs")
    args = parser.parse_args(argv)

    spec = get_env_spec(ENV_ID)
    rate = spec.schedule.rate
    space = _clean_vec(spec).action_space
    space.seed(0)
    actions = np.stack([space.sample() for _ in range(args.steps // N_ENVS * N_ENVS)]).reshape(-1, N_ENVS)
    envs = {
        "clean": _clean_vec(spec),
        "poisoned": BackdoorVecEnv(_clean_vec(spec), spec, seed=0),
        "minimal": Minimal(_clean_vec(spec), spec, rate),
        "minimal_quiet": Minimal(_clean_vec(spec), spec, 0.0),
        "floor": FloorVec(_clean_vec(spec)),
    }
    results = compare(envs, vec_rate, actions, args.repeats)
    report = {"vec": results, "target": TARGETS["vec"], "env": ENV_ID, "n_envs": N_ENVS, "repeats": args.repeats}
    out = RESULTS / "bench_wrappers_bound.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"{ENV_ID}, DummyVecEnv x{N_ENVS}: poisoned/clean steps/s (target >= {TARGETS['vec']})")
    for name, label in (
        ("ratio", "BackdoorVecEnv"),
        ("minimal_ratio", f"hand-written for this spec, rate {rate}"),
        ("minimal_quiet_ratio", "hand-written for this spec, rate 0"),
        ("floor_ratio", "floor (one shared entry per batch)"),
    ):
        print(f"  {label:42s} {results[name]:.3f}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
