"""``BackdoorVecEnv``: an SB3 ``VecEnv`` under attack, the whole batch poisoned in numpy at once; ``FiniteVecEnv``:
checks of observations and rewards for NaN and inf, which training stacks below it (one concept per wrapper, as
SB3's ``VecCheckNan``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from rlbackdoor.attack import Attack, check_base, make_base_env, sample_observations
from rlbackdoor.errors import BAD_REWARD, ObservationError
from rlbackdoor.specs import AttackSpec, InDistributionTrigger, parse
from rlbackdoor.triggers import finite_check


class BackdoorVecEnv(VecEnvWrapper):
    """Poisons every env of ``venv``; patches ``terminal_observation`` and adds ``info["rlbd"]``.

    :param venv: clean vectorized envs (each already carrying the spec's ``base_wrappers``).
    :param spec: the attack, as a spec or its mapping.
    :param seed: with the spec's seed, fixes every draw of the attack.
    """

    def __init__(self, venv: VecEnv, spec: AttackSpec | dict[str, Any], seed: int | None = None) -> None:
        if not isinstance(venv, VecEnv):
            raise TypeError(
                f"BackdoorVecEnv wraps an SB3 VecEnv, got {type(venv).__name__}; wrap one gymnasium env with "
                "BackdoorWrapper, or vectorize it with DummyVecEnv"
            )
        inner = venv
        while isinstance(inner, VecEnvWrapper):
            if isinstance(inner, BackdoorVecEnv):
                raise TypeError("BackdoorVecEnv: the VecEnv already carries a backdoor; wrap the clean VecEnv")
            inner = inner.venv
        super().__init__(venv)
        # the spec is self.attack.spec: a VecEnv's ``spec`` is read as a Gymnasium EnvSpec (VecMonitor reads its id)
        spec = spec if isinstance(spec, AttackSpec) else parse(AttackSpec, spec, "attack")
        envs = getattr(inner, "envs", None)  # DummyVecEnv's; the envs of other VecEnvs live in other processes
        if envs:
            check_base(spec, envs[0].unwrapped.spec)
        clean = None
        if isinstance(spec.trigger, InDistributionTrigger):
            clean = sample_observations(make_base_env(spec), spec.trigger.fit_steps, spec.seed)
        self.attack = Attack(spec, venv.observation_space, venv.action_space, clean)
        self.attack.reset(venv.num_envs, seed)
        self._actions = np.empty(0)
        self._executed = np.empty(0)
        self._entry: dict[str, Any] | None = None

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the envs (they take their seeds at the next reset, as in SB3) and reseed the attack now: its
        counts restart and, with the spec's seed, ``seed`` fixes its draws as the constructor's ``seed`` does."""
        self.attack.reset(self.num_envs, seed)
        return self.venv.seed(seed)

    def reset(self) -> np.ndarray:
        obs = self.attack.begin(self.venv.reset())
        entries = self.attack.begin_infos()
        self.reset_infos = [{**info, "rlbd": rlbd} for info, rlbd in zip(self.venv.reset_infos, entries, strict=True)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._entry = self.attack.skip()
        if self._entry is None:
            self._actions = actions
            actions = self._executed = self.attack.act(actions)
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        ended = dones.nonzero()[0].tolist()
        if self._entry is not None:  # the venv's own results, rewards of its own dtype included
            entries = self.attack.skipped(self._entry, rewards.tolist(), ended)
        else:
            obs, rewards, entries = self._poison(obs, rewards, dones, ended, infos)
        for info, rlbd in zip(infos, entries, strict=True):
            info["rlbd"] = rlbd
        return obs, rewards, dones, infos

    def _poison(
        self, obs: np.ndarray, rewards: np.ndarray, dones: np.ndarray, ended: list[int], infos: list[dict[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """The attack's step on the batch; stamps running triggers into ``terminal_observation``s."""
        # the final observations matter only where a trigger still runs; else ``obs`` stands in for them
        terminal = obs
        if ended and self.attack.running(dones) is not None:
            terminal = obs.copy()
            for i in ended:
                terminal[i] = infos[i]["terminal_observation"]
        obs, poisoned, stamped, flags = self.attack.step(obs, rewards, dones, self._actions, self._executed, terminal)
        if stamped is not terminal:
            for i in ended:
                infos[i]["terminal_observation"] = stamped[i]
        return obs, poisoned.astype(rewards.dtype, copy=False), self.attack.infos(flags)


class FiniteVecEnv(VecEnvWrapper):
    """Raises :class:`~rlbackdoor.errors.ObservationError` on NaN or inf in observations (final ones too) or rewards,
    so that bad envs fail with a clear error, not deep in SB3. Stack it below :class:`BackdoorVecEnv`, whose
    poisoned rewards would hide a NaN reward."""

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self._check = finite_check(venv.observation_space, venv.num_envs)
        self._check_final = finite_check(venv.observation_space)

    def reset(self) -> np.ndarray:
        obs = self.venv.reset()
        if self._check is not None:
            self._check(obs)
        self.reset_infos = self.venv.reset_infos
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        if self._check is not None:
            self._check(obs)
            for i in dones.nonzero()[0].tolist():  # auto-reset moved the final observations into info
                final = infos[i].get("terminal_observation")
                if final is not None:
                    self._check_final(final)  # type: ignore[misc]
        clean = rewards.tolist()
        if not math.isfinite(sum(clean)) and not all(map(math.isfinite, clean)):  # a sum overflows only if huge
            raise ObservationError(BAD_REWARD)
        return obs, rewards, dones, infos
