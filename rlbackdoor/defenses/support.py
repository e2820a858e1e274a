"""Support sanitizer: observations off the clean data's support are pulled back into it; the rest pass as they are."""

from __future__ import annotations

from typing import Any

import numpy as np

from rlbackdoor.defenses.base import Access, Sanitizer
from rlbackdoor.errors import SpecError


class SupportSanitizer(Sanitizer):
    """Detect, then repair. An observation with a feature outside the clean ``[q, 1 - q]`` quantile box
    widened by ``slack`` times its width on each side, or with a Mahalanobis distance to the clean data
    (shrunk covariance) above ``margin`` times the largest clean distance, is repaired: the features
    outside the box are clipped into it (``repair="clip"``) or replaced by their clean conditional mean
    given the others (``repair="impute"``: Gaussian, clipped into the box), then the point is shrunk
    toward the clean mean onto that distance if still too far.
    Everything else passes unchanged, so the clean task is untouched. The score is the Mahalanobis
    distance.

    Works where subspace projection cannot: full-rank, low-dimensional observations (CartPole's 4
    numbers). An in-distribution trigger (each feature common, the combination rare) is caught only
    as far as its Mahalanobis distance stands out.

    Clipping keeps a feature's direction (benign where the box edge is a normal state for the policy);
    imputation forgets the trigger's value altogether (better when the edge itself is a state where the
    clean policy takes the target action, e.g. a cart at the end of its track).

    :param repair: ``clip`` or ``impute`` (see above).
    :param q: tail mass of the box on each side of each feature.
    :param slack: how far (in box widths) a feature may leave the box before it is clipped.
    :param margin: the Mahalanobis threshold is the largest clean distance times this.
    :param shrinkage: covariance shrinkage toward a scaled identity.
    """

    name = "support"
    access = (Access.CLEAN_TRAJECTORIES,)

    def __init__(
        self,
        repair: str = "clip",
        q: float = 0.001,
        slack: float = 1.0,
        margin: float = 1.5,
        shrinkage: float = 0.05,
    ) -> None:
        super().__init__()
        if repair not in ("clip", "impute"):
            raise SpecError(f"sanitizer: repair '{repair}' is unknown; use clip or impute")
        if not 0.0 <= q < 0.5:
            raise SpecError(f"sanitizer: q={q} must lie in [0, 0.5); it is the tail mass clipped per side")
        self.mode, self.q, self.slack, self.margin, self.shrinkage = repair, q, slack, margin, shrinkage
        self.name = "support" if repair == "clip" else "impute"

    def _fit(self, clean: np.ndarray) -> None:
        n, d = clean.shape
        if n < d + 2:
            raise SpecError(f"sanitizer: n={n} clean observations are too few for {d} features; use n >= {2 * d + 2}")
        self.low, self.high = np.quantile(clean, [self.q, 1.0 - self.q], axis=0)
        width = self.high - self.low
        self.outer_low, self.outer_high = self.low - self.slack * width, self.high + self.slack * width
        self.mean = clean.mean(axis=0)
        cov = np.atleast_2d(np.cov(clean, rowvar=False))
        scale = np.trace(cov) / d if np.trace(cov) > 0 else 1.0
        self.cov = (1.0 - self.shrinkage) * cov + self.shrinkage * scale * np.eye(d)
        self.precision = np.linalg.pinv(self.cov)
        self.threshold = float(self._score(clean).max() * self.margin + 1e-9)

    def _transform(self, obs: np.ndarray) -> np.ndarray:
        far = ((obs < self.outer_low) | (obs > self.outer_high)).any(axis=1) | (self._score(obs) > self.threshold)
        if not far.any():
            return obs
        out = obs.copy()
        out[far] = self._repair(obs[far])
        return out

    def _repair(self, obs: np.ndarray) -> np.ndarray:
        out = obs.copy()
        outside = (obs < self.outer_low) | (obs > self.outer_high)
        patterns, which = np.unique(outside, axis=0, return_inverse=True)
        for k, bad in enumerate(patterns):
            if not bad.any():
                continue
            rows = np.flatnonzero(which.reshape(-1) == k)
            if self.mode == "clip":
                out[np.ix_(rows, bad)] = np.clip(obs[np.ix_(rows, bad)], self.low[bad], self.high[bad])
            else:
                out[np.ix_(rows, bad)] = self._impute(obs[rows], bad, ~bad)
        dist = self._score(out)
        far = dist > self.threshold
        out[far] = self.mean + (out[far] - self.mean) * (self.threshold / dist[far])[:, None]
        return out

    def _impute(self, obs: np.ndarray, bad: np.ndarray, good: np.ndarray) -> np.ndarray:
        """Clean conditional mean of the ``bad`` features given the ``good`` ones (Gaussian, shrunk covariance)."""
        if not good.any():
            return np.broadcast_to(self.mean[bad], (len(obs), int(bad.sum())))
        gain = self.cov[np.ix_(bad, good)] @ np.linalg.pinv(self.cov[np.ix_(good, good)])
        imputed = self.mean[bad] + (obs[:, good] - self.mean[good]) @ gain.T
        return np.clip(imputed, self.low[bad], self.high[bad])

    def _score(self, obs: np.ndarray) -> np.ndarray:
        centred = obs - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "features": len(self.mean)}
