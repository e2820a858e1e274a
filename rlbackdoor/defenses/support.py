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
    outside the box are clipped into it (``repair="clip"``), or its suspect features are replaced by their
    clean conditional mean given the others (``repair="impute"``: Gaussian, clipped into the box); then
    the point is shrunk toward the clean mean onto that distance if still too far. The suspect features
    are those outside the box, then, while the rest is still too far, the one least consistent with the
    others (largest conditional z-score): a trigger inside the box on each feature but far from the clean
    data jointly (two velocities at extremes of the same sign where clean ones are anticorrelated) is
    imputed away, not only shrunk.
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

    def min_clean(self, d: int) -> int:
        return d + 2  # a covariance of d features, with a degree of freedom to spare

    def _fit(self, clean: np.ndarray) -> None:
        n, d = clean.shape
        if n < self.min_clean(d):
            raise SpecError(
                f"sanitizer: n={n} clean observations are too few for {d} features; use n >= {self.min_clean(d)}"
            )
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
        repaired = self._outside(obs) if self.mode == "clip" else self.suspect(obs)
        patterns, which = np.unique(repaired, axis=0, return_inverse=True)
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

    def suspect(self, obs: np.ndarray) -> np.ndarray:
        """Which features of each (flat) observation to repair: those outside the box, then, one at a time
        while the others' Mahalanobis distance (marginal over the features not yet suspect) exceeds the
        threshold, the one with the largest conditional z-score given the others."""
        bad = self._outside(obs)
        for _ in range(obs.shape[1]):
            patterns, which = np.unique(bad, axis=0, return_inverse=True)
            added = False
            for k, pattern in enumerate(patterns):
                good = ~pattern
                if not good.any():
                    continue
                rows = np.flatnonzero(which.reshape(-1) == k)
                centred = obs[np.ix_(rows, good)] - self.mean[good]
                precision = np.linalg.pinv(self.cov[np.ix_(good, good)])
                pulled = centred @ precision  # feature j: its deviation from the conditional mean, / conditional var
                far = np.einsum("ij,ij->i", pulled, centred) > self.threshold**2
                if not far.any():
                    continue
                z = np.abs(pulled[far]) / np.sqrt(np.diag(precision))
                bad[rows[far], np.flatnonzero(good)[z.argmax(axis=1)]] = True
                added = True
            if not added:
                break
        return bad

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

    ``spread`` is the largest leave-one-out error per feature on the clean transitions (infinite where a
    transition is needed to fit itself, as when there are fewer transitions than inputs).

    :param n_actions: size of the discrete action space.
    """

    def __init__(self, n_actions: int) -> None:
        self.n_actions = n_actions
        self.weights = np.empty((0, 0))
        self.spread = np.empty(0)

    def _design(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        onehot = np.eye(self.n_actions)[np.asarray(actions, dtype=np.int64).reshape(-1)]
        return np.hstack([obs.reshape(len(obs), -1), onehot, np.ones((len(obs), 1))])

    def fit(self, obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray) -> TransitionModel:
        """Fit on clean transitions ``(s, a, s')``."""
        if len(obs) < 2:
            raise SpecError(f"sanitizer: {len(obs)} clean transitions are too few for a dynamics model; use more")
        design = self._design(np.asarray(obs, np.float64), actions)
        target = next_obs.reshape(len(obs), -1).astype(np.float64)
        self.weights = np.linalg.lstsq(design, target, rcond=None)[0]
        free = 1.0 - np.einsum("ij,ji->i", design, np.linalg.pinv(design))  # 1 - leverage
        loo = np.abs(target - design @ self.weights) / np.where(free > 1e-9, free, np.nan)[:, None]
        self.spread = np.nan_to_num(loo, nan=np.inf).max(axis=0)
        return self

    def predict(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Predicted next observations (flat rows)."""
        return self._design(np.asarray(obs, np.float64), actions) @ self.weights


class TrackingPolicy:
    """Run-time repair with memory, one episode at a time: an observation off the clean support has its
    suspect features (:meth:`SupportSanitizer.suspect`) replaced by their one-step prediction from the
    previous observation the agent acted on and the action taken (a :class:`TransitionModel` of clean
    transitions); the first observation of an episode gets the support sanitizer's repair.
    Where a trigger overwrites a feature the dynamics determine (a cart's position follows from the last
    position and velocity), this restores the true value, which no single-observation repair can.
    When the previous observation passed unrepaired, features further from their prediction than
    ``margin`` times the model's clean ``spread`` are replaced too: of a trigger jointly far from the clean
    data, one feature may look plausible alone but contradict the dynamics. (After a repair the prediction
    is not trusted that far: errors would compound.)

    Call :meth:`reset` at each episode start and :meth:`observe` after each executed action.

    :param policy: the agent (SB3 ``predict``).
    :param sanitizer: a fitted support sanitizer (detects, and repairs where there is no prediction).
    :param model: a fitted transition model.
    :param margin: how many clean spreads a feature may stray from its prediction in a flagged observation.
    """

    def __init__(self, policy: Any, sanitizer: SupportSanitizer, model: TransitionModel, margin: float = 1.5) -> None:
        self.policy, self.sanitizer, self.model, self.margin = policy, sanitizer, model, margin
        self.previous: tuple[np.ndarray, Any] | None = None
        self.passed = True

    def reset(self) -> None:
        """Forget the episode."""
        self.previous, self.passed = None, True

    def sanitize(self, obs: np.ndarray) -> np.ndarray:
        """The observation the agent acts on."""
        flat = self.sanitizer._flat(np.asarray(obs)[None])
        trusted, self.passed = self.passed, not self.sanitizer._far(flat)[0]
        if self.passed:
            return np.asarray(obs)
        if self.previous is None:
            return self.sanitizer.repair(np.asarray(obs)[None])[0]
        predicted = self.model.predict(self.previous[0].reshape(1, -1), np.asarray([self.previous[1]]))[0]
        replace = self.sanitizer.suspect(flat)[0]
        if trusted:
            replace |= np.abs(flat[0] - predicted) > self.margin * self.model.spread
        flat[0, replace] = predicted[replace]
        return flat.reshape(np.shape(obs)).astype(np.asarray(obs).dtype)

    def observe(self, acted_on: np.ndarray, action: Any) -> None:
        """Remember the observation the agent acted on and the action executed."""
        self.previous = (np.asarray(acted_on, dtype=np.float64), action)

    def predict(self, obs: np.ndarray) -> Any:
        """The agent's deterministic action on one sanitized observation."""
        return self.policy.predict(self.sanitize(obs)[None], deterministic=True)[0][0]
