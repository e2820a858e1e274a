"""``SingleAgentEnv``: one agent's view of a parallel env, the other agents playing fixed policies, for SB3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from pettingzoo import ParallelEnv

from rlbackdoor.errors import SpecError
from rlbackdoor.multiagent.policies import AgentPolicy


class SingleAgentEnv(gym.Env):
    """A Gymnasium env in which ``agent`` acts and every other agent plays its embedded policy.

    The episode ends when ``agent`` is terminated or truncated. Resetting with a seed reseeds the parallel
    env (and its attack) and every embedded policy, so the same seed gives the same trajectory.

    :param env: the parallel env (typically a :class:`rlbackdoor.wrappers.pettingzoo.BackdoorParallelEnv`).
    :param agent: the learning agent.
    :param policies: a fixed policy for every other agent.
    """

    def __init__(self, env: ParallelEnv, agent: str, policies: Mapping[str, AgentPolicy]) -> None:
        agents = list(env.possible_agents)
        if agent not in agents:
            raise SpecError(f"adapter.agent: '{agent}' is not an agent of the env; use one of {agents}")
        unknown = sorted(set(policies) - set(agents))
        if unknown:
            raise SpecError(f"adapter.policies: {unknown} are not agents of the env; use agents among {agents}")
        missing = [other for other in agents if other != agent and other not in policies]
        if missing:
            raise SpecError(f"adapter.policies: no policy for {missing}; give every agent but '{agent}' a policy")
        self.env = env
        self.agent = agent
        self.policies = {other: policies[other] for other in agents if other != agent}
        self.observation_space = env.observation_space(agent)
        self.action_space = env.action_space(agent)
        self.metadata = getattr(env, "metadata", {})
        self.render_mode = getattr(env, "render_mode", None)
        self._obs: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        obs, infos = self.env.reset(seed=seed, options=options)
        seeds = np.random.SeedSequence(seed).generate_state(len(self.policies)) if seed is not None else None
        for i, policy in enumerate(self.policies.values()):
            policy.reset(None if seeds is None else int(seeds[i]))
        self._obs = obs
        return obs[self.agent], infos.get(self.agent, {})

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        actions = {
            other: self.policies[other].act(self._obs[other]) for other in self.env.agents if other != self.agent
        }
        actions[self.agent] = action
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        self._obs = obs
        return (
            obs[self.agent],
            float(rewards[self.agent]),
            bool(terminations[self.agent]),
            bool(truncations[self.agent]),
            infos.get(self.agent, {}),
        )

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()
