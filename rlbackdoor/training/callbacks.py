"""Training callbacks: the progress bar, the poison-rate log and the bridge from SB3's logger to W&B (``train/...``)."""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter

from rlbackdoor.tracking import Tracker


class PoisonCounter(Protocol):
    """What counts poisoned steps: an :class:`~rlbackdoor.attack.Attack` (inner loop) or the outer-loop poisoner."""

    n_steps: int
    n_poisoned: int


def poison_rate(counter: PoisonCounter | None) -> float | None:
    """Poisoned over collected steps; ``None`` for a clean run."""
    return None if counter is None else counter.n_poisoned / max(1, counter.n_steps)


def last_return(model: Any) -> float | None:
    """The clean return of the last finished episode (the monitor sits below the attack)."""
    buffer = model.ep_info_buffer
    return float(buffer[-1]["r"]) if buffer else None


class ProgressBar(BaseCallback):
    """A rich progress bar on stderr: steps, steps/s, current poison rate, last episode return.

    :param total: the run's total steps.
    :param counter: the attack or outer-loop poisoner (``None`` for a clean run).
    :param refresh: seconds between updates.
    """

    def __init__(self, total: int, counter: PoisonCounter | None, refresh: float = 0.25) -> None:
        super().__init__()
        self.total, self.counter, self.refresh = total, counter, refresh
        self.progress = Progress(
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[sps]:.0f} steps/s  poison {task.fields[rate]}  return {task.fields[ret]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self.progress.add_task("train", total=total, sps=0.0, rate="-", ret="-")
        self._t0 = self._last = 0.0
        self._steps0 = 0

    def _on_training_start(self) -> None:
        self._t0 = self._last = time.monotonic()
        self._steps0 = self.num_timesteps
        self.progress.start()
        self._update()

    def _update(self) -> None:
        now = time.monotonic()
        self._last = now
        rate, ret = poison_rate(self.counter), last_return(self.model)
        self.progress.update(
            self._task,
            completed=self.num_timesteps,
            sps=(self.num_timesteps - self._steps0) / max(now - self._t0, 1e-9),
            rate="-" if rate is None else f"{rate:.3%}",
            ret="-" if ret is None else f"{ret:.1f}",
        )

    def _on_step(self) -> bool:
        if time.monotonic() - self._last >= self.refresh:
            self._update()
        return True

    def _on_training_end(self) -> None:
        self._update()
        self.progress.stop()


class PoisonRateLog(BaseCallback):
    """Records the running poison rate and poisoned-step count into SB3's logger after every rollout.

    :param counter: the attack or outer-loop poisoner.
    """

    def __init__(self, counter: PoisonCounter) -> None:
        super().__init__()
        self.counter = counter

    def _on_rollout_end(self) -> None:
        self.logger.record("rlbd/poison_rate", poison_rate(self.counter))
        self.logger.record("rlbd/n_poisoned", self.counter.n_poisoned)

    def _on_step(self) -> bool:
        return True


class TrackerOutput(KVWriter):
    """An SB3 logger output that sends the numeric training values to a W&B tracker as ``train/<name>``.

    SB3's namespaces (``rollout/``, ``time/``, ``train/``) and ``rlbd/`` become ``train/``; other
    stages (``eval/``) log to the tracker themselves and are skipped here.

    :param tracker: the run's tracker.
    """

    NAMESPACES = ("rollout", "time", "train", "rlbd")

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        metrics = {
            f"train/{key.rpartition('/')[2]}": float(value)
            for key, value in key_values.items()
            if key.partition("/")[0] in self.NAMESPACES
            and isinstance(value, (int, float, np.number))
            and not isinstance(value, bool)
        }
        if metrics:
            self.tracker.log(metrics, step=step)

    def close(self) -> None:
        """Nothing to release: the tracker belongs to the training run."""
