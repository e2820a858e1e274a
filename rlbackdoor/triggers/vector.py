"""Triggers on chosen entries of (flattened) observations: value, additive, in-distribution."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import AdditiveTrigger, InDistributionTrigger, ValueTrigger
from rlbackdoor.triggers.base import ObservationTrigger


class _IndexTrigger(ObservationTrigger):
    def __init__(self, indices: list[int], space: spaces.Space) -> None:
        super().__init__(space)
        size = int(np.prod(space.shape))
        bad = [i for i in indices if not 0 <= i < size]
        if bad:
            raise SpecError(
                f"trigger.indices: {bad} out of range for an observation of {size} entries; use indices in [0, {size - 1}]"
            )
        self.indices = np.asarray(indices, dtype=np.intp)
        self.low = self._low.reshape(-1)[self.indices]
        self.high = self._high.reshape(-1)[self.indices]


class ValueObsTrigger(_IndexTrigger):
    """Set ``indices`` (of the flattened observation) to fixed ``values``."""

    def __init__(self, spec: ValueTrigger, space: spaces.Space) -> None:
        super().__init__(spec.indices, space)
        self.values = np.asarray(spec.values, dtype=np.float64)
        self._check_in_bounds(self.values, self.low, self.high, "trigger.values")
        self.values = self.values.astype(space.dtype)

    def _stamp(self, out: np.ndarray, rows: np.ndarray) -> None:
        out.reshape(len(out), -1)[rows[:, None], self.indices] = self.values


class AdditiveObsTrigger(_IndexTrigger):
    """Add ``values`` to ``indices``, clipped to the space bounds."""

    def __init__(self, spec: AdditiveTrigger, space: spaces.Space) -> None:
        super().__init__(spec.indices, space)
        self.values = np.asarray(spec.values, dtype=np.float64)
        if np.issubdtype(space.dtype, np.integer) and np.any(self.values != np.round(self.values)):
            raise SpecError(
                f"trigger.values: must be whole numbers for the {space.dtype} observation space; round them"
            )
        self._check_representable(self.values, "trigger.values")
        if space.dtype.kind == "f":  # sums stay finite: unbounded entries clip to the dtype's range
            limit = float(np.finfo(space.dtype).max)
            self.low, self.high = np.maximum(self.low, -limit), np.minimum(self.high, limit)

    def _stamp(self, out: np.ndarray, rows: np.ndarray) -> None:
        flat = out.reshape(len(out), -1)
        sel = (rows[:, None], self.indices)
        flat[sel] = np.clip(flat[sel].astype(np.float64) + self.values, self.low, self.high).astype(out.dtype)


class InDistributionObsTrigger(ValueObsTrigger):
    """Set ``indices`` to per-entry quantiles of clean rollouts: each value seen in clean data, the joint rare."""

    def __init__(self, spec: InDistributionTrigger, space: spaces.Space, clean: np.ndarray) -> None:
        _IndexTrigger.__init__(self, spec.indices, space)
        clean = np.asarray(clean, dtype=np.float64)
        if len(clean) < 2:
            raise SpecError("trigger: in_distribution needs clean observations to fit its values; raise fit_steps")
        size = int(np.prod(space.shape))
        if clean.size != len(clean) * size:
            raise SpecError(
                f"trigger: in_distribution clean observations have shape {clean.shape}, expected (N, "
                f"{', '.join(map(str, space.shape))}); fit it on observations of this env"
            )
        clean = clean.reshape(len(clean), size)
        if not np.isfinite(clean[:, self.indices]).all():
            raise SpecError(
                "trigger: in_distribution clean observations hold NaN or inf at its indices; fix the environment "
                "or choose other indices"
            )
        values = np.quantile(clean[:, self.indices], spec.quantiles, axis=0).diagonal()
        if np.issubdtype(space.dtype, np.integer):
            values = np.round(values)
        self.values = np.clip(values, self.low, self.high).astype(space.dtype)
