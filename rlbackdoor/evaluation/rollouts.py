"""Deterministic, seeded policy rollouts: one env per episode, all episodes stepped in lockstep.

Each step calls ``policy.predict`` once on the stacked observations of the episodes still running.
Episode ``j`` of evaluation seed ``s`` resets its env with :func:`episode_seeds`, so the clean and
triggered rollouts of one (seed, episode) start from the same state.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from rlbackdoor.attack import Attack
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.specs import MAX_EPISODES, MAX_SEED, MAX_SEED_COUNT

DEFAULT_MAX_STEPS = 1000
"""Episode cap for envs without a time limit."""


class Policy(Protocol):
    """Anything with SB3's ``predict``: a ``BasePolicy``, a ``BaseAlgorithm``, a hand-written rule."""

    def predict(self, observation: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, Any]: ...


class RandomPolicy:
    """Uniformly random actions from ``action_space``, seeded.

    :param action_space: the env's action space.
    :param seed: seeds the space's sampler.
    """

    def __init__(self, action_space: gym.spaces.Space, seed: int) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def predict(self, observation: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, None]:
        return np.stack([self.action_space.sample() for _ in range(len(observation))]), None


@dataclass
class Rollouts:
    """What a batch of episodes visited: per step (``obs``, ``actions``, flags) and per episode."""

    obs: np.ndarray
    """Observations the policy acted on (triggered ones as the policy saw them), ``(steps, *obs_shape)``."""
    actions: np.ndarray
    """The policy's own actions on ``obs``."""
    episode: np.ndarray
    """Episode index of each step."""
    t: np.ndarray
    """Step of each step within its episode."""
    armed: np.ndarray
    """Whether the attack had the step triggered (all ``False`` without an attack)."""
    injected: np.ndarray
    """Whether the executed action was an injected action-sequence step rather than the policy's."""
    seeds: np.ndarray
    """Reset seed of each episode."""
    returns: np.ndarray
    """Undiscounted clean return of each episode."""
    lengths: np.ndarray
    """Steps of each episode."""


def episode_seeds(seeds: Sequence[int], episodes: int) -> np.ndarray:
    """Reset seeds of ``episodes`` episodes for each evaluation seed, seed-major: ``(len(seeds) * episodes,)``.

    :param seeds: evaluation seeds.
    :param episodes: episodes per seed.
    """
    return np.array(
        [np.random.SeedSequence([int(s), j]).generate_state(1)[0] for s in seeds for j in range(episodes)],
        dtype=np.int64,
    )


def evaluation_seeds(seeds: int | Iterable[int], episodes: int) -> tuple[list[int], int]:
    """The evaluation seeds (``seeds``, or ``0..seeds-1`` for a count) and the episodes per seed, checked, as Python
    ints.

    :raise SpecError: a count or a seed out of range, or no seed.
    """
    if not _whole(episodes) or not 1 <= episodes <= MAX_EPISODES:
        raise SpecError(f"episodes: {episodes!r} is not a count in 1..{MAX_EPISODES}; give the episodes per seed")
    if _whole(seeds):
        if not 1 <= seeds <= MAX_SEED_COUNT:  # type: ignore[operator]
            raise SpecError(f"seeds: {seeds} is not a count in 1..{MAX_SEED_COUNT}; give a count or a list of seeds")
        return list(range(int(seeds))), int(episodes)  # type: ignore[arg-type]
    out = (
        []
        if isinstance(seeds, str | bytes | Mapping) or not isinstance(seeds, Iterable)
        else list(islice(seeds, MAX_SEED_COUNT + 1))
    )
    if not 1 <= len(out) <= MAX_SEED_COUNT or not all(_whole(s) and 0 <= s <= MAX_SEED for s in out):
        raise SpecError(
            f"seeds: give a count, or 1 to {MAX_SEED_COUNT} whole numbers in 0..{MAX_SEED} (got {reprlib.repr(seeds)})"
        )
    return [int(s) for s in out], int(episodes)


