"""PolicyCleanse (Guo et al., ICCV 2023): detect a victim whose backdoor an opponent's actions trigger.

The defender trains a *probing* opponent against the frozen victim on the clean env: the prober acts
for the first ``k`` steps of an episode, then goes idle (plays its seat's ordinary policy), and it is
rewarded by the victim's loss over the next ``window`` steps. A backdoored victim's return collapses
after the prober has learned to play the trigger; a clean victim's does not. The score of a victim is
its mean return per post-probe step after random probes minus after the learned probe, and the
learned probe's actions are the recovered trigger.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.policies import BasePolicy

from rlbackdoor.errors import SpecError
from rlbackdoor.multiagent.policies import AgentPolicy, PredictPolicy, RandomPolicy, check_plays
from rlbackdoor.multiagent.registry import build_policies, get_parallel_spec, make_base_parallel
from rlbackdoor.specs import MultiAgentEnvSpec


class ProbeEnv(gym.Env):
    """The prober's view: ``k`` decisions in the ``prober`` seat, then a terminal reward of minus the
    victim's return over the next ``window`` steps (the prober idle, on its seat's ordinary policy).

    :param env_id: a registered multi-agent id; its clean base env is probed (the attack is unknown).
    :param victim: the frozen victim's policy (anything with SB3's ``predict``).
    :param victim_agent: the victim's seat.
    :param prober: the seat the prober plays (e.g. the opponent).
    :param k: probing steps.
    :param window: post-probe steps over which the victim's return is measured.
    """

    def __init__(self, env_id: str, victim: Any, victim_agent: str, prober: str, k: int = 3, window: int = 6) -> None:
        spec = get_parallel_spec(env_id)
        self.env = make_base_parallel(spec)
        agents = list(self.env.possible_agents)
        for role, agent in (("victim", victim_agent), ("prober", prober)):
            if agent not in agents:
                raise SpecError(f"{role}: '{agent}' is not an agent of {env_id}; use one of {agents}")
        if victim_agent == prober:
            raise SpecError(f"prober and victim are both '{prober}'; probe from another seat")
        if k < 1 or window < 1:
            raise SpecError(f"k={k} and window={window} must both be at least 1")
        embedded = build_policies(spec, self.env) if spec.adapter is not None else {}
        self.controllers: dict[str, AgentPolicy] = {
            agent: embedded.get(agent) or RandomPolicy(self.env.observation_space(agent), self.env.action_space(agent))
            for agent in agents
        }
        self.controllers[victim_agent] = PredictPolicy(
            self.env.observation_space(victim_agent), self.env.action_space(victim_agent), victim
        )
        self.victim_agent, self.prober, self.k, self.window = victim_agent, prober, k, window
        self.observation_space = self.env.observation_space(prober)
        self.action_space = self.env.action_space(prober)
        self._obs: dict[str, Any] = {}
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        self._obs, _ = self.env.reset(seed=seed)
        seeds = np.random.SeedSequence(seed).generate_state(len(self.controllers)) if seed is not None else None
        for i, controller in enumerate(self.controllers.values()):
            controller.reset(None if seeds is None else int(seeds[i]))
        self._t = 0
        return self._obs[self.prober], {}

    def _step(self, prober_action: Any | None) -> float:
        actions = {agent: self.controllers[agent].act(self._obs[agent]) for agent in self.env.agents}
        if prober_action is not None:
            actions[self.prober] = prober_action
        self._obs, rewards, *_ = self.env.step(actions)
        return float(rewards.get(self.victim_agent, 0.0))

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        self._step(action)
        self._t += 1
        if self._t < self.k and self.env.agents:
            return self._obs[self.prober], 0.0, False, False, {}
        victim_return, steps = 0.0, 0
        while self.env.agents and steps < self.window:
            victim_return += self._step(None)
            steps += 1
        info = {"victim_return": victim_return, "window_steps": steps}
        return self._obs.get(self.prober, np.zeros_like(self.observation_space.low)), -victim_return, True, False, info

    def probe(self, actions: Any, episodes: int, seed: int) -> tuple[float, list[tuple[int, ...]]]:
        """Mean victim return per post-probe step when ``actions`` (a policy, or ``None`` for random) probes.

        :return: the mean per-step victim return and the action sequences the prober played.
        """
        rng = np.random.default_rng(seed)
        total, steps, played = 0.0, 0, []
        for i in range(episodes):
            obs, _ = self.reset(seed=seed + i)
            moves: list[int] = []
            done, info = False, {}
            while not done:
                if actions is None:
                    action = np.int64(rng.integers(self.action_space.n))
                else:
                    action, _ = actions.predict(obs, deterministic=True)
                moves.append(int(action))
                obs, _, done, _, info = self.step(action)
            total += info["victim_return"]
            steps += info["window_steps"]
            played.append(tuple(moves))
        return total / max(1, steps), played


@dataclass
class CleanseResult:
    """What PolicyCleanse found for one victim."""

    score: float
    """Mean victim return per post-probe step after random probes minus after the learned probe."""
    random_return: float
    probed_return: float
    trigger: tuple[int, ...]
    """The learned probe's most frequent action sequence: the recovered trigger."""


