"""Parallel-env base wrappers that prepare observations for an attack and for memoryless policies."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.utils import BaseParallelWrapper

from rlbackdoor.errors import SpecError


class JointActions(BaseParallelWrapper):
    """Each agent observes the last ``length`` joint actions: the history of play of a repeated matrix game.

    A frame is the agent's own action one-hot, then every other agent's (in ``possible_agents`` order);
    frames run oldest first, and frames before the first round are zeros. So an opponent's trigger
    sequence, and the agent's own recent moves, are in every agent's observation. The env's own
    observations are dropped: in games like rock-paper-scissors they are a function of the actions.

    :param env: a parallel env whose agents have Discrete action spaces.
    :param length: how many rounds to show.
    """

    def __init__(self, env: ParallelEnv, length: int = 4) -> None:
        super().__init__(env)
        if length < 1:
            raise SpecError(f"base_wrappers: JointActions length {length} must be at least 1; raise it")
        for agent in env.possible_agents:
            if not isinstance(env.action_space(agent), spaces.Discrete):
                raise SpecError(
                    f"base_wrappers: JointActions needs Discrete actions, agent '{agent}' has {env.action_space(agent)}"
                )
        self.length = length
        sizes = [int(env.action_space(agent).n) for agent in env.possible_agents]
        starts = np.cumsum([0, *sizes])
        self._columns = {a: np.arange(starts[i], starts[i + 1]) for i, a in enumerate(env.possible_agents)}
        self._space = spaces.Box(0.0, 1.0, (length * int(starts[-1]),), dtype=np.float32)
        self._history = np.zeros((length, int(starts[-1])), dtype=np.float32)

    def observation_space(self, agent: str) -> spaces.Box:
        return self._space

    def _observe(self, agents: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for agent in agents:
            order = [agent, *(other for other in self.env.possible_agents if other != agent)]
            columns = np.concatenate([self._columns[other] for other in order])
            out[agent] = self._history[:, columns].reshape(-1)
        return out

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, infos = self.env.reset(seed=seed, options=options)
        self._history[:] = 0.0
        return self._observe(list(obs)), infos

    def step(self, actions: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        frame = np.zeros(self._history.shape[1], dtype=np.float32)
        for agent, action in actions.items():
            space = self.env.action_space(agent)
            frame[self._columns[agent][int(action) - int(space.start)]] = 1.0
        self._history[:-1] = self._history[1:]
        self._history[-1] = frame
        return self._observe(list(obs)), rewards, terminations, truncations, infos
