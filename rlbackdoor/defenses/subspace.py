"""Safe-subspace projection (Bharti et al., NeurIPS 2022): act on ``P s`` with ``P`` spanned by clean data."""

from __future__ import annotations

from typing import Any

import numpy as np

from rlbackdoor.defenses.base import Access, Sanitizer
from rlbackdoor.errors import SpecError


class SubspaceSanitizer(Sanitizer):
    """Projects observations onto the top-``dim`` right singular directions of the uncentred clean matrix.

    The residual ``||s - P s||`` is the input-level score. The projection only removes a trigger that
    leaves the span of clean observations, so it helps where clean data are rank-deficient (images,
    RAM-like vectors); on full-rank low-dimensional spaces it is (close to) the identity.

    :param dim: subspace dimension; ``None`` picks it from the spectrum: up to the first singular-value
        cliff (a drop by ``cliff`` times: the clean data's rank), else the fewest directions holding
        ``energy`` of the squared singular values.
    :param cliff: ratio ``s_i / s_{i+1}`` that counts as a cliff.
    :param stability: fitted on half the clean data, the basis must keep this share of the other half's energy.
    """

    name = "subspace"
    access = (Access.CLEAN_TRAJECTORIES,)

    def __init__(
        self, dim: int | None = None, energy: float = 0.9999, cliff: float = 1e3, stability: float = 0.98
    ) -> None:
        super().__init__()
        self.dim, self.energy, self.cliff, self.stability = dim, energy, cliff, stability
        self.basis = np.empty((0, 0))
        self.singular_values = np.empty(0)

    def min_clean(self, d: int) -> int:
        if self.dim is not None and self.dim > d:
            raise SpecError(
                f"sanitizer: dim {self.dim} is larger than the {d} features of an observation; use dim <= {d}"
            )
        return 2 * self.dim if self.dim is not None else 2  # a stable basis: twice as many samples as directions

    def _choose_dim(self, s: np.ndarray) -> int:
        share = np.cumsum(s**2) / np.sum(s**2)
        by_energy = int(np.searchsorted(share, self.energy) + 1)
        ratios = s[:-1] / np.maximum(s[1:], np.finfo(float).tiny)
        cliffs = np.flatnonzero(ratios > self.cliff)
        return int(cliffs[0] + 1) if cliffs.size else by_energy

    def _fit(self, clean: np.ndarray) -> None:
        n, d_obs = clean.shape
        if self.dim is not None and not 1 <= self.dim <= min(n, d_obs):
            raise SpecError(
                f"sanitizer: dim {self.dim} is larger than the data allow (n={n} samples, D={d_obs} features); "
                f"use dim <= {min(n, d_obs)} or more clean samples"
            )
        _, s, vt = np.linalg.svd(clean, full_matrices=False)
        dim = self.dim or self._choose_dim(s)
        if n < 2 * dim:
            raise SpecError(
                f"sanitizer: n={n} clean observations are too few for a stable {dim}-dimensional basis; "
                f"use n >= {2 * dim}"
            )
        held_out = self._held_out_energy(clean, dim)
        if held_out < self.stability:
            raise SpecError(
                f"sanitizer: the {dim}-dimensional basis from n={n} clean observations is unstable (fitted on half "
                f"the data it keeps {held_out:.3f} of the other half's energy); use n >= {2 * n}"
            )
        self.basis, self.singular_values, self.dim_ = vt[:dim], s, dim

    @staticmethod
    def _held_out_energy(clean: np.ndarray, dim: int) -> float:
        """Share of the second half's squared norm kept by the basis fitted on the first half."""
        first, second = clean[: len(clean) // 2], clean[len(clean) // 2 :]
        basis = np.linalg.svd(first, full_matrices=False)[2][:dim]
        total = float(np.sum(second**2))
        return float(np.sum((second @ basis.T) ** 2) / total) if total > 0 else 1.0

    def _transform(self, obs: np.ndarray) -> np.ndarray:
        return (obs @ self.basis.T) @ self.basis

    def _score(self, obs: np.ndarray) -> np.ndarray:
        return np.linalg.norm(obs - self._transform(obs), axis=1)

    def params(self) -> dict[str, Any]:
        return {"dim": int(self.dim_), "features": int(self.basis.shape[1])}
