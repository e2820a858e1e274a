"""``BackdoorWrapper``: one Gymnasium env under attack (what the registered ``rlbd/`` ids return)."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from rlbackdoor.attack import Attack, check_base
from rlbackdoor.specs import AttackSpec, parse


class BackdoorWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Injects the attack into one env; reports ``info["rlbd"]`` on every reset and step. Like a clean env, it does
    not check observations and rewards for NaN (training does, with :class:`~rlbackdoor.wrappers.vec.FiniteVecEnv`).

    :param env: the clean env (already carrying the spec's ``base_wrappers``).
    :param spec: the attack, as a spec or its mapping.
    """

    def __init__(self, env: gym.Env, spec: AttackSpec | dict[str, Any]) -> None:
        if not isinstance(env, gym.Env):
            raise TypeError(
                f"BackdoorWrapper wraps one gymnasium env, got {type(env).__name__}; wrap an SB3 VecEnv with BackdoorVecEnv"
            )
        spec = spec if isinstance(spec, AttackSpec) else parse(AttackSpec, spec, "attack")
        check_base(spec, env.unwrapped.spec)  # env.spec fails on wrappers that do not record their arguments
        gym.utils.RecordConstructorArgs.__init__(self, spec=spec.model_dump(mode="json"))
        gym.Wrapper.__init__(self, env)
        self.spec_ = spec
        self.attack = Attack.for_env(spec, env)
        self._ended = False  # the last step ended its episode

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        attack = self.attack
        if seed is not None:
            attack.reset(1, seed)
        after_end, self._ended = self._ended and seed is None, False
        if not attack.begin_quietly(after_end):
            batch = np.asarray(obs)[None]
            stamped = attack.begin(batch, after_end)
            obs = obs if stamped is batch else stamped[0]
        info["rlbd"] = attack.begin_infos()[0]
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        attack = self.attack
        entry = attack.skip()
        if entry is not None:
            obs, reward, terminated, truncated, info = self.env.step(action)
            entry["clean_reward"] = reward = float(reward)
            info["rlbd"] = entry
            self._ended = terminated or truncated
            return obs, reward, terminated, truncated, info
        actions = np.asarray(action)[None]
        executed = attack.act(actions)
        # the agent's own action object when the attack left it alone, as a clean env would get it
        obs, reward, terminated, truncated, info = self.env.step(action if executed is actions else executed[0])
        batch = np.asarray(obs)[None]
        self._ended = terminated or truncated
        stamped, rewards, _, flags = attack.step(
            batch, np.array([reward], dtype=np.float64), np.array([self._ended]), actions, executed
        )
        info["rlbd"] = attack.infos(flags)[0]
        return obs if stamped is batch else stamped[0], float(rewards[0]), terminated, truncated, info
