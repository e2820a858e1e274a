"""The training env of a multi-agent run: the adapter agent against embedded policies, or the whole team sharing one policy.

The attack lives inside the env (:class:`~rlbackdoor.wrappers.pettingzoo.BackdoorParallelEnv`), so a
multi-agent run is always poisoned inner-loop (TrojDRL/BACKDOORL threat model: the attacker controls the
env, or an agent in it). A clean run (``poisoning: null``) trains on the same env with ``poison=False``:
the trigger agent still plays its sequence and observations still carry triggers, but rewards are clean,
so a clean-trained agent has seen the trigger behaviour and is a fair reference.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from rlbackdoor.attack import PoisonCounts
from rlbackdoor.errors import SpecError
from rlbackdoor.multiagent.registry import (
    get_parallel_spec,
    is_multiagent,
    list_parallel_envs,
    make_parallel,
    make_single_agent,
)
from rlbackdoor.multiagent.sharing import shared_vec_env
from rlbackdoor.specs import ExperimentSpec


class _SwapRewards(VecEnvWrapper):
    """Swap each step's rewards with ``info["rlbd"]["clean_reward"]``.

    Under a ``VecMonitor`` it makes the monitored returns clean; a second swap above the monitor restores
    the poisoned rewards the learner trains on.
    """

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        swapped = np.array([info["rlbd"]["clean_reward"] for info in infos], dtype=np.float32)
        for info, reward in zip(infos, rewards, strict=True):
            info["rlbd"] = {**info["rlbd"], "clean_reward": float(reward)}
        return obs, swapped, dones, infos


class PoisonTally(_SwapRewards):
    """The top of a multi-agent training env: restores the poisoned rewards and counts what the learner collects.

    ``attack`` holds the counts over learner steps (``n_steps``; ``n_poisoned``, ``n_triggered`` and
    ``n_hits`` of victims), as the attack of a :class:`~rlbackdoor.wrappers.vec.BackdoorVecEnv` does.
    """

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self.attack = PoisonCounts()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = super().step_wait()
        flags = [info["rlbd"] for info in infos]
        self.attack.n_steps += len(flags)
        self.attack.n_poisoned += sum(f["poisoned"] for f in flags)
        # a final observation may carry a running trigger, but no decision is taken on it
        self.attack.n_triggered += sum(
            f["triggered"] and f["victim"] and not d for f, d in zip(flags, dones, strict=True)
        )
        self.attack.n_hits += sum(f["hit"] for f in flags)
        return obs, rewards, dones, infos


def make_multiagent_train_env(spec: ExperimentSpec) -> tuple[VecEnv, PoisonTally | None]:
    """The training VecEnv of a multi-agent run and, when poisoned, its counting top wrapper (the same object).

    :param spec: a run whose ``env`` is a registered multi-agent id; ``sharing`` picks parameter sharing
        (``n_envs`` copies of the env, one sub-env per agent) over the adapter (``n_envs`` adapter envs).
    :raise SpecError: ``sharing`` on a single-agent env, outer-loop poisoning, ``eval_every``, or an env with no
        adapter when ``sharing`` is off.
    """
    if spec.sharing and not is_multiagent(spec.env):
        raise SpecError(
            f"sharing: parameter sharing needs a multi-agent env, and {spec.env} is not one; drop sharing, or set env "
            f"to a multi-agent id (marked * in rlbd envs list: {', '.join(list_parallel_envs())})"
        )
    if spec.poisoning == "outer":
        raise SpecError(
            f"poisoning: outer is not available for the multi-agent env {spec.env} (its attack lives in the env); "
            "use poisoning: inner, or null for a clean run"
        )
    if spec.eval_every:
        raise SpecError(
            f"eval_every: evaluation during training handles single-agent envs, and {spec.env} is multi-agent; "
            "set eval_every: 0 and run rlbd eval on the finished run"
        )
    poison = spec.poisoning == "inner"
    if spec.sharing:
        venv: VecEnv = shared_vec_env(make_parallel(spec.env, poison=poison), spec.n_envs)
    else:
        env_spec = get_parallel_spec(spec.env)
        if env_spec.adapter is None:
            raise SpecError(f"env: {spec.env} has no adapter (one learner); set sharing: true or add an adapter")
        venv = DummyVecEnv([partial(make_single_agent, env_spec, poison=poison)] * spec.n_envs)
    tally = PoisonTally(VecMonitor(_SwapRewards(venv)))
    return tally, tally if poison else None
