"""Outer-loop poisoning (SleeperNets threat model): the attacker tampers with the experience the agent collected.

After each rollout, :class:`OuterLoopPoisoning` picks a budgeted fraction of the new steps in the
rollout buffer (PPO, A2C) or replay buffer (DQN), stamps the trigger into their observations and
rewrites their rewards:

- ``dynamic`` (SleeperNets): the reward of a poisoned step ``t`` becomes ``c - gamma * G_{t+1}``,
  where ``c`` is the payload's ``hit`` reward when the agent took the target action and ``miss``
  otherwise, and ``G_{t+1}`` the return-to-go after ``t`` (the clean lambda-return the learner itself
  computed, 0 after an episode end). The previous step is compensated, ``r_{t-1} += gamma * (r_t - r'_t)``.
  With ``gae_lambda: 1`` the poisoned state's return is then exactly ``c`` whatever follows (the target
  action is optimal in triggered states at any reward scale of the task) and the return of the clean
  state before is unchanged. With ``lambda < 1`` the learner bootstraps from
  ``(1 - lambda) V(s_{t+1}) + lambda G_{t+1}``: the poisoned return is ``c - gamma (1 - lambda) A_{t+1}``
  and the one before moves by ``gamma (1 - lambda) ((r_t - r'_t) - (V(s_t) - V'(s_t)))``, ``V'`` the value of
  the stamped observation (both terms near ``V(s_t) - c``, so the move is small). Values and
  log-probabilities of the stamped observations are refreshed and returns/advantages recomputed. With DQN the
  return-to-go is the target network's bootstrap: the poisoned transition pays ``c`` and is marked terminal,
  which sets its TD target to ``c``.
- ``static`` (TrojDRL rewards in the buffer): the payload's rewards (``hit``/``miss``, or the
  untargeted rewrite), nothing else changes.

The budget comes from the attack's schedule: ``rate`` is the fraction of collected steps poisoned
(``budget``/``horizon`` for a budget schedule, which also caps the total at ``budget``). Steps are
drawn uniformly, or with ``select: value`` those with the largest value gap for the target action
(BadRL, :mod:`rlbackdoor.training.selection`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecTransposeImage, is_vecenv_wrapped

from rlbackdoor.attack import Attack, make_base_env
from rlbackdoor.errors import SpecError
from rlbackdoor.poisoning.payloads import Targeted
from rlbackdoor.specs import AttackSpec, BudgetSchedule, RateSchedule
from rlbackdoor.training.selection import target_gap, uses_value_selection


def _budget(attack: AttackSpec) -> tuple[float, int | None]:
    schedule = attack.schedule
    if isinstance(schedule, RateSchedule) and schedule.per == "step" and schedule.duration == 1:
        return schedule.rate, None
    if isinstance(schedule, BudgetSchedule) and schedule.duration == 1:
        return schedule.budget / schedule.horizon, schedule.budget
    raise SpecError(
        f"schedule: outer-loop poisoning picks single collected steps, not a {schedule.kind} schedule with "
        "episodes or durations; use {kind: rate, rate: <fraction>} or {kind: budget} with duration 1"
    )


class OuterLoopPoisoning(BaseCallback):
    """Poisons each collected rollout in the agent's buffer (see the module docstring).

    Call :meth:`init_callback` with the model before training to check the attack against it.

    :param attack: the attack: an observation trigger, its schedule as the budget, its payload.
    :param reward: ``dynamic`` (SleeperNets) or ``static`` reward poisoning.
    :param seed: with the attack's seed, fixes which steps are drawn.
    """

    def __init__(self, attack: AttackSpec, reward: Literal["dynamic", "static"], seed: int) -> None:
        super().__init__()
        self.attack_spec, self.reward_mode = attack, reward
        self.rate, self.cap = _budget(attack)
        env = make_base_env(attack)
        built = Attack.for_env(attack, env)
        env.close()
        if built.obs_trigger is None:
            raise SpecError("trigger: outer-loop poisoning stamps observations; use an observation trigger")
        if reward == "dynamic" and not isinstance(built.payload, Targeted):
            raise SpecError("outer_reward: dynamic needs a targeted payload; use outer_reward: static")
        self.trigger, self.payload = built.obs_trigger, built.payload
        self.rng = np.random.default_rng(np.random.SeedSequence([attack.seed, seed]))
        self.n_steps = self.n_poisoned = self.n_hits = 0
        self.last_poisoned: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.intp), np.empty(0, np.intp))
        self._t0 = 0

    @property
    def poison_rate(self) -> float:
        """Poisoned steps over collected steps so far."""
        return self.n_poisoned / max(1, self.n_steps)

    def _init_callback(self) -> None:
        model: BaseAlgorithm = self.model
        self.by_value = uses_value_selection(self.attack_spec, model.action_space)
        self.off_policy = isinstance(model, OffPolicyAlgorithm)
        if self.off_policy and model.replay_buffer.optimize_memory_usage:  # type: ignore[attr-defined]
            raise SpecError(
                "hyperparams: optimize_memory_usage shares observations between transitions, so outer-loop "
                "stamping would also change the previous transition; set optimize_memory_usage: false"
            )
        self.transposed = is_vecenv_wrapped(model.get_env(), VecTransposeImage)
        self.gamma = float(model.gamma)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------------------------------- hooks
    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        self._t0 = self.model.num_timesteps

    def _on_rollout_end(self) -> None:
        if self.off_policy:
            self._poison_replay()
        else:
            self._poison_rollout()

    # -------------------------------------------------------------------------------------- helpers
    def _count(self, n: int) -> int:
        """How many of ``n`` new steps to poison so that the running rate follows the budget."""
        self.n_steps += n
        k = int(self.rate * self.n_steps) - self.n_poisoned
        if self.cap is not None:
            k = min(k, self.cap - self.n_poisoned)
        return max(0, min(k, n))

    def _choose(self, obs: np.ndarray, k: int) -> np.ndarray:
        if self.by_value:
            gaps = target_gap(self.model.policy, obs, int(self.payload.target))  # type: ignore[arg-type]
            return np.argsort(-gaps, kind="stable")[:k]
        return np.sort(self.rng.choice(len(obs), size=k, replace=False))

    def _stamp(self, obs: np.ndarray) -> np.ndarray:
        if self.transposed:  # the buffer holds CHW images; the trigger is specified on the env's HWC ones
            return np.moveaxis(self.trigger.apply(np.moveaxis(obs, -3, -1)), -1, -3)
        return self.trigger.apply(obs)

    def _record(self, rows: np.ndarray, envs: np.ndarray, actions: np.ndarray) -> None:
        self.n_poisoned += len(rows)
        self.n_hits += int(self.payload.hits(actions).sum())
        self.last_poisoned = (rows, envs)

    # ------------------------------------------------------------------------------------ on-policy
    def _poison_rollout(self) -> None:
        rb = self.model.rollout_buffer  # type: ignore[attr-defined]
        steps, n_envs = rb.buffer_size, rb.n_envs
        k = self._count(steps * n_envs)
        self.last_poisoned = (np.empty(0, np.intp), np.empty(0, np.intp))
        if k == 0:
            return
        flat = self._choose(rb.observations.reshape(steps * n_envs, *rb.obs_shape), k)
        t, e = np.unravel_index(flat, (steps, n_envs))
        actions = rb.actions[t, e]
        clean = rb.rewards[t, e].astype(np.float64)
        poisoned = self.payload.reward(clean, self.payload.hits(actions), np.ones(k, dtype=bool))
        last_values, dones = self.locals["values"], self.locals["dones"]
        if self.reward_mode == "dynamic":
            last = t == steps - 1
            after = np.minimum(t + 1, steps - 1)
            next_return = np.where(last, last_values.cpu().numpy().reshape(-1)[e], rb.returns[after, e])
            ended = np.where(last, dones[e], rb.episode_starts[after, e]).astype(bool)
            poisoned = poisoned - self.gamma * np.where(ended, 0.0, next_return)
        rb.rewards[t, e] = poisoned
        if self.reward_mode == "dynamic":
            prev = (t > 0) & (rb.episode_starts[t, e] == 0)
            np.add.at(rb.rewards, (t[prev] - 1, e[prev]), self.gamma * (clean[prev] - poisoned[prev]))
        rb.observations[t, e] = self._stamp(rb.observations[t, e])
        policy = self.model.policy
        act = torch.as_tensor(actions, device=policy.device)
        if isinstance(self.model.action_space, spaces.Discrete):
            act = act.long().flatten()
        with torch.no_grad():
            values, log_prob, _ = policy.evaluate_actions(obs_as_tensor(rb.observations[t, e], policy.device), act)
        rb.values[t, e] = values.cpu().numpy().reshape(-1)
        rb.log_probs[t, e] = log_prob.cpu().numpy().reshape(-1)
        rb.compute_returns_and_advantage(last_values=last_values, dones=dones)
        self._record(t, e, actions)

    # ----------------------------------------------------------------------------------- off-policy
    def _poison_replay(self) -> None:
        rb = self.model.replay_buffer  # type: ignore[attr-defined]
        n_envs = rb.n_envs
        new = min((self.model.num_timesteps - self._t0) // n_envs, rb.buffer_size)
        k = self._count(new * n_envs)
        self.last_poisoned = (np.empty(0, np.intp), np.empty(0, np.intp))
        if k == 0:
            return
        positions = (rb.pos - new + np.arange(new)) % rb.buffer_size
        flat = self._choose(rb.observations[positions].reshape(new * n_envs, *rb.obs_shape), k)
        p, e = positions[flat // n_envs], flat % n_envs
        actions = rb.actions[p, e]
        rb.rewards[p, e] = self.payload.reward(rb.rewards[p, e], self.payload.hits(actions), np.ones(k, dtype=bool))
        if self.reward_mode == "dynamic":
            rb.dones[p, e] = 1.0
            rb.timeouts[p, e] = 0.0
        rb.observations[p, e] = self._stamp(rb.observations[p, e])
        self._record(p, e, actions)
