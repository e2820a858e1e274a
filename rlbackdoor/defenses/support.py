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

    def _outside(self, obs: np.ndarray) -> np.ndarray:
        return (obs < self.outer_low) | (obs > self.outer_high)

    def _far(self, obs: np.ndarray) -> np.ndarray:
        return self._outside(obs).any(axis=1) | (self._score(obs) > self.threshold)

    def _transform(self, obs: np.ndarray) -> np.ndarray:
        far = self._far(obs)
        if not far.any():
            return obs
        out = obs.copy()
        out[far] = self._repair(obs[far])
        return out

    def _repair(self, obs: np.ndarray) -> np.ndarray:
        out = obs.copy()
        outside = self._outside(obs)
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


class TransitionModel:
    """Linear one-step model of the clean dynamics, ``s' = [s, onehot(a), 1] W`` (least squares), discrete actions.

    :param n_actions: size of the discrete action space.
    """

    def __init__(self, n_actions: int) -> None:
        self.n_actions = n_actions
        self.weights = np.empty((0, 0))

    def _design(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        onehot = np.eye(self.n_actions)[np.asarray(actions, dtype=np.int64).reshape(-1)]
        return np.hstack([obs.reshape(len(obs), -1), onehot, np.ones((len(obs), 1))])

    def fit(self, obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray) -> TransitionModel:
        """Fit on clean transitions ``(s, a, s')``."""
        if len(obs) < 2:
            raise SpecError(f"sanitizer: {len(obs)} clean transitions are too few for a dynamics model; use more")
        design = self._design(np.asarray(obs, np.float64), actions)
        self.weights = np.linalg.lstsq(design, next_obs.reshape(len(obs), -1).astype(np.float64), rcond=None)[0]
        return self

    def predict(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Predicted next observations (flat rows)."""
        return self._design(np.asarray(obs, np.float64), actions) @ self.weights


class TrackingPolicy:
    """Run-time repair with memory, one episode at a time: an observation off the clean support has its
    off-box features replaced by their one-step prediction from the previous observation the agent acted
    on and the action taken (a :class:`TransitionModel` of clean transitions); the first observation of
    an episode, or one off the support in none of its features, gets the support sanitizer's repair.
    Where a trigger overwrites a feature the dynamics determine (a cart's position follows from the last
    position and velocity), this restores the true value, which no single-observation repair can.

    Call :meth:`reset` at each episode start and :meth:`observe` after each executed action.

    :param policy: the agent (SB3 ``predict``).
    :param sanitizer: a fitted support sanitizer (detects, and repairs where there is no prediction).
    :param model: a fitted transition model.
    """

    def __init__(self, policy: Any, sanitizer: SupportSanitizer, model: TransitionModel) -> None:
        self.policy, self.sanitizer, self.model = policy, sanitizer, model
        self.previous: tuple[np.ndarray, Any] | None = None

    def reset(self) -> None:
        """Forget the episode."""
        self.previous = None

    def sanitize(self, obs: np.ndarray) -> np.ndarray:
        """The observation the agent acts on."""
        flat = self.sanitizer._flat(np.asarray(obs)[None])
        if not self.sanitizer._far(flat)[0]:
            return np.asarray(obs)
        outside = self.sanitizer._outside(flat)[0]
        if self.previous is None or not outside.any():
            return self.sanitizer.repair(np.asarray(obs)[None])[0]
        predicted = self.model.predict(self.previous[0].reshape(1, -1), np.asarray([self.previous[1]]))[0]
        flat[0, outside] = predicted[outside]
        return flat.reshape(np.shape(obs)).astype(np.asarray(obs).dtype)

    def observe(self, acted_on: np.ndarray, action: Any) -> None:
        """Remember the observation the agent acted on and the action executed."""
        self.previous = (np.asarray(acted_on, dtype=np.float64), action)

    def predict(self, obs: np.ndarray) -> Any:
        """The agent's deterministic action on one sanitized observation."""
        return self.policy.predict(self.sanitize(obs)[None], deterministic=True)[0][0]