def policy_cleanse(
    env_id: str,
    victim: Any,
    *,
    victim_agent: str | None = None,
    prober: str | None = None,
    k: int = 3,
    window: int = 6,
    timesteps: int = 6000,
    episodes: int = 50,
    seed: int = 0,
) -> CleanseResult:
    """Train a probing opponent against a frozen victim and score how far the victim's return collapses.

    :param env_id: the registered multi-agent id the victim plays.
    :param victim: the victim's policy (anything with SB3's ``predict``).
    :param victim_agent: the victim's seat (default: the env's adapter agent).
    :param prober: the probing seat (default: the other agent of a two-player env).
    :param k: probing steps (at least the trigger's length to recover it).
    :param window: post-probe steps scored.
    :param timesteps: PPO steps of the prober.
    :param episodes: evaluation episodes for the random and learned probes.
    :param seed: seeds the prober's training and the episodes.
    """
    torch.set_num_threads(1)
    spec = get_parallel_spec(env_id)
    agents = list(make_base_parallel(spec).possible_agents)
    victim_agent = _victim_seat(spec, agents, victim_agent)
    if prober is None:
        others = [agent for agent in agents if agent != victim_agent]
        if len(others) != 1:
            raise SpecError(
                f"{env_id} has {len(agents)} agents; name the prober seat among {others} (rlbd cleanse --prober AGENT)"
            )
        prober = others[0]
    env = ProbeEnv(env_id, victim, victim_agent, prober, k=k, window=window)
    model = PPO(
        "MlpPolicy", env, n_steps=k * 64, batch_size=k * 64, n_epochs=10, ent_coef=0.01, seed=seed, device="cpu"
    )
    model.learn(timesteps)
    random_return, _ = env.probe(None, episodes, seed + 10_000)
    probed_return, played = env.probe(model, episodes, seed + 10_000)
    trigger = Counter(played).most_common(1)[0][0]
    return CleanseResult(random_return - probed_return, random_return, probed_return, trigger)


def _victim_seat(spec: MultiAgentEnvSpec, agents: list[str], victim_agent: str | None) -> str:
    """The victim's seat: ``victim_agent``, else the env's adapter agent, else its first agent."""
    return victim_agent or (spec.adapter.agent if spec.adapter is not None else agents[0])


def _load_victim(run: Path, victim_agent: str | None) -> tuple[BasePolicy, str, bool]:
    """A run's policy, env id and whether it was poisoned; a malformed card raises :class:`ArtifactError`."""
    from rlbackdoor.multiagent.registry import is_multiagent
    from rlbackdoor.training.artifacts import CARD, load_policy
    from rlbackdoor.training.card_schema import card_entry

    policy, card = load_policy(run)
    path = run / CARD
    env = card_entry(path, card, "env", str)
    sharing = card_entry(path, card, "config", dict).get("sharing")
    poisoning = card_entry(path, card, "poisoning", str, type(None))
    if not is_multiagent(env) or sharing:
        raise SpecError(
            f"{run}: PolicyCleanse needs a victim trained as one agent of a multi-agent env (it trained on "
            f"{env}{' with parameter sharing' if sharing else ''}); pick such runs"
        )
    _check_seat(path, env, policy, victim_agent)
    return policy, env, poisoning is not None


def _check_seat(path: Path, env_id: str, policy: BasePolicy, victim_agent: str | None) -> None:
    """Refuse a card whose policy spaces do not fit the victim's seat (its ``predict`` would fail mid-probe)."""
    from rlbackdoor.training.card_schema import CARD_FIX

    spec = get_parallel_spec(env_id)
    env = make_base_parallel(spec)
    seat = _victim_seat(spec, list(env.possible_agents), victim_agent)
    if seat not in env.possible_agents:
        return  # ProbeEnv names the agents
    check_plays(policy, env, env_id, [seat], f"{path}: policy:", CARD_FIX)


def cleanse_runs(run_dirs: list[Path], **options: Any) -> dict[str, Any]:
    """PolicyCleanse on every victim of a small zoo of multi-agent runs; AUROC when it mixes clean and backdoored.

    A run is backdoored when its card says it was poisoned. Every run must be of the same multi-agent env
    with an adapter (its learner is the victim), and appear once. Every run is loaded and checked before any
    prober trains.

    :param run_dirs: finished run directories.
    :param options: :func:`policy_cleanse`'s keyword arguments (``k``, ``window``, ``timesteps``, ...).
    :return: ``rows`` (run, backdoored, score, returns, recovered trigger, seconds) and ``auroc`` (or ``None``).
    """
    from sklearn.metrics import roc_auc_score

    seen: dict[Path, Path] = {}
    for run in map(Path, run_dirs):
        first = seen.setdefault(run.resolve(), run)
        if first is not run:
            also = "" if first == run else f" (also as {first})"
            raise SpecError(f"{run}: given twice{also}; name each run once")
    victims = [_load_victim(Path(run), options.get("victim_agent")) for run in run_dirs]
    envs = sorted({env for _, env, _ in victims})
    if len(envs) > 1:
        raise SpecError(f"runs of different envs ({envs}); cleanse one env's zoo at a time")
    rows = []
    for run, (policy, env, backdoored) in zip(run_dirs, victims, strict=True):
        start = time.monotonic()
        found = policy_cleanse(env, policy, **options)
        rows.append(
            {
                "run": str(run),
                "backdoored": backdoored,
                "score": found.score,
                "random_return": found.random_return,
                "probed_return": found.probed_return,
                "trigger": list(found.trigger),
                "seconds": round(time.monotonic() - start, 2),
            }
        )
    labels = [row["backdoored"] for row in rows]
    auroc = float(roc_auc_score(labels, [row["score"] for row in rows])) if 0 < sum(labels) < len(labels) else None
    return {"env": envs[0] if envs else None, "rows": rows, "auroc": auroc}
