"""The multi-agent backdoor state machine: the single-agent triggers, schedules and payloads, driven per agent.

The backdoor is an event of the whole env. It arms when the schedule fires an observation trigger
(stamped into every victim's observation), or when the trigger agent completes its action sequence
(visible to the victims only through the env). While armed, each victim's step is *poisoned*: the
payload rewrites that victim's reward (and may force its action). Other agents are never touched.
With ``poison=False`` the triggers still happen but rewards and actions stay clean: the control env in
which a clean agent is trained and every agent is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from rlbackdoor.attack import PoisonCounts
from rlbackdoor.errors import SpecError
from rlbackdoor.poisoning.payloads import Payload, build_payload
from rlbackdoor.poisoning.schedules import Schedule, build_schedule
from rlbackdoor.specs import ActionSequenceTrigger, MultiAgentAttackSpec
from rlbackdoor.triggers import ActionSequence, ObservationTrigger, build_trigger

T = TypeVar("T")


def sample_parallel_observations(env: ParallelEnv, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` steps of ``env`` under uniformly random actions (seeded): each agent's observations, stacked."""
    obs, _ = env.reset(seed=seed)
    for i, agent in enumerate(env.possible_agents):
        env.action_space(agent).seed(seed + i)
    out: dict[str, list[Any]] = {agent: [] for agent in env.possible_agents}
    for _ in range(n):
        for agent, o in obs.items():
            out[agent].append(o)
        obs, *_ = env.step({agent: env.action_space(agent).sample() for agent in env.agents})
        if not env.agents:
            obs, _ = env.reset()
    return {agent: np.stack(seen) for agent, seen in out.items() if seen}


def _for_agent(agent: str, build: Callable[..., T], *args: Any) -> T:
    try:
        return build(*args)
    except SpecError as err:
        raise SpecError(f"agent '{agent}': {err}") from None


@dataclass
class MultiAgentFlags:
    """What happened on one step: whether it was poisoned, whether the next observations carry the trigger,
    which victims took the target action on a triggered step, and every agent's clean reward."""

    poisoned: bool
    triggered: bool
    hits: dict[str, bool]
    clean_rewards: dict[str, float]


