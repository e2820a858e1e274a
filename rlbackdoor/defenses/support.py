"""Support sanitizer: pull observations back into the clean data's support (quantile box + Mahalanobis ball)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from rlbackdoor.defenses.base import Access, Sanitizer
from rlbackdoor.errors import SpecError


class SupportSanitizer(Sanitizer):
    """Clip each feature to its clean ``[q, 1-q]`` quantiles, then shrink toward the clean mean any point
    whose Mahalanobis distance exceeds the clean ``level`` quantile of the chi distribution.

    Works where subspace projection cannot: full-rank, low-dimensional observations (CartPole's 4 numbers).
    The score is the Mahalanobis distance of the raw observation.

    :param q: tail mass clipped per feature on each side.
    :param level: quantile of the chi(D) distribution that bounds the Mahalanobis ball.
    :param shrinkage: covariance shrinkage toward a scaled identity (Ledoit-Wolf style constant).
    """

    name = "support"
    access = (Access.CLEAN_TRAJECTORIES,)

    def __init__(self, q: float = 0.005, level: float = 0.999, shrinkage: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= q < 0.5:
            raise SpecError(f"sanitizer: q={q} must lie in [0, 0.5); it is the tail mass clipped per side")
        self.q, self.level, self.shrinkage = q, level, shrinkage

    def _fit(self, clean: np.ndarray) -> None:
        n, d = clean.shape
        if n < d + 2:
            raise SpecError(f"sanitizer: n={n} clean observations are too few for {d} features; use n >= {2 * d + 2}")
        self.low, self.high = np.quantile(clean, [self.q, 1.0 - self.q], axis=0)
        self.mean = clean.mean(axis=0)
        cov = np.atleast_2d(np.cov(clean, rowvar=False))
        scale = np.trace(cov) / d if np.trace(cov) > 0 else 1.0
        cov = (1.0 - self.shrinkage) * cov + self.shrinkage * scale * np.eye(d)
        self.precision = np.linalg.pinv(cov)
        self.radius = float(np.sqrt(stats.chi2.ppf(self.level, df=d)))

    def _mahalanobis(self, obs: np.ndarray) -> np.ndarray:
        centred = obs - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def _transform(self, obs: np.ndarray) -> np.ndarray:
        clipped = np.clip(obs, self.low, self.high)
        dist = self._mahalanobis(clipped)
        factor = np.where(dist > self.radius, self.radius / np.maximum(dist, 1e-12), 1.0)
        return self.mean + (clipped - self.mean) * factor[:, None]

    def _score(self, obs: np.ndarray) -> np.ndarray:
        return self._mahalanobis(obs)

    def params(self) -> dict[str, Any]:
        return {"radius": self.radius, "features": len(self.mean)}
