"""Run-time sanitization of a trained agent, scored like every other result: ASR and CTP before and after.

The defender has the agent and a clean copy of its env: it rolls the agent on the clean env to
collect ``n_clean`` observations, fits a sanitizer on them and lets the agent act on sanitized
observations. The metrics are :func:`rlbackdoor.evaluation.evaluate`'s, on the same episode seeds
before and after, so the two are paired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlbackdoor.defenses.base import SanitizedPolicy, Sanitizer
from rlbackdoor.defenses.subspace import SubspaceSanitizer
from rlbackdoor.defenses.support import SupportSanitizer
from rlbackdoor.errors import SpecError
from rlbackdoor.evaluation import evaluate
from rlbackdoor.evaluation.envs import run_env
from rlbackdoor.trajectories import collect

METHODS: dict[str, str] = {
    "subspace": "safe-subspace projection onto the clean span (Bharti et al.); for rank-deficient observations",
    "support": "out-of-support features clipped into the clean box + Mahalanobis shrinkage; low-dim full-rank obs",
    "impute": "out-of-support features replaced by their clean conditional mean + shrinkage; low-dim full-rank obs",
}
CLEAN_SEED = 10_000
"""Seed of the defender's clean rollouts (apart from the evaluation seeds)."""


def make_sanitizer(method: str, dim: int | None = None) -> Sanitizer:
    """A sanitizer by name.

    :param method: one of :data:`METHODS`.
    :param dim: subspace dimension (``subspace`` only; ``None`` picks it).
    """
    if method == "subspace":
        return SubspaceSanitizer(dim=dim)
    if method in ("support", "impute"):
        if dim is not None:
            raise SpecError("sanitize: --dim applies to the subspace method only; drop it")
        return SupportSanitizer(repair="clip" if method == "support" else "impute")
    raise SpecError(f"sanitize: unknown method '{method}'; use one of {', '.join(METHODS)}")


def clean_observations(
    policy: Any, card: Mapping[str, Any], n: int, seed: int = CLEAN_SEED, min_steps: int = 2000
) -> np.ndarray:
    """``n`` observations drawn uniformly from the agent's own rollouts on its run's clean env.

    The rollouts run for at least ``min_steps`` steps so that the sample spans several episodes.
    """
    if n < 2:
        raise SpecError(f"sanitize: n_clean={n} is too small; use at least 2 (typically 2x the observation size)")
    steps = max(n, min_steps)
    observations = collect(run_env(card).make(), policy, steps, seed).observations
    return observations[np.random.default_rng(seed).permutation(steps)[:n]]


_KEYS = ("asr", "ctp", "ctp_ratio")


def _pick(metrics: Mapping[str, Any], suffix: str) -> dict[str, Any]:
    out = {}
    for key in _KEYS:
        for part in ("", "_ci_low", "_ci_high"):
            if f"{key}{part}" in metrics:
                out[f"{key}_{suffix}{part}"] = metrics[f"{key}{part}"]
    return out


def sanitize_agent(
    policy: Any,
    card: Mapping[str, Any],
    method: str,
    n_clean: int,
    dim: int | None = None,
    baseline: Any = None,
    episodes: int = 10,
    seeds: int | Sequence[int] = 3,
    curve: Sequence[int] = (),
) -> dict[str, Any]:
    """ASR and CTP of ``policy`` before and after run-time sanitization, with CIs, and their curve against n.

    :param policy: the agent (SB3 ``predict``).
    :param card: its run's card (names the env and the attack).
    :param method: sanitizer name (:data:`METHODS`).
    :param n_clean: clean observations the sanitizer is fitted on.
    :param dim: subspace dimension (``None``: automatic).
    :param baseline: a clean-trained agent of the same config, for ``ctp_ratio``.
    :param episodes: evaluation episodes per seed.
    :param seeds: evaluation seeds, or their number.
    :param curve: other values of n to report ``asr_after`` and ``ctp_after`` for.
    """
    sizes = sorted({*curve, n_clean})
    pool = clean_observations(policy, card, max(sizes))  # a random order: each prefix is a uniform sample
    before = evaluate(policy, card, episodes=episodes, seeds=seeds, baseline=baseline)
    out: dict[str, Any] = {"method": method, **_pick(before, "before")}
    points = []
    for n in sizes:
        sanitizer = make_sanitizer(method, dim).fit(pool[:n])
        after = evaluate(SanitizedPolicy(policy, sanitizer), card, episodes=episodes, seeds=seeds, baseline=baseline)
        point = {"n_clean": n, **sanitizer.params(), **_pick(after, "after")}
        points.append(point)
        if n == n_clean:
            out.update(point)
    out["dim"] = out.get("dim")
    out["curve"] = points
    return out


def sanitize_run(
    run_dir: str | Path,
    method: str,
    n_clean: int,
    dim: int | None = None,
    baseline_dir: str | Path | None = None,
    episodes: int = 10,
    seeds: int | Sequence[int] = 3,
    curve: Sequence[int] = (),
) -> dict[str, Any]:
    """:func:`sanitize_agent` on a run directory (loaded with :func:`rlbackdoor.load_policy`)."""
    from rlbackdoor.training.artifacts import load_policy

    policy, card = load_policy(run_dir)
    baseline = load_policy(baseline_dir)[0] if baseline_dir is not None else None
    return sanitize_agent(policy, card, method, n_clean, dim, baseline, episodes, seeds, curve)
