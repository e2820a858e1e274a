"""Clean and triggered rollouts of a trained multi-agent policy: victim, team and per-agent returns, ASR.

Rollouts run on the registered env with ``poison=False`` (clean rewards). In *clean* episodes the
attacker never fires (the agents may still trigger the backdoor by chance); in *triggered* episodes the
trigger is active from step ``t0`` on: an observation trigger stays stamped into the victims'
observations, and the trigger agent of an action-sequence trigger plays the sequence, then its usual
moves while the backdoor is armed (``schedule.duration`` steps), then the sequence again, and so on.
Clean and triggered episodes share their seeds.

Returns can be negative (MPE), so ``return_drop = (ctp - triggered_return) / |ctp|``: for positive
returns it is DESIGN's ``1 - triggered_return / ctp``, and a worse triggered return is always a drop.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from rlbackdoor.multiagent.policies import AgentPolicy, PredictPolicy, SequencePolicy
from rlbackdoor.multiagent.registry import build_policies, get_parallel_spec, make_parallel
from rlbackdoor.specs import ActionSequenceTrigger, TargetedPayload
from rlbackdoor.wrappers.pettingzoo import BackdoorParallelEnv

NEVER = 10**9


def _controllers(env: BackdoorParallelEnv, env_id: str, policy: Any, sharing: bool) -> dict[str, AgentPolicy]:
    """The policy on the agents it plays (all with sharing or without an adapter, else the adapter agent);
    the embedded policies on the others."""
    spec = get_parallel_spec(env_id)
    embedded = {} if sharing or spec.adapter is None else build_policies(spec, env)
    return {
        agent: embedded.get(agent) or PredictPolicy(env.observation_space(agent), env.action_space(agent), policy)
        for agent in env.possible_agents
    }


def rollouts(
    env_id: str, policy: Any, *, sharing: bool = False, triggered: bool, episodes: int = 20, t0: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Episodes of ``policy`` on a registered multi-agent env.

    :param env_id: the registered id the policy was trained on.
    :param policy: anything with SB3's ``predict``.
    :param sharing: the policy plays every agent (else the adapter agent, the others their embedded policies).
    :param triggered: keep the trigger active from ``t0`` on.
    :param episodes: number of episodes (episode ``i`` is seeded ``seed + i``).
    :return: ``returns`` (agent -> per-episode clean returns), ``hits`` and ``triggered_steps`` of the victims.
    """
    spec = get_parallel_spec(env_id)
    sequence = spec.trigger if isinstance(spec.trigger, ActionSequenceTrigger) else None
    duration = spec.schedule.duration
    if triggered and sequence is None:
        schedule = {"kind": "window", "start": t0, "stop": t0 + NEVER}
    else:
        schedule = {"kind": "rate", "rate": 0.0, "duration": duration}
    env = make_parallel(env_id, poison=False, schedule=schedule)
    controllers = _controllers(env, env_id, policy, sharing)
    if triggered and sequence is not None:
        agent = sequence.agent
        controllers[agent] = SequencePolicy(controllers[agent], sequence.sequence, start=t0, pause=duration)  # type: ignore[index]
    returns: dict[str, list[float]] = defaultdict(list)
    hits = armed_steps = 0
    victims = set(spec.victims)
    for i in range(episodes):
        obs, infos = env.reset(seed=seed + i)
        seeds = np.random.SeedSequence([seed, i]).generate_state(len(controllers))
        for s, controller in zip(seeds, controllers.values(), strict=True):
            controller.reset(int(s))
        armed = {agent: infos[agent]["rlbd"]["triggered"] for agent in infos}
        total = dict.fromkeys(env.possible_agents, 0.0)
        while env.agents:
            actions = {agent: controllers[agent].act(obs[agent]) for agent in env.agents}
            obs, rewards, _, _, infos = env.step(actions)
            for agent, reward in rewards.items():
                total[agent] += float(reward)
                if agent in victims and armed.get(agent, False):
                    armed_steps += 1
                    hits += int(infos[agent]["rlbd"]["hit"])
                armed[agent] = infos[agent]["rlbd"]["triggered"]
        for agent, value in total.items():
            returns[agent].append(value)
    return {"returns": dict(returns), "hits": hits, "triggered_steps": armed_steps}


def evaluate(
    env_id: str, policy: Any, *, sharing: bool = False, episodes: int = 20, t0: int = 5, seed: int = 0
) -> dict[str, float]:
    """Clean and triggered metrics of a multi-agent policy (keys as DESIGN names them, per agent under ``/<agent>``).

    ``ctp``/``triggered_return``/``return_drop`` are the (first) victim's; ``team_*`` sum every agent's
    returns (zero in a zero-sum game, where ``team_return_drop`` is left out); ``asr`` (targeted payloads) is the victims' target-action rate on triggered steps.
    """
    spec = get_parallel_spec(env_id)
    clean = rollouts(env_id, policy, sharing=sharing, triggered=False, episodes=episodes, t0=t0, seed=seed)
    trig = rollouts(env_id, policy, sharing=sharing, triggered=True, episodes=episodes, t0=t0, seed=seed)
    victim = spec.victims[0]

    def drop(before: float, after: float) -> float:
        return (before - after) / abs(before) if before != 0 else float("nan")

    team_clean = float(np.sum([np.mean(r) for r in clean["returns"].values()]))
    team_trig = float(np.sum([np.mean(r) for r in trig["returns"].values()]))
    ctp = float(np.mean(clean["returns"][victim]))
    triggered_return = float(np.mean(trig["returns"][victim]))
    metrics = {
        "ctp": ctp,
        "triggered_return": triggered_return,
        "return_drop": drop(ctp, triggered_return),
        "team_ctp": team_clean,
        "team_triggered_return": team_trig,
        "team_return_drop": drop(team_clean, team_trig),
    }
    metrics = {k: v for k, v in metrics.items() if not np.isnan(v)}
    if isinstance(spec.payload, TargetedPayload):
        metrics["asr"] = trig["hits"] / max(1, trig["triggered_steps"])
    for agent in clean["returns"]:
        metrics[f"ctp/{agent}"] = float(np.mean(clean["returns"][agent]))
        metrics[f"triggered_return/{agent}"] = float(np.mean(trig["returns"][agent]))
    return metrics
