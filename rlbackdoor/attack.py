"""The batched backdoor state machine shared by every wrapper, and the base envs it attacks.

An :class:`Attack` holds a trigger, a schedule and a payload, and per-env state for a batch of
``n`` envs. Wrappers drive it in three calls:

- :meth:`Attack.begin` on the first observations of new episodes,
- :meth:`Attack.act` on the agent's actions (returns the actions to execute),
- :meth:`Attack.step` on what the env returned (returns poisoned observations, rewards and flags).

A step is *poisoned* when the agent acted on a triggered observation (its reward and possibly its
action are manipulated); an observation is *triggered* when the trigger is in it (or, for an
action-sequence trigger, when the backdoor is armed).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import parse_env_id

from rlbackdoor.errors import SpecError, detail
from rlbackdoor.poisoning.payloads import Payload, build_payload
from rlbackdoor.poisoning.schedules import Schedule, build_schedule
from rlbackdoor.specs import AttackSpec, InDistributionTrigger
from rlbackdoor.triggers import ActionSequence, ObservationTrigger, build_trigger

_OPTIONAL_ENV_PACKAGES = {"MiniGrid-": "minigrid", "BabyAI-": "minigrid"}


def make_gym_env(env_id: str, field: str = "env", **kwargs: Any) -> gym.Env:
    """``gymnasium.make`` with the project's error: ``field`` names the spec field the id came from."""
    try:
        for prefix, package in _OPTIONAL_ENV_PACKAGES.items():
            if env_id.startswith(prefix):
                importlib.import_module(package)
        return gym.make(env_id, **kwargs)
    except (gym.error.Error, ImportError) as err:
        raise SpecError(
            f"{field}: cannot make '{env_id}' ({err}); use a registered Gymnasium id (module:Id imports its package)"
        ) from None


def make_base_env(spec: AttackSpec, **make_kwargs: Any) -> gym.Env:
    """The clean env an attack applies to: ``gymnasium.make(base, **base_kwargs)`` then ``base_wrappers``."""
    try:
        env = make_gym_env(spec.base, "base", **{**spec.base_kwargs, **make_kwargs})
    except SpecError:
        raise
    except Exception as err:  # the env's own code checks its arguments: anything may come out
        raise SpecError(f"base_kwargs: '{spec.base}' rejects them ({detail(err)}); fix base_kwargs") from None
    for ref in spec.base_wrappers:
        module, _, name = ref.name.partition(":")
        try:
            wrapper = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise SpecError(f"base_wrappers: cannot import '{ref.name}'; give an importable module:Class") from None
        try:
            env = wrapper(env, **ref.kwargs)
        except (TypeError, ValueError, gym.error.Error) as err:
            raise SpecError(f"base_wrappers: {ref.name} rejects its kwargs ({err}); fix them") from None
        if not isinstance(env, gym.Env):
            raise SpecError(
                f"base_wrappers: {ref.name} returned {type(env).__name__}, not an env; name a gymnasium wrapper"
            )
    return env


def check_base(spec: AttackSpec, env_spec: Any) -> None:
    """Refuse an env made from another id than the spec's ``base`` (``env_spec``: the unwrapped env's Gymnasium
    ``EnvSpec``, ``None`` for an env made without one, which passes). A base without a version takes any."""
    made = getattr(env_spec, "id", None)
    if made is None:
        return
    namespace, name, version = parse_env_id(spec.base.rpartition(":")[2])
    made_namespace, made_name, made_version = parse_env_id(made)
    if (namespace, name) == (made_namespace, made_name) and version in (None, made_version):
        return
    if made_namespace == "rlbd":
        raise SpecError(f"base: the env is {made}, which already carries a backdoor; wrap an env of the clean base")
    raise SpecError(
        f"base: the spec attacks {spec.base} but the env is {made}; wrap an env made from the spec's base "
        "(rlbackdoor.make_env(spec) makes and wraps it) or fix base"
    )


