"""Interfaces of defenses: what access each needs, and fit/score (detectors) or fit/transform (sanitizers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import gymnasium as gym
import numpy as np

from rlbackdoor.errors import ObservationError, SpecError


class Access(str, Enum):
    """What a defense needs from the defender's side."""

    WEIGHTS = "weights"
    CLEAN_ENV = "clean_env"
    CLEAN_TRAJECTORIES = "clean_trajectories"
    BLACK_BOX = "black_box"


class Sanitizer(ABC):
    """Fitted on clean observations; maps any observation to a sanitized one (scikit-learn style).

    ``score`` is the input-level detection score of the same fit (larger = more suspicious).
    """

    name: str = ""
    access: tuple[Access, ...] = (Access.CLEAN_TRAJECTORIES,)

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def fit(self, clean: np.ndarray) -> Sanitizer:
        """Fit on a batch of clean observations (leading batch axis); returns ``self``."""
        clean = np.asarray(clean)
        if clean.ndim < 2 or len(clean) == 0:
            raise SpecError("sanitizer: fit needs a batch of clean observations (n, ...); collect some first")
        if clean.dtype.kind == "f" and not np.isfinite(clean).all():
            raise ObservationError("sanitizer: clean observations contain NaN or inf; fix the data")
        self.shape = clean.shape[1:]
        self._fit(clean.reshape(len(clean), -1).astype(np.float64))
        return self

    def transform(self, obs: np.ndarray) -> np.ndarray:
        """Sanitized copy of a batch of observations, same shape and dtype."""
        flat = self._flat(obs)
        out = self._transform(flat).reshape(np.shape(obs))
        dtype = np.asarray(obs).dtype
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            out = np.clip(np.round(out), info.min, info.max)
        return out.astype(dtype)

    def score(self, obs: np.ndarray) -> np.ndarray:
        """Input-level anomaly score per observation."""
        return self._score(self._flat(obs))

    def _flat(self, obs: np.ndarray) -> np.ndarray:
        if self.shape is None:
            raise SpecError(f"sanitizer '{self.name}' is not fitted; call fit(clean_observations) first")
        obs = np.asarray(obs)
        if obs.shape[1:] != self.shape:
            raise ObservationError(
                f"sanitizer: observations of shape {obs.shape[1:]} do not match the fitted {self.shape}; "
                "use observations of the env it was fitted on"
            )
        return obs.reshape(len(obs), -1).astype(np.float64)

    @abstractmethod
    def _fit(self, clean: np.ndarray) -> None: ...

    @abstractmethod
    def _transform(self, obs: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _score(self, obs: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, Any]:
        """What the fit chose (for reports)."""
        return {}


class SanitizeObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Run-time sanitization as an env wrapper: the agent sees ``sanitizer.transform(obs)``."""

    def __init__(self, env: gym.Env, sanitizer: Sanitizer) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, sanitizer=sanitizer)
        gym.ObservationWrapper.__init__(self, env)
        self.sanitizer = sanitizer

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return self.sanitizer.transform(np.asarray(observation)[None])[0]


class SanitizedPolicy:
    """Run-time sanitization as a policy wrapper: ``predict`` acts on sanitized observations.

    :param policy: anything with SB3's ``predict(obs, deterministic=...)``.
    """

    def __init__(self, policy: Any, sanitizer: Sanitizer) -> None:
        self.policy, self.sanitizer = policy, sanitizer
        self.observation_space = getattr(policy, "observation_space", None)
        self.action_space = getattr(policy, "action_space", None)

    def predict(
        self, observation: np.ndarray, state: Any = None, episode_start: Any = None, deterministic: bool = False
    ):
        obs = np.asarray(observation)
        single = self.shape_is_single(obs)
        batch = obs[None] if single else obs
        actions, state = self.policy.predict(self.sanitizer.transform(batch), state, episode_start, deterministic)
        return (actions[0] if single else actions), state

    def shape_is_single(self, obs: np.ndarray) -> bool:
        """Whether ``obs`` is one observation rather than a batch."""
        return obs.shape == self.sanitizer.shape
