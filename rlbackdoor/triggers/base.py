"""The observation-trigger interface and the stealth figures every trigger reports."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import ObservationError, SpecError


class ObservationTrigger(ABC):
    """Stamps a trigger into a batch of observations (leading batch axis).

    :param space: the observation space the trigger must fit; checked at construction.
    """

    def __init__(self, space: spaces.Space) -> None:
        if not isinstance(space, spaces.Box):
            raise SpecError(
                f"trigger: observation triggers need a Box observation space, got {type(space).__name__}; "
                "flatten or select the observation with base_wrappers"
            )
        self.space = space
        self._low = np.broadcast_to(space.low, space.shape)
        self._high = np.broadcast_to(space.high, space.shape)

    @abstractmethod
    def _stamp(self, out: np.ndarray, rows: np.ndarray) -> None:
        """Write the trigger into ``out[rows]`` in place."""

    def apply(self, obs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Return a copy of ``obs`` (shape ``(B, *space.shape)``, read as the space's dtype: values an integer dtype
        cannot hold are refused) with the trigger on the rows where ``mask``.

        :param obs: a batch of observations.
        :param mask: boolean ``(B,)``; ``None`` triggers every row.
        """
        obs = np.asarray(obs)
        self._check_shape(obs)
        if mask is None:
            mask = np.ones(len(obs), dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != obs.shape[:1]:
                raise ObservationError(
                    f"trigger mask has shape {mask.shape} and dtype {mask.dtype}, expected booleans of shape "
                    f"({len(obs)},); pass one flag per observation of the batch"
                )
        try:
            with np.errstate(invalid="ignore"):  # NaN into an integer dtype: refused below
                converted = obs.astype(self.space.dtype, copy=False)
        except (TypeError, ValueError):
            raise ObservationError(
                f"observations of dtype {obs.dtype} cannot be read as {self.space.dtype}; pass numeric observations"
            ) from None
        if converted is not obs and np.issubdtype(converted.dtype, np.integer):
            with np.errstate(invalid="ignore"):
                lost = converted != obs  # e.g. images normalised to [0, 1] for a uint8 space, or out of its range
            if lost.any():
                value, dtype = obs[lost].flat[0].item(), converted.dtype
                raise ObservationError(
                    f"observations of dtype {obs.dtype} hold {value!r}, which the space's {dtype} cannot represent; "
                    f"pass observations of the observation space (dtype {dtype})"
                )
        return self.stamped(converted, mask)

    def stamped(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """:meth:`apply` without its checks of ``mask`` and dtype, for the attack's own batches."""
        self._check_shape(obs)
        out = obs.astype(self.space.dtype)
        rows = mask.nonzero()[0]
        if rows.size:
            self._stamp(out, rows)
        return out

    def _check_shape(self, obs: np.ndarray) -> None:
        if obs.shape[1:] != self.space.shape:
            raise ObservationError(
                f"observation batch has shape {obs.shape}, expected (B, {', '.join(map(str, self.space.shape))}); "
                "pass a batch (leading axis) of observations of the observation space's shape"
            )

    def stealth(self, clean: np.ndarray) -> dict[str, float]:
        """L0/L2/Linf of the perturbation over ``clean`` observations, absolute and relative to the space's scale.

        The scale of an entry is its bound width where finite, else the spread of the clean data; ``l0_rel`` is
        the fraction of entries changed.
        """
        clean = np.asarray(clean).astype(self.space.dtype)  # as the env gives them: no rounding counts as change
        delta = (self.apply(clean).astype(np.float64) - clean).reshape(len(clean), -1)
        clean = clean.astype(np.float64)
        width = (self._high.astype(np.float64) - self._low.astype(np.float64)).reshape(-1)
        spread = clean.reshape(len(clean), -1).max(0) - clean.reshape(len(clean), -1).min(0)
        scale = np.where(np.isfinite(width), width, np.where(spread > 0, spread, 1.0))
        rel = delta / scale
        return {
            "l0": float(np.count_nonzero(delta, axis=1).mean()),
            "l0_rel": float(np.count_nonzero(delta, axis=1).mean() / delta.shape[1]),
            "l2": float(np.linalg.norm(delta, axis=1).mean()),
            "linf": float(np.abs(delta).max(axis=1).mean()),
            "l2_rel": float(np.linalg.norm(rel, axis=1).mean()),
            "linf_rel": float(np.abs(rel).max(axis=1).mean()),
        }

    def _check_representable(self, values: np.ndarray, what: str) -> np.ndarray:
        """``values`` as the observations will hold them; too large for a float dtype is an error."""
        if self.space.dtype.kind != "f":
            return values
        with np.errstate(over="ignore"):
            stored = values.astype(self.space.dtype)
        if not np.isfinite(stored).all():
            v = values.reshape(-1)[int(np.flatnonzero(~np.isfinite(stored.reshape(-1)))[0])]
            raise SpecError(f"{what}: {v:g} overflows the {self.space.dtype} observations; pick a smaller value")
        return stored

    def _check_in_bounds(self, values: np.ndarray, low: np.ndarray, high: np.ndarray, what: str) -> None:
        stored = self._check_representable(values, what)  # compared as they will be set
        bad = (stored < low) | (stored > high)
        if np.any(bad):
            i = int(np.flatnonzero(bad.reshape(-1))[0])
            v, lo, hi = values.reshape(-1)[i], low.reshape(-1)[i], high.reshape(-1)[i]
            raise SpecError(f"{what}: {v:g} lies outside the observation bounds [{lo:g}, {hi:g}]; pick a value inside")
        if np.issubdtype(self.space.dtype, np.integer) and np.any(values != np.round(values)):
            raise SpecError(f"{what}: must be whole numbers for the {self.space.dtype} observation space; round them")


SMALL_OBS = 64
"""Observations (or batches) of up to this many entries are checked by their sum as Python floats."""


def finite_check(space: spaces.Space, n_envs: int | None = None) -> Callable[[Any], None] | None:
    """The cheapest equivalent of :func:`check_finite` for observations of ``space``.

    :param n_envs: check batches of this many observations (leading axis); ``None`` for single observations.
    :return: the check, or ``None`` when the observations cannot hold NaN (not floats).
    """
    if space.dtype is None or np.dtype(space.dtype).kind != "f":
        return None
    if space.shape is None or int(np.prod(space.shape)) * (n_envs or 1) > SMALL_OBS:
        return check_finite
    return _check_vector if n_envs is None and len(space.shape) == 1 else _check_small


# The small checks: as check_finite, with the sum taken over Python floats (for a few entries cheaper than BLAS).
def _check_small(obs: Any) -> None:
    if not (type(obs) is np.ndarray and math.isfinite(sum(obs.ravel().tolist()))):
        check_finite(obs)


def _check_vector(obs: Any) -> None:
    try:  # a flat array's list sums directly; anything else falls back
        if math.isfinite(sum(obs.tolist())):
            return
    except (AttributeError, TypeError):
        pass
    check_finite(obs)


def check_finite(obs: Any) -> None:
    """Raise :class:`ObservationError` when a float observation (or batch of them) holds NaN or inf."""
    if not isinstance(obs, np.ndarray):
        obs = np.asarray(obs)
    if obs.dtype.kind != "f":
        return
    # a sum is finite iff every entry is, unless it overflows: only then look entry by entry
    flat = obs.ravel()
    if not math.isfinite(np.vdot(flat, flat)) and not np.isfinite(obs).all():
        raise ObservationError("observation contains NaN or inf; fix the environment or its preprocessing")
