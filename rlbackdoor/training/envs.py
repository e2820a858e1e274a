"""The training env of a run: clean base envs in a ``DummyVecEnv`` + ``VecMonitor`` + ``FiniteVecEnv`` (which checks
observations and rewards for NaN and inf), under ``BackdoorVecEnv`` for inner-loop poisoning.

The monitor sits below the attack, so episode returns in logs and on the progress bar are clean returns.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from rlbackdoor.attack import make_base_env, make_gym_env
from rlbackdoor.errors import RlbdError, SpecError, detail
from rlbackdoor.multiagent.registry import is_multiagent
from rlbackdoor.multiagent.training import make_multiagent_train_env
from rlbackdoor.registry import registered_attack
from rlbackdoor.specs import AttackSpec, ExperimentSpec
from rlbackdoor.wrappers.vec import BackdoorVecEnv, FiniteVecEnv


def run_attack(spec: ExperimentSpec) -> AttackSpec | None:
    """The attack of a run: the inline block, or a registered env's (as a plain :class:`AttackSpec`)."""
    if spec.attack is not None:
        return spec.attack
    if spec.env.removeprefix("rlbackdoor:").startswith("rlbd/") and not is_multiagent(spec.env):
        return registered_attack(spec.env)
    return None


def preset_keys(spec: ExperimentSpec, attack: AttackSpec | None) -> list[str]:
    """Env keys to look up in ``agents/<algo>.yaml``: the run's env id, then its base id."""
    return [spec.env.removeprefix("rlbackdoor:")] + ([attack.base] if attack is not None else [])


def env_factory(spec: ExperimentSpec, attack: AttackSpec | None) -> Callable[[], gym.Env]:
    """A maker of one clean env of the run: the attack's base env (with its base wrappers), or ``env`` itself."""
    return partial(make_base_env, attack) if attack is not None else partial(make_gym_env, spec.env)


def make_train_env(spec: ExperimentSpec, attack: AttackSpec | None, seed: int) -> tuple[VecEnv, BackdoorVecEnv | None]:
    """The training VecEnv and, for inner-loop poisoning, the ``BackdoorVecEnv`` in it.

    :param spec: the run.
    :param attack: the run's attack (see :func:`run_attack`).
    :param seed: seeds the attack's draws (with the attack's own seed); SB3 seeds the envs.
    """
    if is_multiagent(spec.env) or spec.sharing:
        return make_multiagent_train_env(spec)  # type: ignore[return-value]
    factory = env_factory(spec, attack)
    probe_env(factory, spec.env)
    venv: VecEnv = FiniteVecEnv(VecMonitor(DummyVecEnv([factory] * spec.n_envs)))
    wrapped = " with its base_wrappers" if attack is not None and attack.base_wrappers else ""
    check_zero_start(spec.env + wrapped, venv.observation_space, venv.action_space)
    if spec.poisoning != "inner" or attack is None:
        return venv, None
    backdoor = BackdoorVecEnv(venv, attack, seed=seed)
    return backdoor, backdoor


def probe_env(factory: Callable[[], gym.Env], env_id: str) -> None:
    """Reset and step one fresh env of a run, so that what only fails when stepping (e.g. a base wrapper given a
    number for a function) fails here, as one :class:`SpecError` line before anything is written."""
    env = factory()
    try:
        env.reset(seed=0)
        env.step(env.action_space.sample())
    except RlbdError:
        raise
    except Exception as err:  # the env's own code and its user-configured wrappers: anything may come out
        failure = f"{type(err).__name__}: {detail(err)[:200]}"
        raise SpecError(f"env: stepping {env_id} failed ({failure}); fix its base_kwargs or base_wrappers") from None
    finally:
        env.close()


def check_zero_start(env_id: str, observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Refuse (Multi)Discrete spaces of ``env_id`` that do not start at 0 (see :func:`zero_start`)."""
    named = [("action", action_space)]
    if isinstance(observation_space, spaces.Dict):
        named += [(f"observation '{key}'", space) for key, space in observation_space.spaces.items()]
    else:
        named.append(("observation", observation_space))
    for what, space in named:
        zero_start(space, f"env: {env_id} has a {type(space).__name__} {what} space")


def zero_start(space: spaces.Space, what: str) -> None:
    """Refuse a (Multi)Discrete ``space`` (described as ``what``) that does not start at 0: SB3 agents, and the
    datasets and defenses built on them, read and act in ``0 .. n-1``."""
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete)) and np.any(space.start != 0):
        raise SpecError(
            f"{what} starting at {space.start}, and SB3 agents use 0 .. n-1; shift it to start at 0 "
            "(e.g. with a base_wrappers ActionWrapper)"
        )
