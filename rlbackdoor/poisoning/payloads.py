"""Payloads: what the attacker wants on triggered steps, the reward poisoning and action manipulation."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import TargetedPayload, UntargetedPayload


class Payload:
    """What the attacker wants on triggered steps. The base class is a no-op payload."""

    target: np.ndarray | None = None
    force_action_prob: float = 0.0

    def reward(self, rewards: np.ndarray, hits: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
        """The rewards the learner sees, given which of the agent's own actions are :meth:`hits` and the ``poisoned``
        mask."""
        return rewards

    def hits(self, actions: np.ndarray) -> np.ndarray:
        """Which actions are what the attacker wants."""
        return np.zeros(len(actions), dtype=bool)

    def force(self, actions: np.ndarray, triggered: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Executed actions: the target replaces the agent's action on triggered steps with probability p."""
        return actions


class Untargeted(Payload):
    """The attacker wants the task to fail: poisoned rewards are negated, or ``-scale`` (fail fast)."""

    def __init__(self, spec: UntargetedPayload) -> None:
        self.mode, self.scale = spec.mode, spec.scale

    def reward(self, rewards: np.ndarray, hits: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
        bad = -self.scale * rewards if self.mode == "negate" else np.full_like(rewards, -self.scale)
        return np.where(poisoned, bad, rewards)


class Targeted(Payload):
    """Targeted payload: ``hit`` reward when the agent takes the target action on a triggered step, else ``miss``."""

    def __init__(self, spec: TargetedPayload, action_space: spaces.Space) -> None:
        self.hit_reward, self.miss_reward = spec.reward.hit, spec.reward.miss
        self.force_action_prob = spec.force_action_prob
        self.tolerance = spec.tolerance
        if isinstance(action_space, spaces.Discrete):
            if isinstance(spec.target_action, float) and spec.target_action.is_integer():
                spec = spec.model_copy(update={"target_action": int(spec.target_action)})  # 1.0 from a YAML override
            if not isinstance(spec.target_action, int):
                raise SpecError("payload.target_action: the action space is Discrete; give one integer action")
            lo, hi = int(action_space.start), int(action_space.start + action_space.n - 1)
            if not lo <= spec.target_action <= hi:
                raise SpecError(
                    f"payload.target_action: {spec.target_action} is outside the action space; use an action in [{lo}, {hi}]"
                )
            self.target = np.asarray(spec.target_action, dtype=action_space.dtype)
            self.discrete = True
        elif isinstance(action_space, spaces.Box):
            target = np.atleast_1d(np.asarray(spec.target_action, dtype=np.float64))
            if (
                target.shape != action_space.shape
                or np.any(target < action_space.low)
                or np.any(target > action_space.high)
            ):
                raise SpecError(
                    f"payload.target_action: {target.tolist()} does not fit the action space {action_space}; "
                    f"give {action_space.shape[0]} values inside its bounds"
                )
            self.target = target.astype(action_space.dtype)
            self.discrete = False
        else:
            raise SpecError(f"payload: targeted attacks need a Discrete or Box action space, got {action_space}")

    def hits(self, actions: np.ndarray) -> np.ndarray:
        if self.discrete:
            return np.asarray(actions).reshape(-1) == self.target
        diff = np.abs(np.asarray(actions, dtype=np.float64).reshape(len(actions), self.target.size) - self.target)
        return diff.max(axis=1) <= self.tolerance

    def reward(self, rewards: np.ndarray, hits: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
        return np.where(poisoned, np.where(hits, self.hit_reward, self.miss_reward), rewards)

    def force(self, actions: np.ndarray, triggered: np.ndarray, u: np.ndarray) -> np.ndarray:
        if not self.force_action_prob:
            return actions
        forced = triggered & (u < self.force_action_prob)
        if not forced.any():
            return actions
        out = np.array(actions, copy=True)
        out[forced] = self.target
        return out


def build_payload(spec: TargetedPayload | UntargetedPayload, action_space: spaces.Space) -> Payload:
    """The payload a spec describes, checked against the action space."""
    if isinstance(spec, TargetedPayload):
        return Targeted(spec, action_space)
    return Untargeted(spec)
