"""rlbackdoor: a reinforcement-learning backdoor gym.

``import rlbackdoor`` registers every backdoor env under the ``rlbd/`` Gymnasium namespace, so
``gymnasium.make("rlbackdoor:rlbd/TrojanCartPole-v0")`` works from any codebase. Heavier parts
(SB3, torch) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlbackdoor.attack import Attack, make_base_env
from rlbackdoor.errors import ArtifactError, ObservationError, RlbdError, SpecError
from rlbackdoor.registry import env_specs, get_env_spec, make_env, register_all
from rlbackdoor.specs import AttackSpec, EnvSpec, load_experiment
from rlbackdoor.wrappers.gym import BackdoorWrapper

__version__ = "0.1.0"

_LAZY = {
    "BackdoorVecEnv": "rlbackdoor.wrappers.vec",
    "list_parallel_envs": "rlbackdoor.multiagent",
    "make_parallel": "rlbackdoor.multiagent",
    "load_policy": "rlbackdoor.training.artifacts",
    "train": "rlbackdoor.training.loop",
    "evaluate": "rlbackdoor.evaluation",
    "evaluate_run": "rlbackdoor.evaluation",
}

__all__ = [
    "ArtifactError",
    "Attack",
    "AttackSpec",
    "BackdoorVecEnv",
    "BackdoorWrapper",
    "EnvSpec",
    "ObservationError",
    "RlbdError",
    "SpecError",
    "env_specs",
    "evaluate",
    "evaluate_run",
    "get_env_spec",
    "list_parallel_envs",
    "load_experiment",
    "load_policy",
    "make_base_env",
    "make_env",
    "make_parallel",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlbackdoor' has no attribute '{name}'")


def __dir__() -> list[str]:
    """The public API (the lazy names included), not this module's helpers."""
    return sorted([*__all__, "__version__"])


register_all()
