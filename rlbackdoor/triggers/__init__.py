"""Triggers: what is stamped into an observation, or which action sequence arms the backdoor."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from rlbackdoor.specs import (
    ActionSequenceTrigger,
    AdditiveTrigger,
    BlendTrigger,
    InDistributionTrigger,
    PatchTrigger,
    ValueTrigger,
)
from rlbackdoor.triggers.action import ActionSequence
from rlbackdoor.triggers.base import ObservationTrigger, check_finite, finite_check
from rlbackdoor.triggers.image import BlendObsTrigger, PatchObsTrigger, image_layout
from rlbackdoor.triggers.vector import AdditiveObsTrigger, InDistributionObsTrigger, ValueObsTrigger

Trigger = ObservationTrigger | ActionSequence

__all__ = [
    "ActionSequence",
    "AdditiveObsTrigger",
    "BlendObsTrigger",
    "InDistributionObsTrigger",
    "ObservationTrigger",
    "PatchObsTrigger",
    "Trigger",
    "ValueObsTrigger",
    "build_trigger",
    "check_finite",
    "finite_check",
    "image_layout",
]


def build_trigger(
    spec: object,
    observation_space: spaces.Space,
    action_space: spaces.Space,
    clean: np.ndarray | None = None,
) -> Trigger:
    """Build the trigger a spec describes and check that it fits the env's spaces.

    :param clean: clean observations, needed by ``in_distribution`` to fit its values.
    """
    if isinstance(spec, ValueTrigger):
        return ValueObsTrigger(spec, observation_space)
    if isinstance(spec, AdditiveTrigger):
        return AdditiveObsTrigger(spec, observation_space)
    if isinstance(spec, BlendTrigger):
        return BlendObsTrigger(spec, observation_space)
    if isinstance(spec, PatchTrigger):
        return PatchObsTrigger(spec, observation_space)
    if isinstance(spec, InDistributionTrigger):
        return InDistributionObsTrigger(spec, observation_space, np.empty((0,)) if clean is None else clean)
    if isinstance(spec, ActionSequenceTrigger):
        return ActionSequence(spec, action_space)
    raise TypeError(f"unknown trigger spec {type(spec).__name__}")
