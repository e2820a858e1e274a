"""Training-time trajectory sanitization: flag suspected poisoned transitions, then repair or drop them.

The defender controls the training pipeline but not the environment. A :class:`TransitionFilter`
is fitted on a small clean set (observations and rewards of clean episodes of the base env) and
flags a transition when

- its observation lies off the clean data (a :class:`Sanitizer`'s score above ``margin`` times the
  ``1 - fpr`` quantile of held-out clean scores, from 2-fold cross-fitting), or
- its reward lies outside the range of clean rewards (aimed at static and dynamic reward poisoning).

Flagged transitions are repaired (observation sanitized, reward clipped into the clean range) or
dropped. In a rollout, a flagged vector observation with a predecessor in its episode is repaired by
its one-step prediction from that (repaired) observation and the action taken, from a linear model
of the clean transitions: on a wrongly flagged clean step this is close to the identity, where a
single-observation repair moves a learner's legitimate states (a cart far from the centre) back into
the random-policy data and erases what the learner needs to see there. :class:`FilterVecEnv` applies
the filter on-line between a (possibly poisoned) VecEnv and the learner and scores its flags against
the ground-truth ``info["rlbd"]`` flags.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecTransposeImage, is_vecenv_wrapped
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from rlbackdoor.defenses.base import Access, Sanitizer
from rlbackdoor.defenses.support import TransitionModel
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import SanitizeSpec
from rlbackdoor.training.envs import zero_start
from rlbackdoor.trajectories import Trajectories, collect


@dataclass
class FilterReport:
    """How the flags compare with the ground truth."""

    n: int
    flagged: int
    poisoned: int
    true_positives: int

    @property
    def precision(self) -> float | None:
        """Flagged steps that were poisoned, over flagged steps (``None`` with none flagged)."""
        return self.true_positives / self.flagged if self.flagged else None

    @property
    def recall(self) -> float | None:
        """Poisoned steps flagged, over poisoned steps (``None`` with none poisoned)."""
        return self.true_positives / self.poisoned if self.poisoned else None

    def as_dict(self, prefix: str = "") -> dict[str, float | None]:
        """Counts, precision and recall under ``prefix`` keys (``None``, JSON ``null``, where undefined)."""
        return {
            f"{prefix}n": self.n,
            f"{prefix}flagged": self.flagged,
            f"{prefix}poisoned": self.poisoned,
            f"{prefix}precision": self.precision,
            f"{prefix}recall": self.recall,
        }

    @classmethod
    def of(cls, flags: np.ndarray, truth: np.ndarray) -> FilterReport:
        flags, truth = np.asarray(flags, bool), np.asarray(truth, bool)
        return cls(len(flags), int(flags.sum()), int(truth.sum()), int((flags & truth).sum()))

    def __add__(self, other: FilterReport) -> FilterReport:
        return FilterReport(
            self.n + other.n,
            self.flagged + other.flagged,
            self.poisoned + other.poisoned,
            self.true_positives + other.true_positives,
        )


def n_discrete_actions(space: spaces.Space) -> int | None:
    """A :class:`TransitionFilter`'s ``n_actions`` for an env's action space: its size when Discrete, else ``None``."""
    if not isinstance(space, spaces.Discrete):
        return None
    zero_start(space, f"the action space {space}")
    return int(space.n)


class TransitionFilter:
    """Flags transitions whose observation or reward is off the clean data.

    :param sanitizer: scores and repairs observations (``subspace`` for rank-deficient observations,
        ``support`` for low-dimensional ones); ``None`` checks rewards only.
    :param fpr: share of clean observations allowed above the score threshold.
    :param margin: the threshold is the held-out clean ``1 - fpr`` score quantile times this.
    :param rewards: check rewards against the clean range.
    :param n_actions: size of a discrete action space: with flat observations, also fit a one-step model of
        the clean dynamics (:meth:`predict`) for rollout repairs; ``None``: no model.
    """

    access = (Access.CLEAN_TRAJECTORIES,)

    def __init__(
        self,
        sanitizer: Sanitizer | None,
        fpr: float = 0.001,
        margin: float = 1.5,
        rewards: bool = True,
        n_actions: int | None = None,
    ) -> None:
        self.sanitizer, self.fpr, self.margin, self.check_rewards = sanitizer, fpr, margin, rewards
        self.n_actions = n_actions
        self.dynamics: TransitionModel | None = None
        self.threshold = np.inf
        self.reward_low, self.reward_high = -np.inf, np.inf
        self.fitted = False

    def fit(self, clean: Trajectories) -> TransitionFilter:
        """Fit the observation score threshold and the clean reward range."""
        if len(clean) == 0:
            raise SpecError("filter: no clean transitions to fit on; collect clean episodes first")
        if self.sanitizer is not None:
            self.sanitizer.fit(clean.observations)
            try:
                scores = self._held_out_scores(clean.observations)
            except SpecError:
                n = len(clean)
                raise SpecError(
                    f"filter: the threshold is calibrated by fitting on halves of the {n} clean observations, "
                    f"too few for that; use n >= {2 * n}"
                ) from None
            self.threshold = float(np.quantile(scores, 1.0 - self.fpr) * self.margin + 1e-9)
        if self.check_rewards:
            self.reward_low, self.reward_high = float(clean.rewards.min()), float(clean.rewards.max())
        if self.n_actions is not None and clean.observations.ndim == 2:
            follows = np.flatnonzero(~clean.dones[:-1])  # o_{t+1} follows (o_t, a_t) within an episode
            obs = clean.observations.astype(np.float64)
            self.dynamics = TransitionModel(self.n_actions).fit(obs[follows], clean.actions[follows], obs[follows + 1])
        self.fitted = True
        return self

    def _held_out_scores(self, obs: np.ndarray) -> np.ndarray:
        """Scores of clean observations under a sanitizer fitted on the other half (2-fold cross-fitting)."""
        half = len(obs) // 2
        folds = (obs[:half], obs[half:])
        scores = []
        for fit_on, score_on in (folds, folds[::-1]):
            scores.append(copy.deepcopy(self.sanitizer).fit(fit_on).score(score_on))
        return np.concatenate(scores)

    def flag_observations(self, obs: np.ndarray) -> np.ndarray:
        """Boolean mask of observations off the clean data."""
        self._require_fit()
        if self.sanitizer is None:
            return np.zeros(len(obs), dtype=bool)
        return self.sanitizer.score(obs) > self.threshold

    def flag_rewards(self, rewards: np.ndarray, slack: np.ndarray | float = 0.0) -> np.ndarray:
        """Boolean mask of rewards outside the clean range.

        :param slack: tolerance added to the range (per reward), e.g. for float32 rounding.
        """
        self._require_fit()
        rewards, tol = np.asarray(rewards, dtype=np.float64), 1e-6 + np.asarray(slack, dtype=np.float64)
        return (rewards < self.reward_low - tol) | (rewards > self.reward_high + tol)

    def repair_observations(
        self,
        obs: np.ndarray,
        flags: np.ndarray,
        previous: np.ndarray | None = None,
        actions: np.ndarray | None = None,
        follows: np.ndarray | None = None,
    ) -> np.ndarray:
        """Observations with the flagged rows repaired: a row that ``follows`` its ``previous`` observation
        (same episode) under ``actions`` becomes their one-step prediction when the filter has a dynamics
        model; any other flagged row gets the sanitizer's repair."""
        flags = np.asarray(flags, dtype=bool)
        if not flags.any():
            return obs
        out = np.array(obs, copy=True)
        predicted = np.zeros_like(flags)
        if self.dynamics is not None and previous is not None and actions is not None:
            predicted = flags & (np.ones_like(flags) if follows is None else np.asarray(follows, dtype=bool))
            rows = np.flatnonzero(predicted)
            if len(rows):
                prev = np.asarray(previous)[rows]
                step = self.dynamics.predict(prev, np.asarray(actions).reshape(len(flags), -1)[rows, 0])
                out[rows] = step.reshape(prev.shape).astype(out.dtype)
        rest = flags & ~predicted
        if rest.any() and self.sanitizer is not None:
            out[rest] = self.sanitizer.repair(out[rest])
        return out

    def repair_in_order(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        flags: np.ndarray,
        follows: np.ndarray,
        before: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Repair the flagged observations of ``(steps, envs, ...)`` arrays in place, in time order, so that a
        repaired observation predicts the next (:meth:`repair_observations`).

        :param follows: ``(steps, envs)``: the observation continues the episode of the one before it.
        :param before: the observations and actions preceding step 0, if any.
        """
        for t in np.flatnonzero(flags.any(axis=1)).tolist():
            previous, acted = (before or (None, None)) if t == 0 else (obs[t - 1], actions[t - 1])
            obs[t] = self.repair_observations(obs[t], flags[t], previous, acted, follows[t])

    def repair_rewards(self, rewards: np.ndarray) -> np.ndarray:
        """Rewards clipped into the clean range."""
        return np.clip(rewards, self.reward_low, self.reward_high).astype(np.asarray(rewards).dtype)

    def filter(self, data: Trajectories, mode: str = "drop") -> tuple[Trajectories, FilterReport]:
        """Drop or repair the flagged transitions of a dataset; report against its ``poisoned`` flags.

        Repairs go in time order, so that with a dynamics model a repaired observation predicts the next.
        """
        if mode not in ("drop", "repair"):
            raise SpecError(f"filter: mode '{mode}' is unknown; use drop or repair")
        flags = self.flag_observations(data.observations) | self.flag_rewards(data.rewards)
        report = FilterReport.of(flags, data.poisoned)
        if mode == "drop":
            return data.select(~flags), report
        if self.dynamics is None:
            observations = self.repair_observations(data.observations, flags)
        else:  # one stream: o_t follows (o_{t-1}, a_{t-1}) unless an episode ended at t - 1
            observations = np.array(data.observations, copy=True)
            follows = np.concatenate([[False], ~np.asarray(data.dones[:-1], dtype=bool)])
            self.repair_in_order(observations[:, None], data.actions[:, None], flags[:, None], follows[:, None])
        repaired = Trajectories(
            observations,
            data.actions,
            self.repair_rewards(data.rewards),
            data.dones,
            data.poisoned,
            data.triggered,
            data.env,
            data.meta,
        )
        return repaired, report

    def _require_fit(self) -> None:
        if not self.fitted:
            raise SpecError("filter: not fitted; call fit(clean_trajectories) first")


class FilterVecEnv(VecEnvWrapper):
    """On-line filter between a VecEnv and the learner: flagged observations are repaired before the
    agent acts on them (one-step predictions from the last observation and action where the filter has a
    dynamics model) and out-of-range rewards are clipped. Keeps running reports against ``info["rlbd"]``;
    ``flagged`` marks the observations it last returned that it repaired.

    :param venv: the (possibly poisoned) training envs.
    :param filt: a fitted :class:`TransitionFilter`.
    :param rewards: clip rewards here; ``False`` leaves them to a :class:`RolloutFilter`.
    """

    def __init__(self, venv: VecEnv, filt: TransitionFilter, rewards: bool = True) -> None:
        super().__init__(venv)
        self.filter, self.rewards = filt, rewards
        self.flagged = np.zeros(venv.num_envs, dtype=bool)
        self.observation_report = FilterReport(0, 0, 0, 0)
        self.reward_report = FilterReport(0, 0, 0, 0)
        self._previous: np.ndarray | None = None  # what the learner saw last
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        obs = self.venv.reset()
        self.flagged = self.filter.flag_observations(obs)
        self._previous = self.filter.repair_observations(obs, self.flagged)
        return self._previous

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        previous, actions = self._previous, self._actions
        flags = self.flagged = self.filter.flag_observations(obs)
        truth = np.array([info.get("rlbd", {}).get("triggered", False) for info in infos])
        self.observation_report += FilterReport.of(flags, truth)
        obs = self.filter.repair_observations(obs, flags, previous, actions, follows=~np.asarray(dones, dtype=bool))
        reward_flags = self.filter.flag_rewards(rewards)
        poisoned = np.array([info.get("rlbd", {}).get("poisoned", False) for info in infos])
        self.reward_report += FilterReport.of(reward_flags, poisoned)
        for i in np.flatnonzero(dones):
            terminal = infos[i].get("terminal_observation")
            if terminal is not None:
                infos[i]["terminal_observation"] = self.filter.repair_observations(
                    terminal[None],
                    self.filter.flag_observations(terminal[None]),
                    None if previous is None else previous[i : i + 1],
                    None if actions is None else actions[i : i + 1],
                )[0]
        self._previous = obs
        return obs, self.filter.repair_rewards(rewards) if self.rewards else rewards, dones, infos

    def stats(self) -> dict[str, Any]:
        """Running flag counts with precision and recall (observations vs triggered, rewards vs poisoned)."""
        return {**self.observation_report.as_dict("obs_"), **self.reward_report.as_dict("reward_")}


class RolloutFilter(BaseCallback):
    """Filters an on-policy rollout buffer after each rollout, before the learner trains on it: the data of
    either threat model (inner loop: the poisoned env's steps as collected; outer loop: the attacker
    tampers with the collected experience, so add this callback after the attacker's). In the inner loop,
    give it the :class:`FilterVecEnv` (``rewards=False``) that repaired the observations before the agent
    acted on them: its flags join this filter's.

    A flagged transition (observation or reward off the clean data) has its observation repaired and its
    reward clipped into the clean range: a reward anomaly marks the whole transition, so a trigger whose
    observation passes the threshold is still removed with its reward. With a dynamics model (flat
    observations, discrete actions) the repaired observation is the one-step prediction from the previous
    (repaired) observation of its episode and the action taken there, across rollouts too; an episode's
    first observation, or any observation without a model, gets the sanitizer's repair. Values of the
    repaired observations, then returns and advantages, are recomputed; their log-probabilities are the
    ones the agent drew its actions with (recorded at collection: an attacker in the buffer cannot rewrite
    them), so PPO's ratio weighs an action chosen on a triggered observation as the off-policy sample it is
    on the repaired one. Rewards
    SB3 bootstrapped at a time limit (``r + gamma V(s_T)``) are checked and repaired without their
    bootstrap (to float32 rounding).

    :param filt: a fitted :class:`TransitionFilter`.
    :param truth: returns the ``(steps, envs)`` indices poisoned in the last rollout (the outer-loop
        attacker's record); ``None``: the envs' ``info["rlbd"]["poisoned"]`` flags (inner loop).
    :param compensated: the attacker also rewrote the reward of the step before each poisoned one in the
        same episode (SleeperNets' compensation); those steps count as tampered in the report.
    :param online: the on-line filter between the envs and the agent, if any.
    :param mode: ``repair`` trains on the repaired transitions; ``drop`` takes them out of the loss
        (advantage 0, value target = value), keeping the repair only for their neighbours' bootstraps.
        On CartPole at 1% poisoning (``bench_sanitize.py``) drop did not lower the resulting ASR and
        lost more of the clean task, so repair is the default.
    """

    def __init__(
        self,
        filt: TransitionFilter,
        truth: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
        compensated: bool = False,
        mode: str = "repair",
        online: FilterVecEnv | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("drop", "repair"):
            raise SpecError(f"filter: mode '{mode}' is unknown; use drop or repair")
        self.filter, self.truth, self.compensated, self.mode = filt, truth, compensated, mode
        self.online = online
        self._online: list[np.ndarray] = []
        self._shown = np.zeros(0, dtype=bool)  # the on-line flags of the observations the agent acts on next
        self.report = FilterReport(0, 0, 0, 0)
        self._poisoned: list[np.ndarray] = []
        self._bootstrap: list[np.ndarray] = []
        self._behaviour: list[np.ndarray] = []
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # the previous rollout's last observations, actions

    def _on_rollout_start(self) -> None:
        self._poisoned, self._bootstrap, self._behaviour, self._online = [], [], [], []

    def _on_training_start(self) -> None:
        if self.online is not None:  # the envs were reset before training starts
            self._shown = self.online.flagged.copy()

    def _on_step(self) -> bool:
        infos, dones = self.locals["infos"], self.locals["dones"]
        self._behaviour.append(self.locals["log_probs"].cpu().numpy().reshape(-1).copy())
        if self.online is not None:
            self._online.append(self._shown)
            self._shown = self.online.flagged.copy()
        self._poisoned.append(np.array([info.get("rlbd", {}).get("poisoned", False) for info in infos]))
        bootstrap = np.zeros(len(infos))
        for i in np.flatnonzero(dones):  # as SB3 does after this call: the time-limit bootstrap it adds to r_t
            terminal = infos[i].get("terminal_observation")
            if infos[i].get("TimeLimit.truncated", False) and terminal is not None:
                with torch.no_grad():
                    obs = self.model.policy.obs_to_tensor(terminal)[0]
                    bootstrap[i] = self.model.gamma * float(self.model.policy.predict_values(obs)[0])  # type: ignore[attr-defined]
        self._bootstrap.append(bootstrap)
        return True

    def _tampered(self, steps: int, n_envs: int, starts: np.ndarray) -> np.ndarray:
        if self.truth is None:
            return np.stack(self._poisoned)[:steps] if self._poisoned else np.zeros((steps, n_envs), dtype=bool)
        truth = np.zeros((steps, n_envs), dtype=bool)
        t, e = self.truth()
        truth[t, e] = True
        if self.compensated:
            before = (t > 0) & (starts[t, e] == 0)
            truth[t[before] - 1, e[before]] = True
        return truth

    def _on_rollout_end(self) -> None:
        model = self.model
        if isinstance(model, OffPolicyAlgorithm):
            raise SpecError("sanitize: the rollout filter needs an on-policy algorithm (ppo, a2c); use one")
        rb = model.rollout_buffer  # type: ignore[attr-defined]
        steps, n_envs = rb.buffer_size, rb.n_envs
        transposed = is_vecenv_wrapped(model.get_env(), VecTransposeImage)
        obs = rb.observations.reshape(steps * n_envs, *rb.obs_shape)
        seen = np.moveaxis(obs, -3, -1) if transposed else obs  # the filter is fitted on the env's layout
        bootstrap = np.stack(self._bootstrap)[:steps] if self._bootstrap else np.zeros((steps, n_envs))
        env_rewards = rb.rewards - bootstrap
        rounding = np.where(bootstrap != 0, 4 * np.finfo(np.float32).eps * np.abs(rb.rewards), 0.0)
        flags = self.filter.flag_observations(seen).reshape(steps, n_envs) | self.filter.flag_rewards(
            env_rewards, rounding
        )
        if self._online:
            flags |= np.stack(self._online)[:steps]
        self.report += FilterReport.of(flags.reshape(-1), self._tampered(steps, n_envs, rb.episode_starts).reshape(-1))
        if flags.any():
            self._repair_observations(rb, flags, seen, transposed)
        self._last = (rb.observations[-1].copy(), rb.actions[-1].copy())
        if not flags.any():
            return
        rb.rewards[flags] = self.filter.repair_rewards(env_rewards[flags]) + bootstrap[flags]
        rb.compute_returns_and_advantage(last_values=self.locals["values"], dones=self.locals["dones"])
        if self.mode == "drop":
            rb.advantages[flags] = 0.0
            rb.returns[flags] = rb.values[flags]

    def _repair_observations(self, rb: Any, flags: np.ndarray, seen: np.ndarray, transposed: bool) -> None:
        """Flagged observations repaired in the buffer, their values and log-probabilities refreshed."""
        if self.filter.dynamics is not None:
            self.filter.repair_in_order(rb.observations, rb.actions, flags, rb.episode_starts == 0, self._last)
        elif self.filter.sanitizer is not None:
            repaired = self.filter.sanitizer.repair(seen[flags.reshape(-1)])
            rb.observations[flags] = np.moveaxis(repaired, -1, -3) if transposed else repaired
        else:
            return
        t, e = np.nonzero(flags)
        policy = self.model.policy
        with torch.no_grad():
            values = policy.predict_values(obs_as_tensor(rb.observations[t, e], policy.device))  # type: ignore[attr-defined]
        rb.values[t, e] = values.cpu().numpy().reshape(-1)
        rb.log_probs[t, e] = np.stack(self._behaviour)[t, e]

    def stats(self) -> dict[str, Any]:
        """Flag counts with precision and recall against the tampered steps."""
        return self.report.as_dict("rollout_")


def training_filter(
    spec: SanitizeSpec, make_clean_env: Callable[[], Any], seed: int, dim: int | None = None
) -> TransitionFilter:
    """The filter a ``sanitize:`` block describes (a run's, or ``rlbd sanitize --trajectories``'), fitted on
    random-policy steps of the clean env; ``dim`` is the subspace sanitizer's."""
    from rlbackdoor.defenses.sanitize import make_sanitizer

    if spec.method == "reward" and dim is not None:
        raise SpecError("sanitize: --dim applies to the subspace method only; drop it")
    sanitizer = None if spec.method == "reward" else make_sanitizer(spec.method, dim)
    env = make_clean_env()
    n_actions = n_discrete_actions(env.action_space)
    clean = collect(env, None, spec.n_clean, seed)
    return TransitionFilter(sanitizer, fpr=spec.fpr, margin=spec.margin, n_actions=n_actions).fit(clean)
