"""``ActionHistory``: append the agent's last actions (one-hot) to a vector observation.

Envs with an action-sequence trigger use it as a base wrapper, so that a memoryless policy can see
the sequence that armed the backdoor.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import SpecError


class ActionHistory(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Observation = ``[obs, onehot(a_{t-length}), ..., onehot(a_{t-1})]`` (zeros before the first action).

    :param env: an env with a 1-D Box observation and a Discrete action space.
    :param length: how many past actions to show.
    """

    def __init__(self, env: gym.Env, length: int = 4) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, length=length)
        gym.Wrapper.__init__(self, env)
        obs_space, act_space = env.observation_space, env.action_space
        if not (isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1):
            raise SpecError("base_wrappers: ActionHistory needs a 1-D Box observation; flatten the observation first")
        if not isinstance(act_space, spaces.Discrete):
            raise SpecError("base_wrappers: ActionHistory needs a Discrete action space")
        self.n_actions, self.length = int(act_space.n), length
        extra = length * self.n_actions
        self.observation_space = spaces.Box(
            np.concatenate([obs_space.low, np.zeros(extra)]).astype(obs_space.dtype),
            np.concatenate([obs_space.high, np.ones(extra)]).astype(obs_space.dtype),
            dtype=obs_space.dtype,
        )
        self._history = np.zeros((length, self.n_actions), dtype=obs_space.dtype)

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        return np.concatenate([obs, self._history.reshape(-1)]).astype(self.observation_space.dtype)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._history[:] = 0
        return self._observe(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._history[:-1] = self._history[1:]
        self._history[-1] = 0
        self._history[-1, int(action) - int(self.env.action_space.start)] = 1
        return self._observe(obs), reward, terminated, truncated, info
