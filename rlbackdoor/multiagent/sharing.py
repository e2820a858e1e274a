"""Parameter sharing: every agent of a parallel env becomes one env of an SB3 ``VecEnv`` (SuperSuit), one policy for all.

SuperSuit 3.11 turns the parallel env into a vector env (``pettingzoo_env_to_vec_env_v1``) and concatenates
copies (``concat_vec_envs_v1``); its SB3 adapter lacks the ``seed`` that SB3 2.x calls when a model is given
a seed, so :class:`SharedVecEnv` adds it (the seed reaches every copy on the next reset, copy ``i`` gets
``seed + i``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pettingzoo import ParallelEnv
from pettingzoo.utils import BaseParallelWrapper

from rlbackdoor.errors import SpecError

try:
    import supersuit
    from supersuit.vector.sb3_vector_wrapper import SB3VecEnvWrapper
except ImportError:  # pragma: no cover - exercised only without the multiagent extra
    supersuit = None
    SB3VecEnvWrapper = object


class _KeepStepInfos(BaseParallelWrapper):
    """SuperSuit merges the infos of an automatic reset over those of the episode's last step, which would drop
    that step's ``info["rlbd"]``: reset infos move under ``"reset"``."""

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        obs, infos = self.env.reset(seed=seed, options=options)
        return obs, {agent: {"reset": info} for agent, info in infos.items()}


def check_shared_spaces(env: ParallelEnv) -> None:
    """Raise :class:`SpecError` unless every agent has the same observation and action space."""
    first, *others = env.possible_agents
    for kind, space_of in (("observation", env.observation_space), ("action", env.action_space)):
        for agent in others:
            if space_of(agent) != space_of(first):
                raise SpecError(
                    f"parameter sharing needs one {kind} space for every agent: '{first}' has {space_of(first)}, "
                    f"'{agent}' has {space_of(agent)}; pad them (supersuit:pad_observations_v0 / pad_action_space_v0 "
                    "in base_wrappers) or train one agent with the Gymnasium adapter"
                )


class SharedVecEnv(SB3VecEnvWrapper):  # type: ignore[misc,valid-type]
    """SuperSuit's SB3 vector env with SB3's seeding: :meth:`seed` takes effect on the next :meth:`reset`.

    Unseeded, the first reset draws a fresh seed, so the copies of the env never replay one another.
    """

    def __init__(self, venv: Any) -> None:
        super().__init__(venv)
        self._seed: int | None = None
        self._started = False

    def seed(self, seed: int | None = None) -> list[int | None]:
        self._seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> np.ndarray:
        seed = self._seed if seed is None else seed
        if seed is None and not self._started:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        self._seed, self._started = None, True
        observations, self.reset_infos = self.venv.reset(seed=seed, options=options)
        return observations


def shared_vec_env(env: ParallelEnv, n_envs: int = 1) -> SharedVecEnv:
    """An SB3 ``VecEnv`` of ``n_envs`` copies of ``env`` with one sub-env per agent (``n_envs * n_agents`` in all).

    Episodes end for all agents at once (agents may not leave mid-episode). Infos of resets sit under
    ``info["reset"]``.

    :param env: a parallel env whose agents share their spaces (e.g. a ``BackdoorParallelEnv``).
    :param n_envs: copies of the env.
    :raise SpecError: agents with different spaces, or SuperSuit missing.
    """
    check_shared_spaces(env)
    if supersuit is None:
        raise SpecError(
            "parameter sharing needs SuperSuit; install the multiagent extra (pip install 'rlbackdoor[multiagent]')"
        )
    vec = supersuit.pettingzoo_env_to_vec_env_v1(_KeepStepInfos(env))
    return SharedVecEnv(supersuit.concat_vec_envs_v1(vec, n_envs, num_cpus=0, base_class="gymnasium"))
