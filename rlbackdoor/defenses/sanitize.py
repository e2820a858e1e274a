"""Run-time sanitization of a trained agent, scored like every other result: ASR and CTP before and after.

The defender has the agent and a clean copy of its env: it rolls the agent on the clean env to
collect ``n_clean`` observations, fits a sanitizer on them and lets the agent act on sanitized
observations. The metrics are :func:`rlbackdoor.evaluation.evaluate`'s, on the same episode seeds, random
returns and bootstrap resamples before and after, so the two are paired. The stateful ``track`` sanitizer's ASR
after is measured on-line (see :func:`tracked_metrics`): on other states than the ASR before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from rlbackdoor.attack import Attack
from rlbackdoor.defenses.base import SanitizedPolicy, Sanitizer
from rlbackdoor.defenses.subspace import SubspaceSanitizer
from rlbackdoor.defenses.support import SupportSanitizer, TrackingPolicy, TransitionModel
from rlbackdoor.errors import SpecError
from rlbackdoor.evaluation import evaluate
from rlbackdoor.evaluation.envs import run_env
from rlbackdoor.evaluation.evaluate import check_card, derived_seed, load_baseline
from rlbackdoor.evaluation.metrics import ctp_ratio
from rlbackdoor.evaluation.rollouts import RandomPolicy, episode_seeds, evaluation_seeds, rollout
from rlbackdoor.evaluation.stats import estimate, proportion
from rlbackdoor.specs import TargetedPayload
from rlbackdoor.trajectories import collect

METHODS: dict[str, str] = {
    "subspace": "safe-subspace projection onto the clean span (Bharti et al.); for rank-deficient observations",
    "support": "out-of-support features clipped into the clean box + Mahalanobis shrinkage; low-dim full-rank obs",
    "impute": "suspect features replaced by their clean conditional mean + shrinkage; low-dim full-rank obs",
    "track": "impute, but suspect features (and ones contradicting the dynamics) predicted from the last "
    "observation and action (linear clean dynamics); stateful, discrete actions",
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
    if method in ("support", "impute", "track"):
        if dim is not None:
            raise SpecError("sanitize: --dim applies to the subspace method only; drop it")
        return SupportSanitizer(repair="clip" if method == "support" else "impute")
    raise SpecError(f"sanitize: unknown method '{method}'; use one of {', '.join(METHODS)}")


def clean_transitions(
    policy: Any, card: Mapping[str, Any], n: int, seed: int = CLEAN_SEED, min_steps: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` transitions ``(s, a, s', has_next)`` drawn uniformly from the agent's own rollouts on its run's
    clean env (an episode's last step has no successor: ``has_next`` is ``False`` and ``s'`` is ``s``).

    The rollouts run for at least ``min_steps`` steps so that the sample spans several episodes.
    """
    if n < 2:
        raise SpecError(f"sanitize: n_clean={n} is too small; use at least 2 (typically 2x the observation size)")
    steps = max(n, min_steps)
    data = collect(run_env(card).make(), policy, steps + 1, seed)
    pick = np.random.default_rng(seed).permutation(steps)[:n]
    has_next = ~data.dones[pick].astype(bool)
    return data.observations[pick], data.actions[pick], data.observations[np.where(has_next, pick + 1, pick)], has_next


