"""Poisoning schedules: on which steps a trigger starts, as boolean masks over a batch of envs.

A schedule is asked once per decision (each observation an agent is about to act on). It sees
each env's step within its episode ``t``, which envs start an episode, which envs may fire
(``live``: in an episode, with no trigger running) and one uniform draw per env. Once fired, the
trigger stays on for ``duration`` steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from rlbackdoor.specs import BudgetSchedule, RateSchedule, WindowSchedule

StateScorer = Callable[[np.ndarray], np.ndarray]


class Schedule(ABC):
    """When the trigger fires.

    :param duration: consecutive triggered steps once fired.
    :param max_poisoned: an exact cap on poisoned steps, or ``None``.
    """

    duration: int = 1
    max_poisoned: int | None = None

    def reset(self, n_envs: int) -> None:  # noqa: B027 - most schedules keep no state
        """Forget all state for a batch of ``n_envs``."""

    @abstractmethod
    def fire(self, t: np.ndarray, starts: np.ndarray, live: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Boolean mask of envs whose trigger starts on this decision."""

    def silent(self, u: np.ndarray) -> list[bool] | None:
        """For a block of draws ``(decisions, n_envs)``: the decisions on which :meth:`fire` would fire in no env
        and change no state, whatever ``t``, ``starts``, ``live`` and ``obs``; ``None`` when unknown.

        The attack skips those decisions while no trigger is running.
        """
        return None

    def cut(self, n_steps: int) -> None:  # noqa: B027 - only budgets make up for lost steps
        """Episode ends cut running triggers short by ``n_steps`` triggered steps in all."""

    def quiet(self, n_live: int) -> bool:
        """Whether the next decision, with ``n_live`` envs free to fire and whatever its draws, ``t``,
        ``starts`` and ``obs``, fires in no env; if so the schedule has taken it (as :meth:`fire` would)."""
        return False


class RateScheduler(Schedule):
    """Fire with probability ``rate`` per step, or per episode at its first step.

    With ``select: value`` and a scorer installed (:meth:`set_scorer`, BadRL), fire on the
    states whose score lies in the top ``rate`` fraction of recently seen scores instead.
    """

    WINDOW = 4096

    def __init__(self, spec: RateSchedule) -> None:
        self.rate, self.per, self.duration, self.select = spec.rate, spec.per, spec.duration, spec.select
        self.scorer: StateScorer | None = None
        self._scores = np.empty(0)

    def set_scorer(self, scorer: StateScorer | None) -> None:
        """Install the state scorer used by ``select: value`` (larger scores are poisoned first)."""
        self.scorer = scorer

    def reset(self, n_envs: int) -> None:
        self._scores = np.empty(0)

    def fire(self, t: np.ndarray, starts: np.ndarray, live: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        eligible = live if self.per == "step" else live & starts
        if self.select == "value" and self.scorer is not None and self.per == "step":
            scores = np.asarray(self.scorer(obs), dtype=np.float64).reshape(len(live))
            self._scores = np.concatenate([self._scores, scores[live]])[-self.WINDOW :]
            threshold = np.quantile(self._scores, 1.0 - self.rate) if self.rate > 0 else np.inf
            return eligible & (scores >= threshold) & (self.rate > 0)
        return eligible & (u < self.rate)

    def silent(self, u: np.ndarray) -> list[bool] | None:
        if self.select == "value":
            return None
        return (u >= self.rate).all(axis=1).tolist()


class BudgetScheduler(Schedule):
    """Fire on every ``interval``-th free decision until ``budget`` poisoned steps are spent (TrojDRL).

    Of ``horizon`` decisions, ``budget - firings`` continue a running trigger; the other, free ones are
    split evenly between the firings, so a single env spends the whole budget within ``horizon`` steps unless
    episode ends cut running triggers short. Those steps are made up by further firings at the same interval
    (after ``horizon`` if need be), so exactly ``budget`` steps are poisoned in all.
    """

    def __init__(self, spec: BudgetSchedule) -> None:
        self.duration = spec.duration
        self.max_poisoned = spec.budget
        firings = -(-spec.budget // spec.duration)
        self.interval = max(1, (spec.horizon - spec.budget + firings) // max(1, firings))
        self.reset(1)

    def reset(self, n_envs: int) -> None:
        self._seen = 0
        self._decisions = 0
        self._cut = 0
        self.firings = -(-self.max_poisoned // self.duration)

    def cut(self, n_steps: int) -> None:
        self._cut += n_steps
        self.firings = -(-(self.max_poisoned + self._cut) // self.duration)

    def quiet(self, n_live: int) -> bool:
        # this decision's free envs get indices seen .. seen + n_live - 1; it fires if one of them is a firing's
        due = -(-self._seen // self.interval) * self.interval
        if n_live and due < self._seen + n_live and due // self.interval < self.firings:
            return False
        self._seen += n_live
        self._decisions += 1
        return True

    def fire(self, t: np.ndarray, starts: np.ndarray, live: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        # free decisions are counted from a different env on every call, so firings rotate over the envs
        shift = self._decisions % len(live)
        self._decisions += 1
        live = np.roll(live, -shift)
        index = self._seen + np.cumsum(live) - 1
        self._seen += int(live.sum())
        return np.roll(live & (index % self.interval == 0) & (index // self.interval < self.firings), shift)


class WindowScheduler(Schedule):
    """Poison steps ``start <= t < stop`` in a fraction ``rate`` of episodes (chosen at episode start)."""

    def __init__(self, spec: WindowSchedule) -> None:
        self.start, self.rate, self.duration = spec.start, spec.rate, spec.stop - spec.start
        self._chosen = np.zeros(0, dtype=bool)

    def reset(self, n_envs: int) -> None:
        self._chosen = np.zeros(n_envs, dtype=bool)

    def fire(self, t: np.ndarray, starts: np.ndarray, live: np.ndarray, u: np.ndarray, obs: np.ndarray) -> np.ndarray:
        self._chosen = np.where(starts, u < self.rate, self._chosen)
        return live & self._chosen & (t == self.start)


def build_schedule(spec: RateSchedule | BudgetSchedule | WindowSchedule) -> Schedule:
    """The scheduler a schedule spec describes."""
    if isinstance(spec, RateSchedule):
        return RateScheduler(spec)
    if isinstance(spec, BudgetSchedule):
        return BudgetScheduler(spec)
    return WindowScheduler(spec)
