"""``EvalCallback``: cheap periodic ``eval/ctp`` and ``eval/asr`` during training, to SB3's logger and W&B."""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from rlbackdoor.evaluation.envs import Source, action_history, eval_attack, run_env
from rlbackdoor.evaluation.evaluate import INJECT_RATE
from rlbackdoor.evaluation.metrics import observation_asr, sequence_asr
from rlbackdoor.evaluation.rollouts import episode_seeds, rollout
from rlbackdoor.specs import TargetedPayload
from rlbackdoor.tracking import Tracker, prefixed


class EvalCallback(BaseCallback):
    """Every ``eval_every`` steps, roll the current policy out on the clean env and log ``eval/ctp`` and ``eval/asr``.

    The same ``episodes`` episode seeds are used every time, so the curves compare like with like.
    ``eval/asr`` is logged for targeted attacks (as :func:`rlbackdoor.evaluation.evaluate` defines it,
    over the states of these episodes) and ``eval/asr_raw`` with it.

    :param source: the run's attack spec, card or env id.
    :param eval_every: steps between evaluations.
    :param episodes: clean episodes per evaluation.
    :param seed: evaluation seed.
    :param tracker: also log to this W&B tracker (``step`` = timesteps so far).
    :param verbose: SB3 verbosity.
    """

    def __init__(
        self,
        source: Source,
        eval_every: int,
        episodes: int = 2,
        seed: int = 0,
        tracker: Tracker | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.env = run_env(source)
        self.eval_every, self.seed, self.tracker = eval_every, seed, tracker
        self.resets = episode_seeds([seed], episodes)
        self.groups = np.full(episodes, seed)
        self.history: list[dict[str, Any]] = []
        """Every evaluation so far: ``timesteps`` and the metrics."""
        self._next = eval_every
        spec = self.env.attack
        self._attack = self._history = None
        if spec is not None and isinstance(spec.payload, TargetedPayload):
            probe = self.env.make()
            self._attack = eval_attack(spec, probe, rate=INJECT_RATE)
            self._history = action_history(probe)
            probe.close()

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self._next = (self.num_timesteps // self.eval_every + 1) * self.eval_every
            metrics = self.evaluate()
            self.history.append({"timesteps": self.num_timesteps, **metrics})
            for key, value in prefixed("eval", metrics).items():
                self.logger.record(key, value)
            if self.tracker is not None:
                self.tracker.log(prefixed("eval", metrics), step=self.num_timesteps)
        return True

    def evaluate(self) -> dict[str, float]:
        """``ctp`` and, for targeted attacks, ``asr`` and ``asr_raw`` of the current policy (undefined ones left out)."""
        policy, attack = self.model.policy, self._attack
        clean = rollout(policy, self.env.make, self.resets)
        out = {"ctp": float(clean.returns.mean())}
        if attack is None:
            return out
        if attack.obs_trigger is not None:
            asr = observation_asr(policy, attack.payload, clean, attack.obs_trigger.apply(clean.obs), self.groups)
        else:
            injected = rollout(policy, self.env.make, self.resets, attack, self.seed)
            asr = sequence_asr(policy, attack.payload, injected, self._history, self.groups)
        return {**out, **{k: float(asr[k]) for k in ("asr", "asr_raw") if asr[k] is not None}}
