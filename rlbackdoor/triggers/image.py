"""Triggers on image observations (HWC or CHW, uint8 or float): patch and blend."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import BlendTrigger, PatchTrigger
from rlbackdoor.triggers.base import ObservationTrigger


def image_layout(shape: tuple[int, ...], layout: str = "auto") -> str:
    """``hw``, ``hwc`` or ``chw``: ``auto`` takes the smallest axis of a 3-D shape as the channel axis."""
    if len(shape) == 2:
        return "hw"
    if len(shape) != 3:
        raise SpecError(f"trigger: patch and blend triggers need an image (H, W[, C]) observation, got shape {shape}")
    if layout != "auto":
        return layout
    return "chw" if shape[0] < shape[2] else "hwc"


class PatchObsTrigger(ObservationTrigger):
    """Overwrite a ``size`` region at ``position`` with a constant or a pattern."""

    def __init__(self, spec: PatchTrigger, space: spaces.Space) -> None:
        super().__init__(space)
        self.layout = image_layout(space.shape, spec.layout)
        h, w, c = self._hwc(space.shape)
        (ph, pw), (r, col) = spec.size, spec.position
        if r + ph > h or col + pw > w:
            raise SpecError(
                f"trigger: a {ph}x{pw} patch at ({r}, {col}) does not fit the {h}x{w} image; "
                f"use size <= ({h - r}, {w - col}) or move position"
            )
        hwc = self._pattern(spec, ph, pw, c, f"layout {self.layout} of the {space.shape} observation")
        region = (slice(r, r + ph), slice(col, col + pw))
        self.region = (slice(None), *region) if self.layout == "chw" else region
        self.pattern = np.moveaxis(hwc, -1, 0) if self.layout == "chw" else hwc
        if self.layout == "hw":
            self.pattern = self.pattern[..., 0]
        self._check_in_bounds(
            self.pattern,
            self._low[self.region],
            self._high[self.region],
            "trigger.value" if spec.pattern is None else "trigger.pattern",
        )
        self.alpha = 1.0

    def _hwc(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        if self.layout == "hw":
            return shape[0], shape[1], 1
        return (shape[1], shape[2], shape[0]) if self.layout == "chw" else (shape[0], shape[1], shape[2])

    @staticmethod
    def _pattern(spec: PatchTrigger, ph: int, pw: int, c: int, layout: str) -> np.ndarray:
        raw = np.asarray(spec.value if spec.pattern is None else spec.pattern, dtype=np.float64)
        if raw.ndim == 2:
            raw = raw[..., None]
        target = (ph, pw, c)
        try:
            return np.broadcast_to(raw, target).copy()
        except ValueError:
            raise SpecError(
                f"trigger: value/pattern of shape {raw.shape} does not broadcast to the patch (H, W, C) = {target} "
                f"({layout}); give a scalar, one value per channel, or an HxW[xC] pattern, or fix layout"
            ) from None

    def _stamp(self, out: np.ndarray, rows: np.ndarray) -> None:
        out[(rows, *self.region)] = self.pattern.astype(out.dtype)


class BlendObsTrigger(PatchObsTrigger):
    """Blend a pattern into a region: ``(1 - alpha) * obs + alpha * pattern``."""

    def __init__(self, spec: BlendTrigger, space: spaces.Space) -> None:
        super().__init__(spec, space)
        self.alpha = spec.alpha

    def _stamp(self, out: np.ndarray, rows: np.ndarray) -> None:
        idx = (rows, *self.region)
        mixed = (1.0 - self.alpha) * out[idx].astype(np.float64) + self.alpha * self.pattern
        out[idx] = (np.round(mixed) if out.dtype.kind in "iu" else mixed).astype(out.dtype)
