"""Parallel-env base wrappers that prepare observations for an attack and for memoryless policies."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.utils import BaseParallelWrapper

from rlbackdoor.errors import SpecError


class ObservationHistory(BaseParallelWrapper):
    """Each agent observes its last ``length`` observations, flattened (Discrete ones one-hot), oldest first.

    The first observation of an episode fills the whole history. In rock-paper-scissors an agent observes
    the opponent's last move, so the history shows the opponent's recent moves, and with them a trigger
    sequence the opponent plays.

    :param env: a parallel env with Discrete or Box observations.
    :param length: how many observations to show.
    """

    def __init__(self, env: ParallelEnv, length: int = 4) -> None:
        super().__init__(env)
        if length < 1:
            raise SpecError(f"base_wrappers: ObservationHistory length {length} must be at least 1; raise it")
        self.length = length
        self._spaces: dict[str, spaces.Box] = {}
        for agent in env.possible_agents:
            space = env.observation_space(agent)
            if isinstance(space, spaces.Discrete):
                low, high = np.zeros(int(space.n)), np.ones(int(space.n))
            elif isinstance(space, spaces.Box):
                low, high = space.low.reshape(-1), space.high.reshape(-1)
            else:
                raise SpecError(
                    f"base_wrappers: ObservationHistory needs Discrete or Box observations, agent '{agent}' has "
                    f"{type(space).__name__}; flatten them first"
                )
            self._spaces[agent] = spaces.Box(
                np.tile(low, length).astype(np.float32), np.tile(high, length).astype(np.float32), dtype=np.float32
            )
        self._history: dict[str, np.ndarray] = {}

    def observation_space(self, agent: str) -> spaces.Box:
        return self._spaces[agent]

    def _encode(self, agent: str, obs: Any) -> np.ndarray:
        space = self.env.observation_space(agent)
        if isinstance(space, spaces.Discrete):
            onehot = np.zeros(int(space.n), dtype=np.float32)
            onehot[int(obs) - int(space.start)] = 1.0
            return onehot
        return np.asarray(obs, dtype=np.float32).reshape(-1)

    def _observe(self, obs: dict[str, Any], start: bool) -> dict[str, np.ndarray]:
        out = {}
        for agent, o in obs.items():
            frame = self._encode(agent, o)
            if start:
                self._history[agent] = np.tile(frame, (self.length, 1))
            else:
                history = self._history[agent]
                history[:-1] = history[1:]
                history[-1] = frame
            out[agent] = self._history[agent].reshape(-1).copy()
        return out

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, infos = self.env.reset(seed=seed, options=options)
        return self._observe(obs, start=True), infos

    def step(self, actions: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        return self._observe(obs, start=False), rewards, terminations, truncations, infos