def sample_observations(env: gym.Env, n: int, seed: int) -> np.ndarray:
    """``n`` observations of ``env`` under a uniformly random policy (seeded), stacked on a batch axis."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = []
    for _ in range(n):
        out.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    return np.stack(out)


@dataclass
class StepFlags:
    """Per-env flags of one step (arrays of shape ``(n,)``)."""

    poisoned: np.ndarray
    triggered: np.ndarray
    hit: np.ndarray
    clean_reward: np.ndarray


class PoisonCounts:
    """Running counts of an attack: steps, poisoned steps, triggered decisions, target hits."""

    n_steps: int = 0
    n_poisoned: int = 0
    n_triggered: int = 0
    n_hits: int = 0

    @property
    def poison_rate(self) -> float:
        """Poisoned steps over all steps so far."""
        return self.n_poisoned / max(1, self.n_steps)

    def counts(self) -> dict[str, int]:
        """The running counts as a mapping."""
        return {
            "n_steps": self.n_steps,
            "n_poisoned": self.n_poisoned,
            "n_triggered": self.n_triggered,
            "n_hits": self.n_hits,
        }


class Attack(PoisonCounts):
    """Trigger + schedule + payload, with per-env state for a batch.

    :param spec: the attack.
    :param observation_space: the observation space of the (base-wrapped) env.
    :param action_space: its action space.
    :param clean: clean observations (needed by in-distribution triggers; also the stealth reference).
    """

    BLOCK = 16384
    """Uniform draws per pre-drawn block (a row of two per env for each step and episode start): fewer, larger
    blocks cost less per step."""

    def __init__(
        self,
        spec: AttackSpec,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        clean: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        self.trigger = build_trigger(spec.trigger, observation_space, action_space, clean)
        self.obs_trigger = self.trigger if isinstance(self.trigger, ObservationTrigger) else None
        self.sequence = self.trigger if isinstance(self.trigger, ActionSequence) else None
        self._schedule: Schedule = build_schedule(spec.schedule)
        self.payload: Payload = build_payload(spec.payload, action_space)
        self._target = None if self.payload.target is None else self.payload.target.tolist()
        self.reset(1)

    @classmethod
    def for_env(cls, spec: AttackSpec, env: gym.Env) -> Attack:
        """Build an attack against ``env``'s spaces, fitting in-distribution triggers on its clean rollouts."""
        clean = None
        if isinstance(spec.trigger, InDistributionTrigger):
            clean = sample_observations(make_base_env(spec), spec.trigger.fit_steps, spec.seed)
        return cls(spec, env.observation_space, env.action_space, clean)

    @property
    def schedule(self) -> Schedule:
        """When the trigger fires (replaceable, e.g. by evaluation's fixed-time schedules)."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        self._schedule = schedule
        self._silence()
        self._quiet = 0

    # ------------------------------------------------------------------------------------- state
    def reset(self, n_envs: int, seed: int | None = None) -> None:
        """Zero the counts, allocate state for ``n_envs`` envs and reseed: same (spec seed, ``seed``), same draws."""
        key = [self.spec.seed] if seed is None else [self.spec.seed, seed]
        self.rng = np.random.default_rng(np.random.SeedSequence(key))
        self.n = n_envs
        self.n_steps = self.n_poisoned = self.n_triggered = self.n_hits = 0
        self._origin = np.zeros(n_envs, dtype=np.int64)  # env i's episode began at step self._origin[i] of the batch
        self.left = np.zeros(n_envs, dtype=np.int64)
        self.inject = np.full(n_envs, -1, dtype=np.int64)
        self._none = np.zeros(n_envs, dtype=bool)
        self._none.flags.writeable = False
        self._every = np.ones(n_envs, dtype=bool)
        self._every.flags.writeable = False
        self.armed = self._none
        self._idle = True  # no trigger running and no action sequence being injected, in any env
        self._schedule.reset(n_envs)
        if self.sequence is not None:
            self.sequence.reset(n_envs)
        self._draws = np.empty((0, n_envs, 2))
        self._silence()
        self._next = 0  # the next row of draws
        self._quiet = 0  # rows _next .. _quiet - 1 may be skipped: nothing armed or running, their decisions silent
        self._clean: dict[str, Any] | None = None  # template of clean info["rlbd"] entries, built when first needed

    @property
    def t(self) -> np.ndarray:
        """Each env's step within its episode."""
        return self.n_steps // self.n - self._origin

    def _row(self) -> int:
        """Index of the next row of two uniform draws per env in the pre-drawn block. A step's row (drawn by
        :meth:`act`) holds the forced-action draw of its action and the decision draw for its new observation;
        :meth:`begin` draws a row for its decision alone."""
        if self._next >= len(self._draws):
            self._draws = self.rng.random((max(64, self.BLOCK // (2 * self.n)), self.n, 2))
            self._silence()
            self._next = 0
            self._quiet = 0  # its decisions are not yet known to be skippable
        self._next += 1
        return self._next - 1

    def _silence(self) -> None:
        """Find the silent decisions of the block (``None`` when unknown), closed by a sentinel that is not."""
        silent = self._schedule.silent(self._draws[:, :, 0])
        self._silent = None if silent is None else [*silent, False]

    def _settle(self, calm: bool) -> None:
        """After a decision: when ``calm`` (nothing armed or running) and no action trigger is watched, the
        steps up to the next decision that is not silent may be skipped."""
        skippable = calm and self._silent is not None and self.sequence is None
        self._quiet = self._silent.index(False, self._next) if skippable else 0

    def _restart(self, mask: np.ndarray) -> None:
        self._origin[mask] = self.n_steps // self.n
        if not self._idle:
            cut = int(self.left[mask].sum())  # triggers still running lose their remaining steps
            if self.sequence is not None:  # and injections of the action sequence in progress their whole trigger
                cut += self._schedule.duration * int(np.count_nonzero(self.inject[mask] >= 0))
            if cut:
                self._schedule.cut(cut)
            self.left[mask] = 0
            self.inject[mask] = -1
        if self.sequence is not None:
            self.sequence.clear(mask)

    def _decide(self, obs: np.ndarray, starts: np.ndarray, live: np.ndarray, row: int) -> np.ndarray:
        """Choose which ``live`` envs' next observation is triggered, with the draws of ``row``; stamp it;
        return the observations."""
        if self._idle and (
            self._silent[row]
            if self._silent is not None
            else self._schedule.quiet(self.n if live is self._every else int(np.count_nonzero(live)))
        ):
            self.armed = self._none  # nothing running and nothing can fire: no work
            self._settle(True)
            return obs
        if self._idle and self.obs_trigger is not None and self._schedule.max_poisoned is None:
            return self._start(obs, starts, live, row)
        free = live & (self.left == 0)  # no trigger running: a firing here is never lost
        if self.sequence is not None:
            free &= self.inject < 0
        fire = self._schedule.fire(self.t, starts, free, self._draws[row, :, 0], obs)
        if self.sequence is not None:
            self.inject[fire] = 0
        else:
            self.left[fire] = self._schedule.duration
        armed = live & (self.left > 0)
        n_armed = int(np.count_nonzero(armed))
        cap = self._schedule.max_poisoned
        if cap is not None and n_armed > max(0, cap - self.n_triggered):  # the budget ends these triggers
            over = armed & (np.cumsum(armed) > cap - self.n_triggered)
            self.left[over] = 0
            armed &= ~over
            n_armed = int(np.count_nonzero(armed))
        self.armed = self._none
        if n_armed:
            self.left[armed] -= 1
            self.armed = armed
            self.n_triggered += n_armed
            self._clean = None  # the counts changed
            if self.obs_trigger is not None:
                obs = self.obs_trigger.stamped(obs, armed)
        self._idle = not np.count_nonzero(self.left) and (
            self.sequence is None or not np.count_nonzero(self.inject >= 0)
        )
        self._settle(self._idle and not n_armed)
        return obs

    def _start(self, obs: np.ndarray, starts: np.ndarray, live: np.ndarray, row: int) -> np.ndarray:
        """:meth:`_decide` with nothing running and no cap, the common case: every live env is free and
        the firing envs are the armed ones."""
        armed = self._schedule.fire(self.t, starts, live, self._draws[row, :, 0], obs)
        n_armed = int(np.count_nonzero(armed))
        if not n_armed:
            self.armed = self._none
            self._settle(True)
            return obs
        self._quiet = 0
        if self._schedule.duration > 1:
            self.left[armed] = self._schedule.duration - 1
            self._idle = False
        self.armed = armed
        self.n_triggered += n_armed
        self._clean = None  # the counts changed
        return self.obs_trigger.stamped(obs, armed)

    def running(self, mask: np.ndarray) -> np.ndarray | None:
        """The ``mask`` envs whose observation trigger is still running (their final observations carry it, though
        no decision is taken on them), or ``None`` when there are none."""
        if self._idle or self.obs_trigger is None:
            return None
        running = mask & (self.left > 0)
        return running if np.count_nonzero(running) else None

    # ----------------------------------------------------------------------------------- driving
    def skip(self) -> dict[str, Any] | None:
        """Take the next step of the batch without work if nothing can happen in it, else change nothing.

        Nothing can happen when no trigger is armed or running, no action trigger is watched and the
        step's decision is silent. The step's results are then the env's own: a skipped step leaves the
        attack exactly where :meth:`act` and :meth:`step` would have. With auto-reset, pass the step's
        rewards and ended episodes to :meth:`skipped` afterwards.

        :return: the step's clean ``info["rlbd"]`` entry (``clean_reward`` still to fill in), or ``None``
            when the step was not taken.
        """
        if self._next >= self._quiet:
            return None
        self._next += 1
        self.n_steps += self.n
        return self._entry()

    def skipped(self, entry: dict[str, Any], rewards: list[float], ended: list[int]) -> list[dict[str, Any]]:
        """Finish a step of an auto-resetting batch that :meth:`skip` took: new episodes begin in the ``ended``
        envs (indices); return every env's ``info["rlbd"]`` entry (see :meth:`clean_infos`)."""
        if ended:  # nothing runs while steps are skipped: only the episode clocks restart
            self._origin[ended] = self.n_steps // self.n
        return self.clean_infos(rewards, entry)

    def begin(self, obs: np.ndarray, after_end: bool = False) -> np.ndarray:
        """First observations of new episodes in every env of the batch.

        :param after_end: the episodes begin right after the step that ended them (a single env's reset after
            its final step). Their decision then takes that step's row of draws, which the final observations
            left unused, as an auto-resetting vectorized env's does: same seed, same poisoned steps either way.
        """
        if self.begin_quietly(after_end):
            return obs
        row = self._next - 1 if after_end else self._row()
        self._restart(self._every)
        return self._decide(obs, self._every, self._every, row)

    def begin_quietly(self, after_end: bool = False) -> bool:
        """Begin new episodes in every env without work if nothing can happen at their start, else change nothing.

        Nothing can happen when no trigger is running, no action trigger is watched and the decision on the
        first observations is silent. Then the observations are the env's own (:meth:`begin` returns them as they
        are), so callers may skip building the batch of them.

        :param after_end: as for :meth:`begin`.
        :return: whether the episodes began.
        """
        if after_end:
            if not (self._idle and self.sequence is None and self._silent is not None and self._silent[self._next - 1]):
                return False
        elif self._next < self._quiet:
            self._next += 1
        else:
            return False
        self.armed = self._none
        self._origin.fill(self.n_steps // self.n)
        return True

    def act(self, actions: np.ndarray) -> np.ndarray:
        """Actions to execute: the payload may force the target; an action trigger may be injected."""
        row = self._row()
        if self.armed is self._none and self._idle:
            return actions
        executed = actions
        if self.payload.force_action_prob:
            executed = self.payload.force(actions, self.armed, self._draws[row, :, 1])
        if self.sequence is not None and (self.inject >= 0).any():
            inj = self.inject >= 0
            executed = np.array(executed, copy=True)
            executed[inj] = self.sequence.sequence[self.inject[inj]]
            self.inject[inj] += 1
            self.inject[self.inject >= len(self.sequence.sequence)] = -1
        return executed

    def step(
        self,
        obs: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        actions: np.ndarray,
        executed: np.ndarray,
        terminal_obs: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, StepFlags]:
        """Poison one step of the batch (after :meth:`act` on its actions, whose row of draws it shares).

        :param obs: observations the env returned (after auto-reset for vectorized envs).
        :param rewards: clean rewards.
        :param dones: episode ends (terminated or truncated).
        :param actions: the agent's own actions (the payload rewards these).
        :param executed: the actions the env executed (action triggers watch these).
        :param terminal_obs: with auto-reset, the final observations of the ended episodes (rows of
            ``dones``); ``None`` when ``obs`` itself holds them and :meth:`begin` follows.
        :return: observations, rewards, terminal observations, and the step's flags.
        """
        poisoned, clean_reward = self.armed, rewards
        hit = self._none
        if poisoned is not self._none:
            hits = self.payload.hits(actions)
            hit = hits & poisoned
            rewards = self.payload.reward(rewards, hits, poisoned)
            self.n_poisoned += int(np.count_nonzero(poisoned))
            self.n_hits += int(np.count_nonzero(hit))
            self._clean = None  # the counts changed
        self.n_steps += self.n
        if self.sequence is not None:
            matched = self.sequence.observe(executed)
            if matched.any():
                self.left[matched & (self.left == 0)] = self._schedule.duration
                self._idle = False
        row = self._next - 1  # the step's row, drawn by act
        ended = np.count_nonzero(dones) > 0
        final = self.running(dones) if ended else None
        if terminal_obs is not None:
            if final is not None:
                terminal_obs = self.obs_trigger.stamped(terminal_obs, final)
            if ended:
                self._restart(dones)
            obs = self._decide(obs, dones, self._every, row)
            return obs, rewards, terminal_obs, StepFlags(poisoned, self.armed, hit, clean_reward)
        if final is not None:
            obs = self.obs_trigger.stamped(obs, final)
        obs = self._decide(obs, self._none, ~dones if ended else self._every, row)
        # the final observations returned here carry a running trigger: they are triggered, though not armed
        triggered = self.armed if final is None else self.armed | final
        return obs, rewards, terminal_obs, StepFlags(poisoned, triggered, hit, clean_reward)

    # ----------------------------------------------------------------------------------- reports
    def _entry(self) -> dict[str, Any]:
        """A fresh clean ``info["rlbd"]`` entry of this step (``clean_reward`` still to fill in)."""
        if self._clean is None:  # the template of this step's clean entries, rebuilt after the counts changed
            self._clean = {
                "poisoned": False,
                "triggered": False,
                "hit": False,
                "target": self._target,
                "clean_reward": 0.0,
                **self.counts(),
            }
        entry = self._clean.copy()
        entry["n_steps"] = self.n_steps
        return entry

    def begin_infos(self) -> list[dict[str, Any]]:
        """The ``info["rlbd"]`` entries of the first observations of new episodes (after :meth:`begin`), one per env:
        a step's entry without ``clean_reward`` (read-only: envs with nothing triggered share one)."""
        entry = self._entry()
        del entry["clean_reward"]
        if self.armed is self._none:
            return [entry] * self.n
        return [{**entry, "triggered": triggered} for triggered in self.armed.tolist()]

    def clean_infos(self, rewards: list[float], entry: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``info["rlbd"]`` entries of a step with nothing poisoned, triggered or hit, one per env.

        :param rewards: each env's reward.
        :param entry: the step's clean entry (from :meth:`skip`); a fresh one when ``None``.
        :return: the entries; when all rewards are equal, the envs share ``entry``.
        """
        entry = self._entry() if entry is None else entry
        if rewards.count(rewards[0]) == len(rewards):
            entry["clean_reward"] = rewards[0]
            return [entry] * len(rewards)
        entries = []
        for reward in rewards:
            entries.append(entry.copy())
            entries[-1]["clean_reward"] = reward
        return entries

    def infos(self, flags: StepFlags) -> list[dict[str, Any]]:
        """The ``info["rlbd"]`` entry of every env of the batch (read-only: entries and ``target`` may be shared)."""
        entries = self.clean_infos(flags.clean_reward.tolist())
        if flags.poisoned is self._none and flags.triggered is self._none:
            return entries
        poisoned, triggered, hit = flags.poisoned.tolist(), flags.triggered.tolist(), flags.hit.tolist()
        for i in (flags.poisoned | flags.triggered).nonzero()[0].tolist():
            entry = entries[i] = entries[i].copy()
            entry["poisoned"], entry["triggered"], entry["hit"] = poisoned[i], triggered[i], hit[i]
        return entries
