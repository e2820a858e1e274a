"""``BackdoorWrapper``: one Gymnasium env under attack (what the registered ``rlbd/`` ids return)."""

from __future__ import annotations

import math
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from rlbackdoor.attack import Attack
from rlbackdoor.errors import BAD_REWARD, ObservationError
from rlbackdoor.specs import AttackSpec, parse
from rlbackdoor.triggers import finite_check


class BackdoorWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Injects the attack into one env; reports ``info["rlbd"]`` on every reset and step.

    :param env: the clean env (already carrying the spec's ``base_wrappers``).
    :param spec: the attack, as a spec or its mapping.
    """

    def __init__(self, env: gym.Env, spec: AttackSpec | dict[str, Any]) -> None:
        spec = spec if isinstance(spec, AttackSpec) else parse(AttackSpec, spec, "attack")
        gym.utils.RecordConstructorArgs.__init__(self, spec=spec.model_dump(mode="json"))
        gym.Wrapper.__init__(self, env)
        self.spec_ = spec
        self.attack = Attack.for_env(spec, env)
        self._check = finite_check(env.observation_space)
        self._ended = False  # the last step ended its episode

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        attack = self.attack
        if seed is not None:
            attack.reset(1, seed)
        batch = self._batch(obs)
        stamped = attack.begin(batch, after_end=self._ended and seed is None)
        self._ended = False
        info["rlbd"] = attack.begin_infos()[0]
        return obs if stamped is batch else stamped[0], info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        attack = self.attack
        entry = attack.skip()
        if entry is not None:
            obs, reward, terminated, truncated, info = self.env.step(action)
            if self._check is not None:
                self._check(obs)
            entry["clean_reward"] = reward = float(reward)
            if not math.isfinite(reward):
                raise ObservationError(BAD_REWARD)
            info["rlbd"] = entry
            self._ended = terminated or truncated
            return obs, reward, terminated, truncated, info
        actions = np.asarray(action)[None]
        executed = attack.act(actions)
        # the agent's own action object when the attack left it alone, as a clean env would get it
        obs, reward, terminated, truncated, info = self.env.step(action if executed is actions else executed[0])
        if not math.isfinite(reward):
            raise ObservationError(BAD_REWARD)
        batch = self._batch(obs)
        stamped, rewards, _, flags = attack.step(
            batch, np.array([reward], dtype=np.float64), np.array([terminated or truncated]), actions, executed
        )
        info["rlbd"] = attack.infos(flags)[0]
        self._ended = terminated or truncated
        return obs if stamped is batch else stamped[0], float(rewards[0]), terminated, truncated, info

    def _batch(self, obs: Any) -> np.ndarray:
        obs = np.asarray(obs)
        if self._check is not None:
            self._check(obs)
        return obs[None]
