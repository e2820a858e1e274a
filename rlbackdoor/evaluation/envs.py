"""The clean env of a run and its attack, from a card, an attack spec or an env id.

The clean env is the attack's base env with its base wrappers (:func:`rlbackdoor.attack.make_base_env`),
or, for a clean run, the Gymnasium id it trained on. The trigger is the one
:meth:`rlbackdoor.attack.Attack.for_env` builds against that env.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from rlbackdoor.attack import Attack, make_base_env, make_gym_env
from rlbackdoor.errors import ArtifactError
from rlbackdoor.poisoning.schedules import Schedule
from rlbackdoor.registry import registered_attack
from rlbackdoor.specs import AttackSpec, TargetedPayload, parse
from rlbackdoor.training.card_schema import CARD
from rlbackdoor.wrappers.history import ActionHistory

Source = AttackSpec | Mapping[str, Any] | str
"""What to evaluate on: an attack spec (or its mapping, which names a ``base``), a run's card (which names an
``env``), or an env id (``rlbd/...`` ids carry their attack)."""


@dataclass(frozen=True)
class RunEnv:
    """The clean env maker of a run and its attack (``None`` when neither the run nor its env id names one)."""

    make: Callable[[], gym.Env]
    attack: AttackSpec | None


def run_env(source: Source, card_path: str | Path = CARD) -> RunEnv:
    """Resolve a card, an attack spec or an env id into the clean env maker and the attack.

    :param source: see :data:`Source`.
    :param card_path: where a card ``source`` was read from, for error messages.
    """
    if isinstance(source, AttackSpec):
        return RunEnv(partial(make_base_env, source), source)
    if isinstance(source, str):
        if source.removeprefix("rlbackdoor:").startswith("rlbd/"):
            return run_env(registered_attack(source))
        return RunEnv(partial(make_gym_env, source), None)
    if not isinstance(source, Mapping):
        hint = "; for a run directory use evaluate_run" if isinstance(source, Path) else ""
        raise TypeError(
            f"source: got {type(source).__name__}; give a run's card, an attack spec or its mapping, or an env id{hint}"
        )
    if "base" in source and "env" not in source:  # an attack spec's mapping
        return run_env(parse(AttackSpec, source, "attack"))
    if source.get("attack"):
        return run_env(parse(AttackSpec, source["attack"], f"{card_path}: attack"))
    config = source.get("config")
    if isinstance(config, dict) and config.get("attack"):  # a clean run of an attack's env: its base env and wrappers
        return run_env(parse(AttackSpec, config["attack"], f"{card_path}: config.attack"))
    if not isinstance(source.get("env"), str):
        raise ArtifactError(
            f"{card_path}: neither 'attack' nor 'env' names the env of the run; retrain or fix the card"
        )
    return run_env(source["env"])


class EvalSchedule(Schedule):
    """Fire on every decision from step ``t0`` on, with probability ``rate`` (evaluation, not training).

    :param t0: first step of an episode at which the trigger may start.
    :param rate: probability per eligible step.
    :param duration: steps an observation trigger stays on, or an action sequence stays armed.
    """

    def __init__(self, t0: int = 0, rate: float = 1.0, duration: int = 1) -> None:
        self.t0, self.rate, self.duration = t0, rate, duration

    def fire(self, t: np.ndarray, starts: np.ndarray, live: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        return live & (t >= self.t0) & (u < self.rate)


def eval_attack(spec: AttackSpec, env: gym.Env, t0: int = 0, rate: float = 1.0) -> Attack:
    """The attack of ``spec`` against ``env`` with an :class:`EvalSchedule` and no forced actions.

    Observation triggers are stamped into every observation from ``t0`` on (``rate`` 1). An action
    sequence is injected (the executed actions replaced, the agent's own still recorded), then armed
    for the spec's ``duration`` as in training, then injected again (``rate`` 1) or after a random
    wait (``rate`` < 1).

    :param spec: the run's attack.
    :param env: its clean env.
    :param t0: see :class:`EvalSchedule`.
    :param rate: see :class:`EvalSchedule`.
    """
    if isinstance(spec.payload, TargetedPayload):
        spec = spec.model_copy(update={"payload": spec.payload.model_copy(update={"force_action_prob": 0.0})})
    attack = Attack.for_env(spec, env)
    duration = attack.schedule.duration if attack.sequence is not None else 1
    attack.schedule = EvalSchedule(t0, rate, duration)
    return attack


def action_history(env: gym.Env) -> ActionHistory | None:
    """The :class:`~rlbackdoor.wrappers.history.ActionHistory` wrapper in ``env``'s chain, if any."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, ActionHistory):
            return env
        env = env.env
    return None
