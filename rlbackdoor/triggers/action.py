"""Action-sequence triggers: the backdoor arms when a listed sequence of actions occurs in order."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import ActionSequenceTrigger


class ActionSequence:
    """Tracks the last ``len(sequence)`` actions of each env in a batch and reports complete matches.

    :param spec: the trigger spec.
    :param action_space: the (discrete) action space the sequence is drawn from.
    """

    def __init__(self, spec: ActionSequenceTrigger, action_space: spaces.Space) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise SpecError(
                f"trigger: action_sequence needs a Discrete action space, got {type(action_space).__name__}; "
                "use an observation trigger for this env"
            )
        n = int(action_space.n)
        bad = [a for a in spec.sequence if not 0 <= a - int(action_space.start) < n]
        if bad:
            raise SpecError(
                f"trigger.sequence: actions {bad} are outside the action space {action_space}; "
                f"use actions in [{action_space.start}, {action_space.start + n - 1}]"
            )
        self.sequence = np.asarray(spec.sequence, dtype=np.int64)
        self.history = np.full((0, len(self.sequence)), -1, dtype=np.int64)

    def reset(self, n_envs: int) -> None:
        """Forget every env's history."""
        self.history = np.full((n_envs, len(self.sequence)), -1, dtype=np.int64)

    def clear(self, mask: np.ndarray) -> None:
        """Forget the history of the envs in ``mask`` (new episodes)."""
        self.history[mask] = -1

    def observe(self, actions: np.ndarray) -> np.ndarray:
        """Record one action per env; return the mask of envs whose last actions equal the sequence."""
        self.history[:, :-1] = self.history[:, 1:]
        self.history[:, -1] = np.asarray(actions).reshape(len(self.history))
        return (self.history == self.sequence).all(axis=1)
