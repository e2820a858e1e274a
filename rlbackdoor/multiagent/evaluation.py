"""Clean and triggered rollouts of a trained multi-agent policy: victim, team and per-agent returns, ASR.

Rollouts run on the registered env with ``poison=False`` (clean rewards). In *clean* episodes the
attacker never fires (the agents may still trigger the backdoor by chance); in *triggered* episodes the
trigger is active from step ``t0`` on: an observation trigger stays stamped into the victims'
observations, and the trigger agent of an action-sequence trigger plays the sequence, then its usual
moves while the backdoor is armed (``schedule.duration`` steps), then the sequence again, and so on.
Clean, triggered and random-policy episodes share their reset seeds.

The metrics are :mod:`rlbackdoor.evaluation`'s, with the same names, definitions (``return_drop`` and
``ctp_ratio`` relative to a random policy in the learners' seats) and bootstrap CIs over episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlbackdoor.errors import SpecError
from rlbackdoor.evaluation.evaluate import derived_seed
from rlbackdoor.evaluation.metrics import ctp_ratio, return_drop
from rlbackdoor.evaluation.rollouts import episode_seeds, evaluation_seeds
from rlbackdoor.evaluation.stats import estimate, iqm, proportion
from rlbackdoor.multiagent.attack import sample_parallel_observations
from rlbackdoor.multiagent.policies import AgentPolicy, PredictPolicy, RandomPolicy, SequencePolicy, check_plays
from rlbackdoor.multiagent.registry import build_policies, get_parallel_spec, make_base_parallel, make_parallel
from rlbackdoor.specs import MAX_TIMESTEPS, ActionSequenceTrigger, TargetedPayload
from rlbackdoor.wrappers.pettingzoo import BackdoorParallelEnv


@dataclass
class Episodes:
    """Per-episode results of a batch of rollouts."""

    returns: dict[str, np.ndarray]
    """Every agent's clean return per episode."""
    hits: np.ndarray
    """Victims' target actions on triggered steps, per episode."""
    triggered: np.ndarray
    """Victims' triggered steps (acting on a triggered observation, or while armed), per episode."""
    lengths: np.ndarray
    """Steps per episode."""


def _learners(env: BackdoorParallelEnv, env_id: str, sharing: bool) -> list[str]:
    """The agents a trained policy plays: every agent with ``sharing`` or when the env has no adapter, else the
    adapter agent."""
    adapter = get_parallel_spec(env_id).adapter
    return list(env.possible_agents) if sharing or adapter is None else [adapter.agent]


def _controllers(env: BackdoorParallelEnv, env_id: str, policy: Any | None, sharing: bool) -> dict[str, AgentPolicy]:
    """The policy (``None``: uniformly random) on the agents it plays (:func:`_learners`), the embedded policies
    on the others."""
    alone = _learners(env, env_id, sharing) != list(env.possible_agents)
    embedded = build_policies(get_parallel_spec(env_id), env) if alone else {}
    out: dict[str, AgentPolicy] = {}
    for agent in env.possible_agents:
        obs_space, act_space = env.observation_space(agent), env.action_space(agent)
        if agent in embedded:
            out[agent] = embedded[agent]
        elif policy is None:
            out[agent] = RandomPolicy(obs_space, act_space)
        else:
            out[agent] = PredictPolicy(obs_space, act_space, policy)
    return out


def _check_fits(policy: Any, env_id: str, sharing: bool, what: str, fix: str) -> None:
    """:func:`check_plays` on every agent ``policy`` plays on ``env_id``."""
    env = make_parallel(env_id)
    check_plays(policy, env, env_id, _learners(env, env_id, sharing), what, fix)


def rollouts(
    env_id: str, policy: Any | None, resets: Sequence[int], *, sharing: bool = False, triggered: bool, t0: int = 5
) -> Episodes:
    """Episodes of ``policy`` on a registered multi-agent env, one per reset seed.

    :param env_id: the registered id the policy was trained on.
    :param policy: anything with SB3's ``predict``; ``None`` plays uniformly random actions.
    :param resets: reset seeds (they also seed the embedded policies).
    :param sharing: the policy plays every agent (else the adapter agent, the others their embedded policies).
    :param triggered: keep the trigger active from ``t0`` on.
    """
    spec = get_parallel_spec(env_id)
    sequence = spec.trigger if isinstance(spec.trigger, ActionSequenceTrigger) else None
    duration = spec.schedule.duration
    if triggered and sequence is None:
        schedule = {"kind": "window", "start": t0, "stop": MAX_TIMESTEPS}  # to the end of any episode
    else:
        schedule = {"kind": "rate", "rate": 0.0, "duration": duration}
    env = make_parallel(env_id, poison=False, schedule=schedule)
    controllers = _controllers(env, env_id, policy, sharing)
    if triggered and sequence is not None:
        agent = sequence.agent
        controllers[agent] = SequencePolicy(controllers[agent], sequence.sequence, start=t0, pause=duration)  # type: ignore[index]
    victims = set(spec.victims)
    returns = {agent: np.zeros(len(resets)) for agent in env.possible_agents}
    hits, armed_steps, lengths = np.zeros(len(resets)), np.zeros(len(resets)), np.zeros(len(resets), dtype=np.int64)
    for i, reset in enumerate(resets):
        obs, infos = env.reset(seed=int(reset))
        for s, controller in zip(
            np.random.SeedSequence(int(reset)).generate_state(len(controllers)), controllers.values(), strict=True
        ):
            controller.reset(int(s))
        armed = {agent: infos[agent]["rlbd"]["triggered"] for agent in infos}
        while env.agents:
            obs, rewards, _, _, infos = env.step({agent: controllers[agent].act(obs[agent]) for agent in env.agents})
            lengths[i] += 1
            for agent, reward in rewards.items():
                returns[agent][i] += float(reward)
                if agent in victims and armed.get(agent, False):
                    armed_steps[i] += 1
                    hits[i] += int(infos[agent]["rlbd"]["hit"])
                armed[agent] = infos[agent]["rlbd"]["triggered"]
    return Episodes(returns, hits, armed_steps, lengths)


