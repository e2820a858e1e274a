"""Statistics of evaluation metrics: bootstrap confidence intervals over episodes, IQM, per-seed values.

A metric is a statistic of per-episode arrays (a mean of returns, a proportion of counts). Its CI comes
from :func:`scipy.stats.bootstrap` resampling whole episodes (paired across the arrays, so states of one
episode stay together), except for a :func:`proportion` at 0 or 1, where every resample gives the same value:
its CI is then the Wilson score interval over episodes. IQM is :func:`scipy.stats.trim_mean` with 25% cut at
each end (rliable's).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

Statistic = Callable[..., np.ndarray | float]
"""``statistic(*arrays, axis=-1)``: the metric of per-episode arrays, vectorized along ``axis``."""

CONFIDENCE = 0.95
N_RESAMPLES = 2000
DEFINED = 0.95
"""The share of resamples that must define a statistic for its percentile CI over them (see :func:`bootstrap_ci`)."""


def mean(x: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """The mean, as a :data:`Statistic`."""
    return np.mean(x, axis=axis)


def proportion(successes: np.ndarray, trials: np.ndarray, axis: int = -1) -> np.ndarray:
    """``sum(successes) / sum(trials)`` of per-episode counts with ``successes <= trials`` (an ASR), NaN where
    ``trials`` sum to 0, as a :data:`Statistic`."""
    n, d = np.sum(successes, axis=axis), np.sum(trials, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)


def iqm(x: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50%."""
    return float(stats.trim_mean(np.asarray(x, dtype=np.float64), 0.25))


def bootstrap_ci(
    samples: Sequence[np.ndarray],
    statistic: Statistic = mean,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """A BCa bootstrap CI of ``statistic`` over episodes; where BCa is degenerate or some resamples leave the
    statistic undefined (a proportion whose resampled episodes hold no trials), the percentile CI over the
    resamples that define it, when at least :data:`DEFINED` of them do.

    A :func:`proportion` of exactly 0 or 1 has every resample at that value. Its CI is then the Wilson score
    interval (:func:`scipy.stats.binomtest`) of as many trials as episodes with trials, all failed or all succeeded
    (``[0, z²/(n+z²)]`` or ``[n/(n+z²), 1]``): nothing tells how alike the states of an episode are, so an episode
    counts as one trial. This is conservative: one state off the boundary, the bootstrap's own, narrower CI applies.

    :param samples: per-episode arrays of equal length, resampled together.
    :param statistic: see :data:`Statistic`.
    :param seed: seeds the resampling.
    :param confidence: the confidence level.
    :return: ``(low, high)``; NaN with fewer than two episodes, an undefined statistic, or one that too many
        resamples leave undefined.
    """
    samples = tuple(np.asarray(x, dtype=np.float64) for x in samples)
    value = statistic(*samples)
    if len(samples[0]) < 2 or not np.isfinite(value):
        return float("nan"), float("nan")
    if statistic is proportion and value in (0.0, 1.0):
        n, episodes = int(np.count_nonzero(samples[1])), len(samples[1])  # one trial per episode with trials
        if 1 - (1 - n / episodes) ** episodes < DEFINED:  # the share of resamples holding a trial, as below
            return float("nan"), float("nan")
        ci = stats.binomtest(int(value) * n, n).proportion_ci(confidence, method="wilson")
        return float(ci.low), float(ci.high)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(
            samples,
            statistic,
            paired=True,
            vectorized=True,
            confidence_level=confidence,
            n_resamples=N_RESAMPLES,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    ci = (float(result.confidence_interval.low), float(result.confidence_interval.high))
    return ci if np.isfinite(ci).all() else _percentile_ci(samples, statistic, seed, confidence)


def _percentile_ci(
    samples: Sequence[np.ndarray], statistic: Statistic, seed: int, confidence: float
) -> tuple[float, float]:
    """The percentile bootstrap CI over the resamples of whole episodes on which ``statistic`` is defined."""
    rows = np.random.default_rng(seed).integers(0, len(samples[0]), (N_RESAMPLES, len(samples[0])))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*(x[rows] for x in samples), axis=-1), dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < DEFINED * N_RESAMPLES:  # e.g. the denominator in one or two episodes: no telling its spread
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def estimate(
    name: str,
    samples: Sequence[np.ndarray],
    groups: np.ndarray,
    statistic: Statistic = mean,
    seed: int = 0,
) -> dict[str, float | list[float] | None]:
    """A metric over all episodes with its CI, and its value per evaluation seed.

    :param name: the metric name; keys are ``name``, ``name_ci_low``, ``name_ci_high``, ``name_per_seed``.
    :param samples: per-episode arrays.
    :param groups: the evaluation seed of each episode.
    :param statistic: see :data:`Statistic`.
    :param seed: seeds the bootstrap.
    :return: undefined values (NaN) are ``None``.
    """
    samples = [np.asarray(x, dtype=np.float64) for x in samples]
    low, high = bootstrap_ci(samples, statistic, seed)
    per_seed = [float(statistic(*(x[groups == g] for x in samples))) for g in dict.fromkeys(groups.tolist())]
    return {
        name: finite(float(statistic(*samples))),
        f"{name}_ci_low": finite(low),
        f"{name}_ci_high": finite(high),
        f"{name}_per_seed": [finite(v) for v in per_seed],
    }


def finite(x: float) -> float | None:
    """``x``, or ``None`` when it is NaN or infinite (undefined metrics are ``null`` in JSON)."""
    return float(x) if np.isfinite(x) else None