class MultiAgentAttack(PoisonCounts):
    """Trigger + schedule + payload of a multi-agent attack, with the state of one env.

    :param spec: the attack.
    :param observation_spaces: every agent's observation space (after ``base_wrappers``).
    :param action_spaces: every agent's action space.
    :param clean: clean observations per victim (needed by in-distribution triggers).
    :param poison: rewrite the victims' rewards and actions on triggered steps (``False``: only trigger).
    :raise SpecError: a victim or trigger agent that is not in the env, or a trigger or payload that does
        not fit that agent's spaces.
    """

    def __init__(
        self,
        spec: MultiAgentAttackSpec,
        observation_spaces: Mapping[str, spaces.Space],
        action_spaces: Mapping[str, spaces.Space],
        clean: Mapping[str, np.ndarray] | None = None,
        poison: bool = True,
    ) -> None:
        agents = list(observation_spaces)
        for victim in spec.victims:
            if victim not in observation_spaces:
                raise SpecError(f"victims: '{victim}' is not an agent of {spec.base}; use agents among {agents}")
        self.spec = spec
        self.poison = poison
        self.victims = list(spec.victims)
        self.trigger_agent: str | None = None
        self.sequence: ActionSequence | None = None
        self.obs_triggers: dict[str, ObservationTrigger] = {}
        if isinstance(spec.trigger, ActionSequenceTrigger):
            agent = spec.trigger.agent
            if agent not in observation_spaces:
                raise SpecError(f"trigger.agent: '{agent}' is not an agent of {spec.base}; use one of {agents}")
            self.trigger_agent = agent
            self.sequence = _for_agent(agent, ActionSequence, spec.trigger, action_spaces[agent])
        else:
            clean = clean or {}
            for victim in self.victims:
                self.obs_triggers[victim] = _for_agent(  # type: ignore[assignment]
                    victim,
                    build_trigger,
                    spec.trigger,
                    observation_spaces[victim],
                    action_spaces[victim],
                    clean.get(victim),
                )
        self.payloads: dict[str, Payload] = {
            victim: _for_agent(victim, build_payload, spec.payload, action_spaces[victim]) for victim in self.victims
        }
        self.schedule: Schedule = build_schedule(spec.schedule)
        self.reset()

    # ------------------------------------------------------------------------------------- state
    def reset(self, seed: int | None = None) -> None:
        """Zero the counts and reseed: same (spec seed, ``seed``), same draws."""
        key = [self.spec.seed] if seed is None else [self.spec.seed, seed]
        self.rng = np.random.default_rng(np.random.SeedSequence(key))
        self.n_steps = self.n_poisoned = self.n_triggered = self.n_hits = 0
        self.schedule.reset(1)
        self._restart()

    def _restart(self) -> None:
        self.t = np.zeros(1, dtype=np.int64)
        self.left = np.zeros(1, dtype=np.int64)
        self.armed = np.zeros(1, dtype=bool)
        self.inject = -1
        if self.sequence is not None:
            self.sequence.reset(1)

    def _stamp(self, obs: dict[str, Any], on: bool) -> dict[str, Any]:
        if not on or not self.obs_triggers:
            return obs
        out = dict(obs)
        for victim, trigger in self.obs_triggers.items():
            if victim in out:
                out[victim] = trigger.apply(np.asarray(out[victim])[None])[0]
        return out

    def _decide(self, obs: dict[str, Any], start: bool) -> dict[str, Any]:
        """Decide whether the next observations are triggered; stamp the victims' observations."""
        first = obs.get(self.victims[0])
        state = np.asarray(first)[None] if first is not None else np.empty((1, 0))
        free = (self.left == 0) & (self.inject < 0)  # no trigger running: a firing here is never lost
        fire = self.schedule.fire(self.t, np.array([start]), free, self.rng.random(1), state)
        if fire[0]:
            if self.sequence is not None:
                self.inject = 0
            else:
                self.left[:] = self.schedule.duration
        cap = self.schedule.max_poisoned
        if cap is not None and self.n_triggered >= cap:
            self.left[:] = 0  # the budget is spent
        armed = self.left > 0
        self.left[armed] -= 1
        self.armed = armed
        self.n_triggered += int(armed[0])
        return self._stamp(obs, bool(armed[0]))

    # ----------------------------------------------------------------------------------- driving
    def begin(self, obs: dict[str, Any]) -> dict[str, Any]:
        """First observations of a new episode."""
        if self.left[0]:  # the trigger still running loses its remaining steps
            self.schedule.cut(int(self.left[0]))
        self._restart()
        return self._decide(obs, start=True)

    def act(self, actions: Mapping[str, Any]) -> dict[str, Any]:
        """Actions to execute: the payload may force victims' targets; the attacker may inject the sequence."""
        executed = dict(actions)
        if self.poison and self.armed[0]:
            for victim in self.victims:
                payload = self.payloads[victim]
                if victim in actions and payload.force_action_prob > 0:
                    executed[victim] = payload.force(np.asarray(actions[victim])[None], self.armed, self.rng.random(1))[
                        0
                    ]
        if self.sequence is not None and self.inject >= 0 and self.trigger_agent in actions:
            executed[self.trigger_agent] = self.sequence.sequence[self.inject]
            self.inject = self.inject + 1 if self.inject + 1 < len(self.sequence.sequence) else -1
        return executed

    def step(
        self,
        obs: dict[str, Any],
        rewards: Mapping[str, float],
        done: bool,
        actions: Mapping[str, Any],
        executed: Mapping[str, Any],
    ) -> tuple[dict[str, Any], dict[str, float], MultiAgentFlags]:
        """Poison one step.

        :param obs: observations the env returned.
        :param rewards: clean rewards.
        :param done: whether the episode is over (no agent left).
        :param actions: the agents' own actions (the payload rewards the victims' ones).
        :param executed: the actions the env executed (the sequence trigger watches the trigger agent's).
        :return: observations, rewards and the step's flags.
        """
        armed = bool(self.armed[0])
        poisoned = armed and self.poison
        clean = {agent: float(r) for agent, r in rewards.items()}
        out = dict(clean)
        hits: dict[str, bool] = {}
        for victim in self.victims:
            if victim in clean and victim in actions:
                payload, action = self.payloads[victim], np.asarray(actions[victim])[None]
                hit = payload.hits(action)
                hits[victim] = armed and bool(hit[0])
                if poisoned:
                    out[victim] = float(payload.reward(np.array([clean[victim]]), hit, self.armed)[0])
        self.n_steps += 1
        self.n_poisoned += int(poisoned)
        self.n_hits += sum(hits.values())
        if self.sequence is not None and self.trigger_agent in executed:
            matched = self.sequence.observe(np.asarray(executed[self.trigger_agent]).reshape(1))
            self.left[matched & (self.left == 0)] = self.schedule.duration
        self.t += 1
        if done:  # no decision follows; a trigger still running stays on the final observations
            triggered = bool(self.left[0] > 0) and bool(self.obs_triggers)  # as single-agent envs flag them
            obs = self._stamp(obs, triggered)
            self.armed = np.zeros(1, dtype=bool)
        else:
            obs = self._decide(obs, start=False)
            triggered = bool(self.armed[0])
        return obs, out, MultiAgentFlags(poisoned, triggered, hits, clean)

    # ----------------------------------------------------------------------------------- reports
    def info(self, flags: MultiAgentFlags, agent: str) -> dict[str, Any]:
        """The ``info[agent]["rlbd"]`` entry of one step."""
        target = self.payloads[agent].target if agent in self.payloads else None
        return {
            "victim": agent in self.payloads,
            "poisoned": flags.poisoned and agent in self.payloads,
            "triggered": flags.triggered,
            "hit": flags.hits.get(agent, False),
            "target": None if target is None else target.tolist(),
            "clean_reward": flags.clean_rewards.get(agent, 0.0),
            **self.counts(),
        }
