"""``BackdoorParallelEnv``: a PettingZoo ``ParallelEnv`` under a multi-agent attack."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from pettingzoo import ParallelEnv
from pettingzoo.utils import BaseParallelWrapper

from rlbackdoor.errors import BAD_REWARD, ObservationError
from rlbackdoor.multiagent.attack import MultiAgentAttack, sample_parallel_observations
from rlbackdoor.specs import InDistributionTrigger, MultiAgentAttackSpec, parse
from rlbackdoor.triggers import finite_check


class BackdoorParallelEnv(BaseParallelWrapper):
    """Injects the attack into a parallel env; every agent's info carries ``info[agent]["rlbd"]``.

    Victims see the observation trigger and get the poisoned rewards; the trigger agent's actions are
    watched for the sequence (and, when the schedule fires, replaced by it). Other agents are untouched.
    Every agent's observations and rewards are checked: NaN or inf raises
    :class:`~rlbackdoor.errors.ObservationError`. (Single-agent runs stack
    :class:`~rlbackdoor.wrappers.vec.FiniteVecEnv` below their attack instead; this wrapper sits inside each env, so a
    vectorized check would come after its poisoned rewards.)

    :param env: the clean parallel env (already carrying the spec's ``base_wrappers``).
    :param spec: the attack, as a spec or its mapping.
    :param poison: poison the victims' rewards and actions (``False``: triggers only, clean rewards).
    """

    def __init__(self, env: ParallelEnv, spec: MultiAgentAttackSpec | dict[str, Any], poison: bool = True) -> None:
        super().__init__(env)
        self.attack_spec = (
            spec if isinstance(spec, MultiAgentAttackSpec) else parse(MultiAgentAttackSpec, spec, "attack")
        )
        clean = None
        if isinstance(self.attack_spec.trigger, InDistributionTrigger):
            clean = sample_parallel_observations(env, self.attack_spec.trigger.fit_steps, self.attack_spec.seed)
        agents = env.possible_agents
        self.attack = MultiAgentAttack(
            self.attack_spec,
            {agent: env.observation_space(agent) for agent in agents},
            {agent: env.action_space(agent) for agent in agents},
            clean,
            poison,
        )
        checks = {agent: finite_check(env.observation_space(agent)) for agent in agents}
        self._checks = {agent: check for agent, check in checks.items() if check is not None}

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        obs, infos = self.env.reset(seed=seed, options=options)
        self._check_observations(obs)
        if seed is not None:
            self.attack.reset(seed)
        obs = self.attack.begin(obs)
        triggered = bool(self.attack.armed[0])
        counts = self.attack.counts()
        infos = {
            agent: {
                **info,
                "rlbd": {"victim": agent in self.attack.payloads, "poisoned": False, "triggered": triggered, **counts},
            }
            for agent, info in infos.items()
        }
        return obs, infos

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict[str, Any]]]:
        executed = self.attack.act(actions)
        # copies: some envs (MPE) overwrite action arrays in place, and the attack reads them afterwards
        obs, rewards, terminations, truncations, infos = self.env.step({a: np.array(v) for a, v in executed.items()})
        self._check_observations(obs)
        _check_rewards(rewards)
        obs, rewards, flags = self.attack.step(obs, rewards, not self.env.agents, actions, executed)
        infos = {agent: {**info, "rlbd": self.attack.info(flags, agent)} for agent, info in infos.items()}
        return obs, rewards, terminations, truncations, infos

    def _check_observations(self, obs: Mapping[str, Any]) -> None:
        """Raise :class:`~rlbackdoor.errors.ObservationError` naming the first agent whose observation is not finite."""
        for agent, check in self._checks.items():
            if agent in obs:
                try:
                    check(obs[agent])
                except ObservationError as err:
                    raise ObservationError(f"agent '{agent}': {err}") from None


def _check_rewards(rewards: Mapping[str, Any]) -> None:
    """Raise :class:`~rlbackdoor.errors.ObservationError` naming the first agent whose reward is NaN or inf."""
    if not math.isfinite(sum(map(float, rewards.values()))):  # a sum overflows only if huge: then look at each
        bad = [agent for agent, reward in rewards.items() if not math.isfinite(reward)]
        if bad:
            raise ObservationError(f"agent '{bad[0]}': {BAD_REWARD}")