def _whole(x: Any) -> bool:
    """Whether ``x`` is a whole number (a Python or numpy integer, not a bool)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def check_policy_fits(policy: Policy, env: gym.Env, name: str = "the policy") -> None:
    """Raise :class:`ArtifactError` when ``policy`` has no ``predict`` or its observation space does not match the
    env's; ``name`` names it in the message."""
    if not callable(getattr(policy, "predict", None)):
        hint = " (load_policy returns (policy, card))" if isinstance(policy, tuple) else ""
        raise ArtifactError(f"{name}: a {type(policy).__name__} has no predict(obs); pass an SB3 model or policy{hint}")
    space = getattr(policy, "observation_space", None)
    shape = env.observation_space.shape
    if space is not None and space.shape != shape and tuple(space.shape) != (shape[-1], *shape[:-1]):
        raise ArtifactError(
            f"{name} expects observations of shape {space.shape} but the env gives {shape}; "
            "evaluate the run on the env it was trained on"
        )


def rollout(
    policy: Policy,
    make_env: Callable[[], gym.Env],
    reset_seeds: Sequence[int],
    attack: Attack | None = None,
    attack_seed: int = 0,
    max_steps: int | None = None,
) -> Rollouts:
    """Run one episode per reset seed with deterministic actions, all in lockstep.

    :param policy: acts on batches of observations.
    :param make_env: makes one clean env.
    :param reset_seeds: one reset seed per episode (see :func:`episode_seeds`).
    :param attack: stamps triggers into what the policy sees and injects action sequences; ``None`` for clean.
    :param attack_seed: seeds the attack's draws.
    :param max_steps: episode cap; default the env's time limit, else :data:`DEFAULT_MAX_STEPS`.
    """
    envs = [make_env() for _ in reset_seeds]
    n = len(envs)
    if max_steps is None:
        spec = envs[0].spec
        max_steps = spec.max_episode_steps if spec and spec.max_episode_steps else DEFAULT_MAX_STEPS
    check_policy_fits(policy, envs[0])
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, reset_seeds, strict=True)])
    if attack is not None:
        attack.reset(n, attack_seed)
        obs = attack.begin(obs)
    live = np.ones(n, dtype=bool)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    steps: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "actions", "episode", "t", "armed", "injected")}
    space = envs[0].action_space
    actions = np.zeros((n, *space.shape), dtype=space.dtype)  # rows of ended episodes are never executed
    while live.any():
        idx = np.flatnonzero(live)
        own, _ = policy.predict(obs[idx], deterministic=True)
        actions[idx] = np.asarray(own).reshape(len(idx), *actions.shape[1:])
        if isinstance(space, gym.spaces.Discrete):
            outside = actions[idx][(actions[idx] < space.start) | (actions[idx] >= space.start + space.n)]
            if outside.size:
                raise ArtifactError(
                    f"the policy chose action {outside[0]}, not in the env's {space}; evaluate a policy of this env"
                )
        armed = attack.armed.copy() if attack is not None else np.zeros(n, dtype=bool)
        injected = attack.inject >= 0 if attack is not None else np.zeros(n, dtype=bool)
        executed = attack.act(actions) if attack is not None else actions
        for key, value in (("obs", obs), ("actions", actions), ("armed", armed), ("injected", injected)):
            steps[key].append(value[idx].copy())
        steps["episode"].append(idx)
        steps["t"].append(lengths[idx].copy())
        rewards, ended = np.zeros(n), ~live
        next_obs = obs.copy()
        for i in idx:
            next_obs[i], reward, terminated, truncated, _ = envs[i].step(executed[i])
            returns[i] += float(reward)
            lengths[i] += 1
            rewards[i] = float(reward)
            ended[i] = terminated or truncated or lengths[i] >= max_steps
        if attack is not None:
            next_obs = attack.step(next_obs, rewards, ended, actions, executed)[0]
        obs, live = next_obs, ~ended
    for env in envs:
        env.close()
    return Rollouts(
        **{k: np.concatenate(v) for k, v in steps.items()},
        seeds=np.asarray(reset_seeds, dtype=np.int64),
        returns=returns,
        lengths=lengths,
    )
