"""Interfaces of defenses: what access each needs, and fit/score (detectors) or fit/transform (sanitizers)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, ClassVar

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

    def min_clean(self, d: int) -> int:
        """The fewest clean observations of ``d`` features a fit takes (a fit may ask for more, given the data)."""
        return 2

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
        """Sanitized copy of a batch of observations, same shape and dtype (run time)."""
        return self._restore(self._transform(self._flat(obs)), obs)

    def repair(self, obs: np.ndarray) -> np.ndarray:
        """Observations already judged poisoned, mapped into the clean data's support, same shape and dtype."""
        return self._restore(self._repair(self._flat(obs)), obs)

    @staticmethod
    def _restore(flat: np.ndarray, obs: np.ndarray) -> np.ndarray:
        out = flat.reshape(np.shape(obs))
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

    def _repair(self, obs: np.ndarray) -> np.ndarray:
        return self._transform(obs)

    @abstractmethod
    def _score(self, obs: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, Any]:
        """What the fit chose (for reports)."""
        return {}


class Detector:
    """Analyses one policy, given clean observations of its env (collected by running the policy there).

    ``fit(policy, clean)`` binds the policy under test and the clean data; then ``score_model()`` is the
    model-level score (larger = more likely backdoored) and ``score_inputs(obs)`` the per-observation
    score (larger = more likely triggered), for the ``levels`` the detector has. A policy is anything with
    SB3's ``predict``; detectors that need weights or gradients take an SB3 ``ActorCriticPolicy`` or
    ``DQNPolicy``.

    ``threshold`` is the fixed, label-free cut-off of the model-level score and ``probability`` maps a
    score to P(backdoored) by a logistic of ``(score - threshold) / scale``: no labelled models are used.
    """

    name: ClassVar[str] = ""
    access: ClassVar[tuple[Access, ...]] = ()
    levels: ClassVar[tuple[str, ...]] = ("model",)
    threshold: float = 0.5
    scale: float = 0.1
    input_cutoff: float = 0.0

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.policy: Any = None
        self.clean = np.empty(0)

    def fit(self, policy: Any, clean: np.ndarray) -> Detector:
        """Bind ``policy`` and a batch of its clean observations (leading batch axis); returns ``self``."""
        clean = np.asarray(clean)
        if clean.ndim < 2 or len(clean) < 2:
            raise SpecError(
                f"detector '{self.name}': fit needs a batch of clean observations (n, ...); collect some first"
            )
        if clean.dtype.kind == "f" and not np.isfinite(clean).all():
            raise ObservationError(f"detector '{self.name}': clean observations contain NaN or inf; fix the data")
        self.policy, self.clean = policy, clean
        self._fit()
        return self

    def _fit(self) -> None:
        """Fit-time work on ``self.policy`` and ``self.clean`` (nothing by default)."""

    def _check_fitted(self) -> None:
        if self.policy is None:
            raise SpecError(f"detector '{self.name}' is not fitted; call fit(policy, clean_observations) first")

    def score_model(self) -> float:
        """Model-level score of the fitted policy."""
        self._check_fitted()
        if "model" not in self.levels:
            raise SpecError(f"detector '{self.name}' scores inputs only; use score_inputs, or a model-level detector")
        return float(self._score_model())

    def score_inputs(self, obs: np.ndarray) -> np.ndarray:
        """Input-level score of each observation of a batch."""
        self._check_fitted()
        if "input" not in self.levels:
            raise SpecError(f"detector '{self.name}' scores models only; use score_model, or an input-level detector")
        obs = np.asarray(obs)
        if obs.shape[1:] != self.clean.shape[1:]:
            raise ObservationError(
                f"detector '{self.name}': observations of shape {obs.shape[1:]} do not match the clean {self.clean.shape[1:]}; "
                "score observations of the env the detector was fitted on"
            )
        return np.asarray(self._score_inputs(obs), dtype=np.float64)

    def _score_model(self) -> float:
        raise NotImplementedError

    def _score_inputs(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def input_threshold(self) -> float:
        """Input-level flag threshold: ``score_inputs(obs) > input_threshold()`` flags an observation."""
        return self.input_cutoff

    def probability(self, score: float) -> float:
        """P(backdoored) of a model-level score: the fixed logistic around ``threshold`` (no labels involved)."""
        z = (score - self.threshold) / self.scale
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def details(self) -> dict[str, Any]:
        """What the analysis found (e.g. a recovered trigger), as JSON-ready values."""
        return {}

    def profile(self) -> tuple[list[str], np.ndarray] | None:
        """The policy's responses to candidates shared by every agent of an env family, keyed by candidate
        (after :meth:`score_model`), for comparing agents with their population; ``None`` if the detector has none."""
        return None


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