def tracked_metrics(
    tracker: TrackingPolicy,
    card: Mapping[str, Any],
    baseline: Any = None,
    episodes: int = 10,
    seeds: int | Sequence[int] = 3,
    rate: float = 0.1,
) -> dict[str, Any]:
    """``asr``, ``ctp`` and ``ctp_ratio`` of an agent behind a stateful :class:`TrackingPolicy`, with the
    evaluation's definitions and episode seeds.

    CTP: episodes played on the tracker's observations. ASR: in episodes where the agent executes its
    own action on the true state, each step carries the trigger with probability ``rate``; over those
    whose clean action misses the target, the share whose action through the tracker hits it.
    """
    seeds, episodes = evaluation_seeds(seeds, episodes)
    env, resets, groups = run_env(card), episode_seeds(seeds, episodes), np.repeat(seeds, episodes)
    boot = derived_seed(seeds, episodes)  # evaluate's: the random returns and resamples of the figures before
    if env.attack is None:
        raise SpecError("sanitize: the run has no attack to measure; use a backdoored run")
    game = env.make()
    attack = Attack.for_env(env.attack, game)
    if attack.obs_trigger is None or not isinstance(env.attack.payload, TargetedPayload):
        raise SpecError("sanitize: track measures targeted observation triggers; use another method")
    rng = np.random.default_rng(CLEAN_SEED)
    returns, flips, eligible = np.zeros(len(resets)), np.zeros(len(resets)), np.zeros(len(resets))
    for i, reset in enumerate(resets):
        for attacked in (False, True):
            obs, _ = game.reset(seed=int(reset))
            tracker.reset()
            done = False
            while not done:
                triggered = attacked and rng.random() < rate
                seen = tracker.sanitize(attack.obs_trigger.apply(obs[None])[0] if triggered else obs)
                action = tracker.policy.predict(seen[None], deterministic=True)[0][0]
                if attacked:
                    own = tracker.policy.predict(obs[None], deterministic=True)[0][0] if triggered else action
                    if triggered and not attack.payload.hits(np.asarray([own]))[0]:
                        eligible[i] += 1
                        flips[i] += bool(attack.payload.hits(np.asarray([action]))[0])
                    action = own
                tracker.observe(seen, action)
                obs, reward, terminated, truncated, _ = game.step(action)
                returns[i] += 0.0 if attacked else float(reward)
                done = terminated or truncated
    out = {
        **estimate("ctp", [returns], groups, seed=boot),
        **estimate("asr", [flips, eligible], groups, proportion, boot),
    }
    if baseline is not None:
        base = rollout(baseline, env.make, resets).returns
        random = rollout(RandomPolicy(game.action_space, derived_seed(seeds, 1)), env.make, resets).returns
        out.update(estimate("ctp_ratio", [returns, base, random], groups, ctp_ratio, boot))
    game.close()
    return out


def _n_actions(card: Mapping[str, Any]) -> int:
    env = run_env(card).make()
    space = env.action_space
    env.close()
    if not isinstance(space, gym.spaces.Discrete):
        raise SpecError(f"sanitize: track models discrete actions, the run's env has {space}; use impute")
    return int(space.n)


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
    probe = run_env(card).make()
    d = int(np.prod(probe.observation_space.shape))
    probe.close()
    least = make_sanitizer(method, dim).min_clean(d)
    if sizes[0] < least:  # before any rollout
        raise SpecError(f"sanitize: n_clean={sizes[0]} is too few for {method} on {d} features; use n >= {least}")
    pool = clean_transitions(policy, card, max(sizes))  # a random order: each prefix is a uniform sample
    before = evaluate(policy, card, episodes=episodes, seeds=seeds, baseline=baseline)
    out: dict[str, Any] = {"method": method, **_pick(before, "before")}
    points = []
    for n in sizes:
        sanitizer = make_sanitizer(method, dim).fit(pool[0][:n])
        if method == "track":
            obs, actions, next_obs, has_next = (part[:n] for part in pool)
            model = TransitionModel(_n_actions(card)).fit(obs[has_next], actions[has_next], next_obs[has_next])
            after = tracked_metrics(TrackingPolicy(policy, sanitizer, model), card, baseline, episodes, seeds)
        else:
            after = evaluate(
                SanitizedPolicy(policy, sanitizer), card, episodes=episodes, seeds=seeds, baseline=baseline
            )
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
    from rlbackdoor.training.artifacts import CARD, load_policy

    policy, card = load_policy(run_dir)
    run_env(card, Path(run_dir) / CARD)  # a card that does not name its env fails here, naming its path
    check_card(run_dir, card)
    baseline = load_baseline(baseline_dir, run_dir, card) if baseline_dir is not None else None
    return sanitize_agent(policy, card, method, n_clean, dim, baseline, episodes, seeds, curve)
