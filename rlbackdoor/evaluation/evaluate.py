"""``evaluate``: every metric of one agent on its run's clean env and trigger; ``evaluate_run`` for a run directory."""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.evaluation.envs import Source, action_history, eval_attack, run_env
from rlbackdoor.evaluation.metrics import ctp_ratio, observation_asr, return_drop, sequence_asr, stealth
from rlbackdoor.evaluation.rollouts import (
    Policy,
    RandomPolicy,
    Rollouts,
    check_policy_fits,
    episode_seeds,
    evaluation_seeds,
    rollout,
)
from rlbackdoor.evaluation.stats import estimate, iqm
from rlbackdoor.multiagent.registry import is_multiagent
from rlbackdoor.specs import AttackSpec, TargetedPayload

INJECT_RATE = 0.05
"""Per-step probability of injecting an action-sequence trigger when measuring its ASR."""


def derived_seed(seeds: Sequence[int], salt: int) -> int:
    """A seed drawn from the evaluation ``seeds`` and ``salt``: 1 for the random policy, the episode count for the
    bootstrap (shared by every evaluation of the same seeds and episodes, so that their figures are paired)."""
    return int(np.random.SeedSequence([*seeds, salt]).generate_state(1)[0])


def evaluate(
    policy: Policy,
    source: Source,
    episodes: int = 10,
    seeds: int | Sequence[int] = 3,
    baseline: Policy | None = None,
    t0: int = 0,
    card: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate an agent: CTP, ASR, untargeted effect and stealth, with bootstrap 95% CIs over episodes.

    Definitions are :mod:`rlbackdoor.evaluation.metrics`'s. Every metric ``m`` with a CI comes with
    ``m_ci_low``, ``m_ci_high`` and ``m_per_seed``; undefined values are ``None``. A clean run (no
    attack) gets the return metrics only; an untargeted attack gets no ``asr``.

    :param policy: the agent (anything with SB3's ``predict``).
    :param source: the run's card, its attack spec, or an env id (see :data:`~rlbackdoor.evaluation.envs.Source`).
    :param episodes: episodes per evaluation seed.
    :param seeds: evaluation seeds, or their number (seeds ``0..n-1``).
    :param baseline: a clean-trained agent of the same config, for ``ctp_ratio`` and, under an attack, the controls
        ``baseline_triggered_return``, ``baseline_return_drop`` and ``baseline_asr`` (the clean agent under the same
        trigger).
    :param t0: the step from which the trigger is on in the triggered rollouts.
    :param card: the run's card, for the training ``poison_rate`` (default: ``source`` when it is a card).
    """
    seeds, episodes = evaluation_seeds(seeds, episodes)
    card = card if card is not None else (source if isinstance(source, Mapping) else None)
    env = run_env(source)
    resets, groups, boot = episode_seeds(seeds, episodes), np.repeat(seeds, episodes), derived_seed(seeds, episodes)
    clean = rollout(policy, env.make, resets)
    probe = env.make()
    random = rollout(RandomPolicy(probe.action_space, derived_seed(seeds, 1)), env.make, resets)
    out: dict[str, Any] = {
        "episodes": episodes,
        "seeds": seeds,
        **estimate("ctp", [clean.returns], groups, seed=boot),
        "ctp_iqm": iqm(clean.returns),
        **estimate("random_return", [random.returns], groups, seed=boot),
    }
    if baseline is not None:
        check_policy_fits(baseline, probe, "the baseline")
        base = rollout(baseline, env.make, resets)
        out.update(estimate("baseline_ctp", [base.returns], groups, seed=boot))
        out.update(estimate("ctp_ratio", [clean.returns, base.returns, random.returns], groups, ctp_ratio, boot))
    if env.attack is not None:
        out.update(attack_metrics(policy, env.attack, env.make, probe, clean, random.returns, groups, t0, card, boot))
        if baseline is not None:  # the clean agent under the same trigger: what it does without a backdoor
            control = attack_metrics(
                baseline, env.attack, env.make, probe, base, random.returns, groups, t0, seed=boot, control=True
            )
            out.update({f"baseline_{key}": value for key, value in control.items()})
    probe.close()
    return out


def attack_metrics(
    policy: Policy,
    spec: AttackSpec,
    make_env: Callable[[], gym.Env],
    probe: gym.Env,
    clean: Rollouts,
    random_returns: np.ndarray,
    groups: np.ndarray,
    t0: int = 0,
    card: Mapping[str, Any] | None = None,
    seed: int = 0,
    control: bool = False,
) -> dict[str, Any]:
    """``triggered_return``, ``return_drop``, ``asr`` (targeted payloads) and the stealth figures.

    :param policy: the agent.
    :param spec: the run's attack.
    :param make_env: makes one clean env.
    :param probe: one clean env, to build the attack against.
    :param clean: the agent's clean rollouts; the triggered ones reuse their episode seeds.
    :param random_returns: a random policy's returns on the same episode seeds.
    :param groups: evaluation seed of each episode.
    :param t0: the step from which the trigger is on in the triggered rollouts (refused if no episode reaches it).
    :param card: the run's card, for the training ``poison_rate``.
    :param seed: seeds the attack's draws and the bootstrap.
    :param control: ``policy`` is a clean baseline, the control of these metrics: no stealth figures, and no
        refusal of ``t0`` (a baseline that falls before it never meets the trigger).
    """
    attack = eval_attack(spec, probe, t0=t0)
    triggered = rollout(policy, make_env, clean.seeds, attack, attack_seed=seed)
    if not control and not (triggered.lengths > t0).any():  # not .armed: the agent may complete an action trigger
        raise SpecError(f"t0: no triggered episode reached step {t0}, so the trigger never fired; lower t0")
    out = {
        **estimate("triggered_return", [triggered.returns], groups, seed=seed),
        **estimate("return_drop", [clean.returns, triggered.returns, random_returns], groups, return_drop, seed),
    }
    targeted = isinstance(spec.payload, TargetedPayload)
    if attack.obs_trigger is not None:
        triggered_obs = attack.obs_trigger.apply(clean.obs)
        if targeted:
            out.update(observation_asr(policy, attack.payload, clean, triggered_obs, groups, seed))
    else:
        injected = rollout(policy, make_env, clean.seeds, eval_attack(spec, probe, rate=INJECT_RATE), attack_seed=seed)
        triggered_obs = injected.obs[injected.armed & ~injected.injected]
        if targeted:
            out.update(sequence_asr(policy, attack.payload, injected, action_history(probe), groups, seed))
    if control:
        return out
    return out | stealth(attack.trigger, spec.payload, clean.obs, triggered_obs, card, seed)


def check_card(run_dir: str | Path, card: Mapping[str, Any]) -> None:
    """What evaluation reads from a run's card: ``env`` an env id; ``config``, ``metrics`` and ``train`` mappings
    where set, and ``train.poison_rate`` a rate in 0..1 where set."""
    from rlbackdoor.training.card_schema import CARD, CardError, card_entry, expect

    path = Path(run_dir) / CARD
    card_entry(path, card, "env", str)
    for key in ("config", "metrics", "train"):
        if key in card:
            card_entry(path, card, key, dict, type(None))
    field = f"{path}: train.poison_rate"
    rate = expect(field, (card.get("train") or {}).get("poison_rate"), int, float, type(None))
    if rate is not None and not 0 <= rate <= 1:  # NaN fails too
        raise CardError(field, f"{reprlib.repr(rate)} is not a rate in 0..1")


def clean_env_id(card: Mapping[str, Any]) -> str:
    """The id of the clean env a run plays: its attack's base env, else its env."""
    env = str(card["env"]).removeprefix("rlbackdoor:")
    if is_multiagent(env):
        return env
    attack = run_env(card).attack
    return env if attack is None else attack.base


def load_baseline(baseline_dir: str | Path, run_dir: str | Path, card: Mapping[str, Any]) -> Any:
    """The policy of a clean baseline run for the run of ``card`` (in ``run_dir``); refused when the two runs
    play different clean envs or the baseline's training poisoned a step (a zoo's clean controls, whose trigger
    never fires, are clean baselines)."""
    from rlbackdoor.training.artifacts import load_policy

    policy, baseline_card = load_policy(baseline_dir)
    check_card(baseline_dir, baseline_card)
    ours, theirs = clean_env_id(card), clean_env_id(baseline_card)
    if ours != theirs:
        raise ArtifactError(
            f"baseline {baseline_dir}: a run of {theirs}, but {run_dir} is a run of {ours}; "
            f"pass a clean run of {ours} as the baseline (the run's config with poisoning: null)"
        )
    sharing = [bool((c.get("config") or {}).get("sharing")) for c in (card, baseline_card)]
    if sharing[0] != sharing[1]:  # one policy for every agent against one for the adapter's seat: another game
        state = {True: "on", False: "off"}
        raise ArtifactError(
            f"baseline {baseline_dir}: parameter sharing is {state[sharing[1]]}, but {state[sharing[0]]} in {run_dir}; "
            f"pass a clean run of the same config (sharing: {str(sharing[0]).lower()}, poisoning: null)"
        )
    rate = (baseline_card.get("train") or {}).get("poison_rate")
    if baseline_card.get("poisoning") is not None and rate != 0:
        raise ArtifactError(
            f"baseline {baseline_dir}: a poisoned run (poisoning: {reprlib.repr(baseline_card['poisoning'])}, "
            f"training poison rate {rate}); pass a clean run of {ours} (the run's config with poisoning: null)"
        )
    return policy


def evaluate_run(
    run_dir: str | Path,
    baseline_dir: str | Path | None = None,
    episodes: int = 10,
    seeds: int | Sequence[int] = 3,
    t0: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate` a finished run (and its clean baseline run) loaded with :func:`rlbackdoor.load_policy`.

    A run on a multi-agent env gets :func:`rlbackdoor.multiagent.evaluation.evaluate` instead.

    :param run_dir: the run directory (``card.json``, ``policy.safetensors``).
    :param baseline_dir: a clean run of the same config, for ``ctp_ratio``.
    :param episodes: episodes per evaluation seed.
    :param seeds: evaluation seeds, or their number.
    :param t0: the step from which the trigger is on in the triggered rollouts.
    """
    from rlbackdoor.training.artifacts import load_policy

    policy, card = load_policy(run_dir)
    check_card(run_dir, card)
    baseline = load_baseline(baseline_dir, run_dir, card) if baseline_dir is not None else None
    if is_multiagent(card["env"]):
        from rlbackdoor.multiagent.evaluation import evaluate as evaluate_multiagent

        sharing = bool((card.get("config") or {}).get("sharing"))
        return evaluate_multiagent(
            card["env"], policy, sharing=sharing, episodes=episodes, seeds=seeds, baseline=baseline, t0=t0
        )
    return evaluate(policy, card, episodes=episodes, seeds=seeds, baseline=baseline, t0=t0, card=card)