def evaluate(
    env_id: str,
    policy: Any,
    *,
    sharing: bool = False,
    episodes: int = 10,
    seeds: int | Sequence[int] = 3,
    baseline: Any | None = None,
    t0: int = 5,
) -> dict[str, Any]:
    """Clean and triggered metrics of a multi-agent policy, with 95% bootstrap CIs over episodes.

    ``ctp``, ``triggered_return``, ``return_drop``, ``random_return`` (and with ``baseline``, a clean-trained
    policy, ``baseline_ctp``, ``ctp_ratio`` and the controls ``baseline_triggered_return``, ``baseline_return_drop`` and
    ``baseline_asr``, the clean policy under the same trigger) are the first victim's; ``team_*`` the same on the sum of
    every agent's returns (zero in a zero-sum game, where ``team_return_drop`` is undefined); ``asr``
    (targeted payloads) the victims' target-action rate on triggered steps; ``ctp/<agent>`` and
    ``triggered_return/<agent>`` the per-agent means.

    :param env_id: the registered multi-agent id the policy was trained on.
    :param policy: anything with SB3's ``predict``.
    :param sharing: the policy plays every agent (parameter sharing).
    :param episodes: episodes per evaluation seed.
    :param seeds: evaluation seeds, or their number.
    :param baseline: a clean-trained policy of the same config.
    :param t0: the step from which the trigger is on in triggered episodes.
    :raise ArtifactError: ``policy`` or ``baseline`` does not fit the agents it plays (another env's policy).
    """
    spec = get_parallel_spec(env_id)
    _check_fits(policy, env_id, sharing, "the policy", "retrain the run or restore its card.json")
    if baseline is not None:
        _check_fits(
            baseline,
            env_id,
            sharing,
            "the baseline",
            f"pass a clean run of {env_id} as the baseline (the run's config with poisoning: null)",
        )
    seeds, episodes = evaluation_seeds(seeds, episodes)
    resets, groups = episode_seeds(seeds, episodes), np.repeat(seeds, episodes)
    boot = derived_seed(seeds, episodes)
    clean = rollouts(env_id, policy, resets, sharing=sharing, triggered=False, t0=t0)
    trig = rollouts(env_id, policy, resets, sharing=sharing, triggered=True, t0=t0)
    if not (trig.lengths > t0).any():  # not trig.triggered: the trigger agent may play the sequence by chance
        raise SpecError(f"t0: no triggered episode reached step {t0}, so the trigger never fired; lower t0")
    rand = rollouts(env_id, None, resets, sharing=sharing, triggered=False, t0=t0)
    victim = spec.victims[0]
    c, t, r = clean.returns[victim], trig.returns[victim], rand.returns[victim]
    tc, tt, tr = (sum(e.returns.values()) for e in (clean, trig, rand))
    out: dict[str, Any] = {
        "episodes": episodes,
        "seeds": seeds,
        "t0": t0,
        **estimate("ctp", [c], groups, seed=boot),
        "ctp_iqm": iqm(c),
        **estimate("random_return", [r], groups, seed=boot),
        **estimate("triggered_return", [t], groups, seed=boot),
        **estimate("return_drop", [c, t, r], groups, return_drop, boot),
        **estimate("team_ctp", [tc], groups, seed=boot),
        **estimate("team_triggered_return", [tt], groups, seed=boot),
        **estimate("team_return_drop", [tc, tt, tr], groups, return_drop, boot),
    }
    if baseline is not None:
        base = rollouts(env_id, baseline, resets, sharing=sharing, triggered=False, t0=t0).returns[victim]
        control = rollouts(env_id, baseline, resets, sharing=sharing, triggered=True, t0=t0)
        out.update(estimate("baseline_ctp", [base], groups, seed=boot))
        out.update(estimate("ctp_ratio", [c, base, r], groups, ctp_ratio, boot))
        out.update(estimate("baseline_triggered_return", [control.returns[victim]], groups, seed=boot))
        out.update(estimate("baseline_return_drop", [base, control.returns[victim], r], groups, return_drop, boot))
        if isinstance(spec.payload, TargetedPayload):  # a clean victim's target rate on triggered steps: chance
            out.update(estimate("baseline_asr", [control.hits, control.triggered], groups, proportion, boot))
    if isinstance(spec.payload, TargetedPayload):
        out.update(estimate("asr", [trig.hits, trig.triggered], groups, proportion, boot))
    for agent in clean.returns:
        out[f"ctp/{agent}"] = float(np.mean(clean.returns[agent]))
        out[f"triggered_return/{agent}"] = float(np.mean(trig.returns[agent]))
    return out


def stealth(env_id: str, n: int = 512) -> dict[str, Any]:
    """Stealth figures of a multi-agent env's trigger: per victim, L0/L2/Linf over ``n`` clean observations
    under random actions; for an action sequence, its length (L0 counts the trigger agent's actions)."""
    spec = get_parallel_spec(env_id)
    attack = make_parallel(env_id).attack
    if attack.sequence is not None:
        return {
            "l0": float(len(attack.sequence.sequence)),
            "note": f"actions of {attack.trigger_agent}: L0 counts them",
        }
    clean = sample_parallel_observations(make_base_parallel(spec), n, spec.seed)
    return {victim: trigger.stealth(clean[victim]) for victim, trigger in attack.obs_triggers.items()}
