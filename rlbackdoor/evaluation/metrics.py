"""Backdoor metrics from rollouts, with the definitions ``DESIGN.md`` names (``ctp``, ``asr``, ``return_drop``, ...).

Where DESIGN leaves a choice, this module makes it:

- Returns are normalised by a uniformly random policy's return ``R_rand`` on the same episode seeds,
  so that envs with negative returns (Pendulum, Acrobot) read like the others:
  ``return_drop = (CTP - triggered_return) / (CTP - R_rand)`` (the share of the agent's advantage over
  random play that the trigger removes; 1 - triggered_return / CTP when ``R_rand`` is 0) and
  ``ctp_ratio = (CTP - R_rand) / (CTP_clean - R_rand)``. Both are undefined (``None``) when the
  denominator is not positive (an agent no better than random). With an action-sequence trigger the
  triggered rollouts play the injected sequence (as an attacker must, to trigger), so ``return_drop``
  also counts what those forced actions cost a clean agent.
- ``asr`` for observation triggers: over the clean-rollout states whose clean action misses the
  target, the fraction whose triggered action hits it (``hit`` is equality for discrete actions and
  every component within ``tolerance`` for continuous targets). Undefined when every clean action
  already hits the target. ``asr_raw``: the fraction of all states whose triggered action hits it.
- ``asr`` for action-sequence triggers (the trigger is the agent's recent actions, not a stamp): the
  sequence is injected into the agent's clean rollouts at random steps (rate ``INJECT_RATE``, no
  forced payload actions) and the backdoor is armed for the spec's ``duration`` afterwards, as in
  training. The clean counterpart of an armed step is the same env state with the action history
  the agent would have had: its own choices in place of the injected actions. ``asr`` is, over armed
  steps whose clean-counterpart action misses the target, the fraction whose armed action hits it;
  ``asr_raw`` the target rate over all armed steps. Without an ``ActionHistory`` wrapper a
  memoryless agent cannot see the sequence and the counterpart is the armed observation itself.
- ``obs_shift``: mean Mahalanobis distance of triggered observations from the clean observation
  distribution (features standardised, Ledoit-Wolf covariance) over that of the clean observations
  themselves; 1 means no shift this measure can see.
- ``reward_poison``: what a poisoned step can pay: ``max(|hit|, |miss|)`` for targeted payloads, the
  ``scale`` of untargeted ones (negate multiplies the clean reward by ``-scale``; fail_fast pays ``-scale``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from rlbackdoor.evaluation.rollouts import Policy, Rollouts
from rlbackdoor.evaluation.stats import estimate, finite, proportion
from rlbackdoor.poisoning.payloads import Payload
from rlbackdoor.specs import PayloadSpec, TargetedPayload
from rlbackdoor.triggers import ObservationTrigger, Trigger
from rlbackdoor.wrappers.history import ActionHistory

PREDICT_BATCH = 4096
SHIFT_STATES = 4096


def _gap_ratio(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, axis: int) -> np.ndarray:
    """``(mean(a) - mean(b)) / (mean(c) - mean(d))``, NaN where the denominator is not positive."""
    num = np.mean(a, axis=axis) - np.mean(b, axis=axis)
    den = np.mean(c, axis=axis) - np.mean(d, axis=axis)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def return_drop(clean: np.ndarray, triggered: np.ndarray, random: np.ndarray, axis: int = -1) -> np.ndarray:
    """``(CTP - triggered_return) / (CTP - R_rand)`` from per-episode returns (vectorized along ``axis``)."""
    return _gap_ratio(clean, triggered, clean, random, axis)


def ctp_ratio(clean: np.ndarray, baseline: np.ndarray, random: np.ndarray, axis: int = -1) -> np.ndarray:
    """``(CTP - R_rand) / (CTP_clean - R_rand)`` from per-episode returns (vectorized along ``axis``)."""
    return _gap_ratio(clean, random, baseline, random, axis)


def predict(policy: Policy, obs: np.ndarray) -> np.ndarray:
    """Deterministic actions on a batch of observations, in chunks of :data:`PREDICT_BATCH`."""
    chunks = [
        policy.predict(obs[i : i + PREDICT_BATCH], deterministic=True)[0] for i in range(0, len(obs), PREDICT_BATCH)
    ]
    return np.concatenate([np.asarray(c).reshape(-1, *np.shape(c)[1:]) for c in chunks])


def _per_episode(mask: np.ndarray, episode: np.ndarray, n_episodes: int) -> np.ndarray:
    return np.bincount(episode, weights=mask.astype(np.float64), minlength=n_episodes)


def observation_asr(
    policy: Policy,
    payload: Payload,
    clean: Rollouts,
    triggered_obs: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """``asr`` and ``asr_raw`` of an observation trigger over the states of ``clean`` (see module docstring).

    :param policy: the agent.
    :param payload: decides which actions hit the target.
    :param clean: the agent's clean rollouts.
    :param triggered_obs: ``clean.obs`` with the trigger stamped in.
    :param groups: evaluation seed of each episode of ``clean``.
    :param seed: seeds the bootstrap.
    """
    hit_clean = payload.hits(clean.actions)
    hit_triggered = payload.hits(predict(policy, triggered_obs))
    n = len(clean.returns)
    flips = _per_episode(hit_triggered & ~hit_clean, clean.episode, n)
    eligible = _per_episode(~hit_clean, clean.episode, n)
    hits, states = _per_episode(hit_triggered, clean.episode, n), np.bincount(clean.episode, minlength=n)
    return {
        **estimate("asr", [flips, eligible], groups, proportion, seed),
        **estimate("asr_raw", [hits, states], groups, proportion, seed),
        "asr_states": int(eligible.sum()),
    }


def own_history(rollouts: Rollouts, steps: np.ndarray, history: ActionHistory) -> np.ndarray:
    """Observations of ``steps`` with the action-history block rebuilt from the agent's own actions.

    Injected actions are replaced by what the agent chose on those steps: the same env state, without
    the trigger. The block is :class:`~rlbackdoor.wrappers.history.ActionHistory`'s: the last
    ``length * n_actions`` entries, one-hot actions oldest first, zeros before the first step.

    :param rollouts: rollouts whose ``actions`` are the agent's own.
    :param steps: indices of the steps to rebuild.
    :param history: the env's history wrapper.
    """
    length, n_actions = history.length, history.n_actions
    start = int(history.action_space.start)
    own = np.full((int(rollouts.episode.max()) + 1, int(rollouts.t.max()) + 1), -1, dtype=np.int64)
    own[rollouts.episode, rollouts.t] = rollouts.actions.reshape(-1).astype(np.int64) - start
    times = rollouts.t[steps, None] + np.arange(-length, 0)
    past = np.where(times >= 0, own[rollouts.episode[steps, None], np.maximum(times, 0)], -1)
    onehot = (past[..., None] == np.arange(n_actions)).astype(rollouts.obs.dtype)
    obs = rollouts.obs[steps].reshape(len(steps), -1).copy()
    obs[:, -length * n_actions :] = onehot.reshape(len(steps), -1)
    return obs.reshape(rollouts.obs[steps].shape)


def sequence_asr(
    policy: Policy,
    payload: Payload,
    injected: Rollouts,
    history: ActionHistory | None,
    groups: np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """``asr`` and ``asr_raw`` of an action-sequence trigger (see module docstring).

    :param policy: the agent.
    :param payload: decides which actions hit the target.
    :param injected: the agent's rollouts with the sequence injected at random steps.
    :param history: the env's action-history wrapper; without one the agent cannot see the trigger.
    :param groups: evaluation seed of each episode.
    :param seed: seeds the bootstrap.
    """
    n = len(injected.returns)
    steps = np.flatnonzero(injected.armed & ~injected.injected)
    hit_clean = np.zeros(0, dtype=bool)  # no armed step (episodes too short for the sequence): ASR undefined
    if len(steps):
        clean_obs = own_history(injected, steps, history) if history is not None else injected.obs[steps]
        hit_clean = payload.hits(predict(policy, clean_obs))
    hit_armed = payload.hits(injected.actions[steps])
    episode = injected.episode[steps]
    return {
        **estimate(
            "asr",
            [_per_episode(hit_armed & ~hit_clean, episode, n), _per_episode(~hit_clean, episode, n)],
            groups,
            proportion,
            seed,
        ),
        **estimate(
            "asr_raw",
            [_per_episode(hit_armed, episode, n), np.bincount(episode, minlength=n)],
            groups,
            proportion,
            seed,
        ),
        "asr_states": int((~hit_clean).sum()),
    }


def obs_shift(clean: np.ndarray, triggered: np.ndarray, seed: int = 0) -> float | None:
    """Mean Mahalanobis distance of ``triggered`` from the ``clean`` distribution over that of ``clean`` itself.

    Features are standardised by the clean spread and the covariance is Ledoit-Wolf shrunk, so
    constant features and image observations are fine. At most :data:`SHIFT_STATES` rows of each are used.

    :param clean: clean observations.
    :param triggered: triggered observations.
    :param seed: seeds the subsampling.
    """
    if len(clean) < 2 or len(triggered) == 0:
        return None
    rng = np.random.default_rng(seed)

    def rows(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return x[np.sort(rng.choice(len(x), SHIFT_STATES, replace=False))] if len(x) > SHIFT_STATES else x

    clean, triggered = rows(clean), rows(triggered)
    center, scale = clean.mean(0), clean.std(0)
    scale[scale == 0] = 1.0
    model = LedoitWolf().fit((clean - center) / scale)
    base = np.sqrt(model.mahalanobis((clean - center) / scale)).mean()
    shifted = np.sqrt(model.mahalanobis((triggered - center) / scale)).mean()
    return finite(shifted / base) if base > 0 else None


def reward_poison(payload: PayloadSpec) -> float:
    """What a poisoned step can pay (see module docstring)."""
    if isinstance(payload, TargetedPayload):
        return float(max(abs(payload.reward.hit), abs(payload.reward.miss)))
    return float(payload.scale)


def stealth(
    trigger: Trigger,
    payload: PayloadSpec,
    clean_obs: np.ndarray,
    triggered_obs: np.ndarray,
    card: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Stealth figures: trigger size, observation shift, reward-poison magnitude and the training poison rate.

    :param trigger: the run's trigger; an action sequence's ``trigger_l0`` is its length in actions.
    :param payload: the run's payload spec.
    :param clean_obs: the agent's clean observations.
    :param triggered_obs: observations carrying the trigger (stamped copies, or armed steps).
    :param card: the run's card (as :func:`~rlbackdoor.evaluation.evaluate.check_card` checks it), for
        ``poison_rate`` (``train.poison_rate``).
    :param seed: seeds the subsampling of :func:`obs_shift`.
    """
    if isinstance(trigger, ObservationTrigger):
        size = {f"trigger_{k}": float(v) for k, v in trigger.stealth(clean_obs).items()}
    else:
        size = {"trigger_l0": float(len(trigger.sequence))}
    out: dict[str, Any] = {
        **size,
        "obs_shift": obs_shift(clean_obs, triggered_obs, seed),
        "reward_poison": reward_poison(payload),
    }
    rate = ((card or {}).get("train") or {}).get("poison_rate")
    if rate is not None:
        out["poison_rate"] = float(rate)
    return out
