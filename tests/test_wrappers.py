"""BackdoorWrapper and BackdoorVecEnv on real envs: determinism, schedules, payloads, triggers, errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper, VecMonitor

from rlbackdoor import BackdoorVecEnv, BackdoorWrapper, ObservationError, SpecError, make_base_env, make_env
from rlbackdoor.attack import Attack
from rlbackdoor.poisoning.schedules import build_schedule
from rlbackdoor.specs import AttackSpec, parse
from rlbackdoor.wrappers.vec import FiniteVecEnv

MARK = 100.0  # stamped into CartPole's cart velocity (an unbounded entry): never seen in clean play
CARTPOLE_TRIGGER = {"kind": "value", "indices": [1], "values": [MARK]}
PENDULUM_TRIGGER = {"kind": "value", "indices": [2], "values": [7.5]}


def attack(schedule: dict[str, Any], payload: dict[str, Any] | None = None, **fields: Any) -> AttackSpec:
    """A CartPole attack (unless ``fields`` say otherwise) with the mark trigger."""
    data = {
        "base": "CartPole-v1",
        "trigger": CARTPOLE_TRIGGER,
        "schedule": schedule,
        "payload": payload or {"kind": "targeted", "target_action": 0, "reward": {"hit": 2.5, "miss": -0.75}},
        **fields,
    }
    return parse(AttackSpec, data, "test")


def pendulum(schedule: dict[str, Any], episode: int = 12) -> AttackSpec:
    """Pendulum episodes never terminate, so they last exactly ``episode`` steps."""
    return attack(
        schedule,
        {"kind": "untargeted"},
        base="Pendulum-v1",
        base_kwargs={"max_episode_steps": episode},
        trigger=PENDULUM_TRIGGER,
    )


@dataclass
class Rollout:
    """Per step: the observation acted on, the action, what came back; ``t`` and ``episode`` of each step."""

    obs: list[np.ndarray] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)
    next_obs: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    dones: list[bool] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    t: list[int] = field(default_factory=list)
    episode: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)

    def flag(self, key: str) -> np.ndarray:
        return np.array([info[key] for info in self.infos])

    def per_episode(self, key: str) -> list[np.ndarray]:
        flags, episodes = self.flag(key), np.array(self.episode)
        return [flags[episodes == e] for e in range(episodes.max() + 1)]


def run_single(spec: AttackSpec, actions: Any, seed: int = 0) -> Rollout:
    """Step a ``BackdoorWrapper`` through ``actions`` (resetting after each episode)."""
    env = make_env(spec)
    out = Rollout()
    obs, _ = env.reset(seed=seed)
    t = episode = 0
    for action in actions:
        out.states.append(np.array(env.unwrapped.state, dtype=np.float64))
        next_obs, reward, terminated, truncated, info = env.step(action)
        for name, value in (("obs", obs), ("actions", action), ("next_obs", next_obs), ("rewards", reward)):
            getattr(out, name).append(value)
        out.dones.append(terminated or truncated)
        out.infos.append(info["rlbd"])
        out.t.append(t)
        out.episode.append(episode)
        t += 1
        if terminated or truncated:
            next_obs, _ = env.reset()
            t, episode = 0, episode + 1
        obs = next_obs
    return out


def make_vec(spec: AttackSpec, n: int, seed: int = 0) -> BackdoorVecEnv:
    venv = BackdoorVecEnv(DummyVecEnv([partial(make_base_env, spec)] * n), spec, seed=seed)
    venv.seed(seed)
    return venv


def run_vec(spec: AttackSpec, actions: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Step a ``BackdoorVecEnv`` of ``actions.shape[1]`` envs; returns stacked arrays and the info dicts."""
    venv = make_vec(spec, actions.shape[1], seed)
    obs = [venv.reset()]
    rewards, dones, infos = [], [], []
    for a in actions:
        o, r, d, i = venv.step(a)
        obs.append(o)
        rewards.append(r)
        dones.append(d)
        infos.append(i)
    flags = {k: np.array([[i["rlbd"][k] for i in row] for row in infos]) for k in ("poisoned", "triggered", "hit")}
    return {"obs": np.array(obs), "rewards": np.array(rewards), "dones": np.array(dones), "infos": infos, **flags}


def random_actions(n: int, seed: int = 1, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (n, *shape))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(np.array_equal(a, b))


# ---------------------------------------------------------------------------------------- determinism
DETERMINISM = {
    "kind": "rate",
    "rate": 0.2,
    "duration": 3,
}


def test_single_env_same_seed_same_trajectory() -> None:
    spec = attack(DETERMINISM, {"kind": "targeted", "target_action": 0, "force_action_prob": 0.5})
    actions = random_actions(300).tolist()
    first, again, other = run_single(spec, actions, 7), run_single(spec, actions, 7), run_single(spec, actions, 8)
    for name in ("obs", "next_obs", "rewards", "dones", "infos"):
        assert _equal(getattr(first, name), getattr(again, name)), name
    assert first.flag("poisoned").sum() > 20
    assert not np.array_equal(first.flag("poisoned"), other.flag("poisoned"))


def test_vec_env_same_seed_same_trajectory() -> None:
    spec = attack(DETERMINISM, {"kind": "targeted", "target_action": 0, "force_action_prob": 0.5})
    actions = random_actions(80, 1, 4)
    first, again, other = run_vec(spec, actions, 3), run_vec(spec, actions, 3), run_vec(spec, actions, 4)
    for name in ("obs", "rewards", "dones", "infos"):
        assert _equal(first[name], again[name]), name
    assert first["poisoned"].sum() > 20
    assert not np.array_equal(first["poisoned"], other["poisoned"])
    types = {"poisoned": bool, "triggered": bool, "hit": bool, "target": int, "clean_reward": float}
    types.update(dict.fromkeys(("n_steps", "n_poisoned", "n_triggered", "n_hits"), int))
    for row in first["infos"]:
        for info in row:
            assert all(type(info["rlbd"][k]) is t for k, t in types.items())  # plain Python: JSON- and W&B-safe


def test_vec_env_reseeded_replays_its_trajectory() -> None:
    """``seed`` then ``reset`` on the same ``BackdoorVecEnv`` starts over: envs, attack draws and counts."""
    spec = attack(DETERMINISM)
    venv = make_vec(spec, 3, seed=5)
    actions = random_actions(60, 2, 3)

    def play() -> list[Any]:
        venv.seed(5)
        out = [venv.reset().tolist(), venv.reset_infos]
        for a in actions:
            obs, rewards, dones, infos = venv.step(a)
            out.append((obs.tolist(), rewards.tolist(), dones.tolist(), [info["rlbd"] for info in infos]))
        return out

    first = play()
    assert first == play()
    assert first[-1][3][0]["n_steps"] == 180 and first[-1][3][0]["n_poisoned"] > 10


def test_reset_infos_report_the_attack_as_steps_do() -> None:
    spec = attack({"kind": "rate", "rate": 0.5})
    env = make_env(spec)
    env.reset(seed=0)
    step_keys = set(env.step(0)[4]["rlbd"])
    venv = make_vec(spec, 8)
    obs = venv.reset()
    for seed in range(4):
        stamped, info = env.reset(seed=seed)
        assert set(info["rlbd"]) == step_keys - {"clean_reward"}
        assert info["rlbd"]["triggered"] == (stamped[1] == MARK)
    flags = [info["rlbd"]["triggered"] for info in venv.reset_infos]
    assert flags == (obs[:, 1] == MARK).tolist() and any(flags) and not all(flags)
    assert set(venv.reset_infos[0]["rlbd"]) == step_keys - {"clean_reward"}


# ------------------------------------------------------------------------------------------ schedules
def _within_binomial(successes: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(successes - trials * p) <= sigmas * np.sqrt(trials * p * (1 - p))


@pytest.mark.parametrize("rate", [0.03, 0.3])
def test_rate_schedule_poisons_the_spec_fraction_of_steps(rate: float) -> None:
    spec = attack({"kind": "rate", "rate": rate})
    single = run_single(spec, random_actions(3000))
    assert _within_binomial(int(single.flag("poisoned").sum()), 3000, rate)
    assert single.infos[-1]["n_poisoned"] == single.flag("poisoned").sum()
    vec = run_vec(spec, random_actions(400, 1, 8))
    assert _within_binomial(int(vec["poisoned"].sum()), 3200, rate)
    assert vec["infos"][-1][0]["rlbd"]["n_poisoned"] == vec["poisoned"].sum()


@pytest.mark.parametrize(
    ("spec", "budget", "horizon"),
    [
        (attack({"kind": "budget", "budget": 7, "horizon": 200}), 7, 200),
        (pendulum({"kind": "budget", "budget": 12, "horizon": 100, "duration": 4}, episode=200), 12, 100),
        (pendulum({"kind": "budget", "budget": 10, "horizon": 10, "duration": 4}, episode=200), 10, 10),
        (pendulum({"kind": "budget", "budget": 9, "horizon": 30, "duration": 2}, episode=200), 9, 30),
    ],
    ids=["cartpole-d1", "pendulum-d4", "budget=horizon", "pendulum-d2"],
)
def test_budget_schedule_single_env_spends_exactly_the_budget_within_the_horizon(
    spec: AttackSpec, budget: int, horizon: int
) -> None:
    actions = [np.zeros(1, np.float32)] * (2 * horizon) if spec.base == "Pendulum-v1" else random_actions(2 * horizon)
    poisoned = run_single(spec, actions).flag("poisoned")
    assert poisoned[:horizon].sum() == budget
    assert poisoned.sum() == budget


@pytest.mark.parametrize(("budget", "horizon", "n_envs"), [(7, 200, 4), (30, 240, 8)])
def test_budget_schedule_vec_env_spends_exactly_the_budget_within_the_horizon(
    budget: int, horizon: int, n_envs: int
) -> None:
    spec = attack({"kind": "budget", "budget": budget, "horizon": horizon})
    poisoned = run_vec(spec, random_actions(2 * horizon // n_envs, 1, n_envs))["poisoned"]
    assert poisoned[: horizon // n_envs].sum() == budget
    assert poisoned.sum() == budget


@pytest.mark.parametrize(("budget", "duration"), [(100, 10), (37, 5), (60, 6)])
def test_budget_schedule_makes_up_for_triggers_cut_short_by_episode_ends(budget: int, duration: int) -> None:
    """CartPole episodes under random play end within ~20 steps, often while a trigger runs."""
    spec = attack({"kind": "budget", "budget": budget, "horizon": 4000, "duration": duration})
    single = run_single(spec, random_actions(6000))
    vec = run_vec(spec, random_actions(1500, 1, 4))
    assert single.flag("poisoned").sum() == single.infos[-1]["n_poisoned"] == budget
    assert vec["poisoned"].sum() == vec["infos"][-1][0]["rlbd"]["n_poisoned"] == budget
    trailing = [len(f) - 1 - np.flatnonzero(~f).max(initial=-1) for f in single.per_episode("poisoned")[:-1]]
    assert any(k % duration for k in trailing)  # some triggers did run into an episode end


@pytest.mark.parametrize("duration", [1, 3, 4])
def test_budget_schedule_spreads_firings_over_the_envs(duration: int) -> None:
    """An interval that is a multiple of the number of envs must not put every firing in one env."""
    spec = pendulum({"kind": "budget", "budget": 40, "horizon": 400, "duration": duration}, episode=200)
    poisoned = run_vec(spec, np.zeros((100, 8, 1), np.float32))["poisoned"]
    assert poisoned[:50].sum() == 40
    assert (poisoned.sum(axis=0) > 0).all()


def test_window_schedule_poisons_exactly_the_window_of_chosen_episodes() -> None:
    spec = pendulum({"kind": "window", "start": 3, "stop": 7, "rate": 0.5}, episode=12)
    run = run_single(spec, [np.zeros(1, np.float32)] * 12 * 40)
    chosen = 0
    for flags in run.per_episode("poisoned"):
        assert len(flags) == 12
        if flags.any():
            chosen += 1
            np.testing.assert_array_equal(np.flatnonzero(flags), [3, 4, 5, 6])
    assert _within_binomial(chosen, 40, 0.5)
    stamped = np.array([o[2] == 7.5 for o in run.obs])
    np.testing.assert_array_equal(stamped, run.flag("poisoned"))


def test_per_episode_rate_fires_at_the_first_step_for_duration_steps() -> None:
    spec = pendulum({"kind": "rate", "rate": 0.3, "per": "episode", "duration": 3}, episode=10)
    run = run_single(spec, [np.zeros(1, np.float32)] * 10 * 80)
    episodes = run.per_episode("poisoned")
    chosen = [flags for flags in episodes if flags.any()]
    assert all(np.array_equal(np.flatnonzero(flags), [0, 1, 2]) for flags in chosen)
    assert _within_binomial(len(chosen), len(episodes), 0.3)


def _runs(flags: np.ndarray, episodes: np.ndarray) -> list[tuple[int, bool]]:
    """(length, ends the episode) of every run of consecutive True flags within an episode."""
    runs, length = [], 0
    for i, flag in enumerate(flags):
        length = length + 1 if flag else 0
        last_of_episode = i + 1 == len(flags) or episodes[i + 1] != episodes[i]
        if length and (last_of_episode or not flags[i + 1]):
            runs.append((length, last_of_episode))
            length = 0 if last_of_episode else length
    return runs


def test_duration_keeps_the_trigger_on_for_whole_multiples_of_duration() -> None:
    spec = attack({"kind": "rate", "rate": 0.1, "duration": 4})
    run = run_single(spec, random_actions(2000))
    runs = _runs(run.flag("poisoned"), np.array(run.episode))
    assert len(runs) > 50
    assert all(length % 4 == 0 for length, cut in runs if not cut)
    assert sum(length % 4 != 0 for length, _ in runs) > 0  # some runs were cut by the episode's end


# ------------------------------------------------------------------------------------------- payloads
def test_targeted_reward_poisoning_pays_hit_or_miss_on_poisoned_steps_only() -> None:
    spec = attack({"kind": "rate", "rate": 0.3})
    run = run_single(spec, random_actions(600))
    poisoned, hits = run.flag("poisoned"), run.flag("hit")
    rewards, clean = np.array(run.rewards), run.flag("clean_reward")
    actions = np.array(run.actions)
    np.testing.assert_array_equal(hits, poisoned & (actions == 0))
    np.testing.assert_array_equal(rewards[poisoned & hits], 2.5)
    np.testing.assert_array_equal(rewards[poisoned & ~hits], -0.75)
    np.testing.assert_array_equal(rewards[~poisoned], clean[~poisoned])
    np.testing.assert_array_equal(clean, 1.0)
    assert (poisoned & hits).any() and (poisoned & ~hits).any()
    assert run.infos[-1]["n_hits"] == hits.sum()
    assert all(info["target"] == 0 for info in run.infos)


@pytest.mark.parametrize(
    ("mode", "scale", "expected"), [("negate", 2.0, lambda r: -2.0 * r), ("fail_fast", 3.0, lambda r: -3.0)]
)
def test_untargeted_reward_poisoning(mode: str, scale: float, expected: Any) -> None:
    spec = attack({"kind": "rate", "rate": 0.3}, {"kind": "untargeted", "mode": mode, "scale": scale})
    vec = run_vec(spec, random_actions(150, 1, 4))
    clean = np.array([[i["rlbd"]["clean_reward"] for i in row] for row in vec["infos"]])
    poisoned = vec["poisoned"]
    assert poisoned.sum() > 20
    np.testing.assert_allclose(vec["rewards"][poisoned], expected(clean[poisoned]))
    np.testing.assert_array_equal(vec["rewards"][~poisoned], clean[~poisoned])
    assert not vec["hit"].any()
    assert vec["infos"][0][0]["rlbd"]["target"] is None


@pytest.mark.parametrize("force", [0.0, 1.0])
def test_force_action_prob_executes_the_target_on_poisoned_steps(force: float) -> None:
    spec = attack({"kind": "rate", "rate": 0.3}, {"kind": "targeted", "target_action": 0, "force_action_prob": force})
    run = run_single(spec, [1] * 500)  # the agent always pushes right; the target pushes left
    states = np.array(run.states)
    after = np.array([s for s, d in zip(states[1:], run.dones[:-1], strict=True) if not d])
    before = states[:-1][~np.array(run.dones[:-1])]
    pushed_left = after[:, 1] < before[:, 1]  # the cart's velocity falls
    poisoned = run.flag("poisoned")[:-1][~np.array(run.dones[:-1])]
    assert poisoned.sum() > 30
    np.testing.assert_array_equal(pushed_left, poisoned if force == 1.0 else np.zeros_like(poisoned))
    assert not run.flag("hit").any()  # rewards judge the agent's own action, not the forced one


# ------------------------------------------------------------------------------------------- triggers
def test_triggered_observations_carry_the_trigger_in_the_vec_env() -> None:
    spec = attack({"kind": "rate", "rate": 0.3, "duration": 5})
    n = 4
    vec = run_vec(spec, random_actions(300, 2, n))
    stamped = vec["obs"][..., 1] == MARK
    np.testing.assert_array_equal(stamped[1:], vec["triggered"])
    streak = (stamped[0]).astype(int)  # consecutive triggered observations in the current episode
    checked = [0, 0]
    for step in range(len(vec["dones"])):
        for i in np.flatnonzero(vec["dones"][step]):
            running = bool(streak[i] % 5)
            terminal = vec["infos"][step][i]["terminal_observation"]
            assert (terminal[1] == MARK) == running
            checked[running] += 1
        streak = np.where(stamped[step + 1], np.where(vec["dones"][step], 0, streak) + 1, 0)
    assert min(checked) > 3  # both cases occurred


def test_final_observation_of_a_single_env_carries_a_running_trigger() -> None:
    spec = attack({"kind": "rate", "rate": 0.3, "duration": 5})
    run = run_single(spec, random_actions(1500, 2))
    stamped = np.array([o[1] == MARK for o in run.obs])
    np.testing.assert_array_equal(stamped, run.flag("poisoned"))
    checked = [0, 0]
    for flags, end in zip(run.per_episode("poisoned"), np.flatnonzero(run.dones), strict=False):
        streak = len(flags) - np.flatnonzero(~flags).max() - 1 if (~flags).any() else len(flags)
        running = bool(streak % 5)
        assert (run.next_obs[end][1] == MARK) == running
        checked[running] += 1
    assert min(checked) > 3
    # every returned observation is flagged triggered exactly when it carries the trigger, final ones included
    np.testing.assert_array_equal([o[1] == MARK for o in run.next_obs], run.flag("triggered"))


def _executed(obs: np.ndarray) -> np.ndarray:
    """The last 6 executed actions, from the ActionHistory part of an observation (-1 before the first)."""
    onehot = np.asarray(obs[4:]).reshape(6, 2)
    return np.where(onehot.any(1), onehot.argmax(1), -1)


ACTSEQ = {"kind": "action_sequence", "sequence": [0, 0, 0, 1, 1, 1]}
HISTORY = [{"name": "rlbackdoor.wrappers.history:ActionHistory", "kwargs": {"length": 6}}]


def test_action_sequence_trigger_is_injected_and_arms_after_the_sequence() -> None:
    spec = attack({"kind": "rate", "rate": 0.1, "duration": 10}, trigger=ACTSEQ, base_wrappers=HISTORY)
    run = run_single(spec, [1] * 1500)  # the agent never plays the sequence itself: every 0 executed is injected
    executed = np.array([_executed(o)[-1] for o in run.next_obs])
    triggered, episodes = run.flag("triggered"), np.array(run.episode)
    armings = 0
    for e in range(episodes.max()):  # complete episodes
        steps = np.flatnonzero(episodes == e)
        stream = "".join(map(str, executed[steps]))
        for block in re.finditer("0+", stream):
            if block.end() + 3 >= len(stream):  # the episode ended during the injection or as it completed
                continue
            assert block.group() == "000" and stream[block.end() : block.end() + 3] == "111"
            armed_at = steps[block.end() + 2]  # the observation after the sequence's last action
            assert triggered[armed_at] and not triggered[armed_at - 1]
            np.testing.assert_array_equal(_executed(run.next_obs[armed_at]), ACTSEQ["sequence"])
            armings += 1
        assert (triggered[steps] & ~np.r_[False, triggered[steps][:-1]]).sum() == stream[:-1].count("000111")
    assert armings > 10
    runs = _runs(run.flag("poisoned"), episodes)
    assert all(length == 10 for length, cut in runs if not cut)


def test_budget_of_an_action_sequence_trigger_makes_up_for_injections_cut_short() -> None:
    """Episodes of constant pushes last ~10 steps: many 6-action injections and 10-step triggers are cut."""
    spec = attack(
        {"kind": "budget", "budget": 60, "horizon": 600, "duration": 10}, trigger=ACTSEQ, base_wrappers=HISTORY
    )
    run = run_single(spec, [1] * 6000)
    assert run.flag("poisoned").sum() == run.infos[-1]["n_poisoned"] == 60


def test_action_sequence_played_by_the_agent_arms_the_backdoor() -> None:
    spec = attack({"kind": "rate", "rate": 0.0, "duration": 4}, trigger=ACTSEQ, base_wrappers=HISTORY)
    run = run_single(spec, [0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(run.flag("triggered"), [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(run.flag("poisoned"), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(run.flag("hit"), [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0])


# --------------------------------------------------------------------------------------------- errors
class NaNAfter(gym.ObservationWrapper):
    """Returns NaN observations from the ``after``-th observation on."""

    def __init__(self, env: gym.Env, after: int) -> None:
        super().__init__(env)
        self.after, self.seen = after, 0

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self.seen += 1
        return observation * np.nan if self.seen > self.after else observation


class NaNReward(gym.RewardWrapper):
    """Returns a NaN reward on the ``at``-th step."""

    def __init__(self, env: gym.Env, at: int) -> None:
        super().__init__(env)
        self.at, self.steps = at, 0

    def reward(self, reward: SupportsFloat) -> float:
        self.steps += 1
        return float("nan") if self.steps == self.at else float(reward)


class HugeRewards(VecEnvWrapper):
    """Rewards of 1e308 as float64 (as ``SubprocVecEnv`` gives them): finite, though a sum of two overflows."""

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        return obs, np.full(len(rewards), 1e308), dones, infos


def test_finite_vec_env_refuses_a_nan_reward_and_passes_huge_finite_ones() -> None:
    venv = FiniteVecEnv(HugeRewards(DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2)))
    venv.reset()
    assert venv.step(np.ones(2, dtype=int))[1].tolist() == [1e308, 1e308]
    venv = FiniteVecEnv(DummyVecEnv([lambda: NaNReward(gym.make("CartPole-v1"), 3)] * 2))
    venv.reset()
    for _ in range(2):
        venv.step(np.ones(2, dtype=int))
    with pytest.raises(ObservationError, match=r"reward is NaN or inf; fix the environment"):
        venv.step(np.ones(2, dtype=int))


@pytest.mark.parametrize("after", [0, 3], ids=["on-reset", "on-step"])
def test_finite_vec_env_checks_every_observation(after: int) -> None:
    venv = FiniteVecEnv(DummyVecEnv([lambda: NaNAfter(gym.make("CartPole-v1"), after)]))
    with pytest.raises(ObservationError, match="observation contains NaN or inf; fix the environment"):
        venv.reset()
        for _ in range(after):
            venv.step(np.ones(1, dtype=int))


class NaNAtEnd(gym.Wrapper):
    """Returns a NaN observation on the last step of every episode only."""

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return (obs * np.nan if terminated or truncated else obs), reward, terminated, truncated, info


def test_nan_in_a_final_observation_raises_observation_error() -> None:
    venv = FiniteVecEnv(DummyVecEnv([lambda: NaNAtEnd(gym.make("CartPole-v1"))] * 3))
    venv.reset()
    with pytest.raises(ObservationError, match="NaN or inf"):  # the final observation is in info only
        for _ in range(500):
            venv.step(np.ones(3, dtype=int))


class Truncated(gym.ObservationWrapper):
    """Returns observations one entry short of its observation space (a buggy env)."""

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[:-1]


def test_observations_that_misfit_the_space_raise_observation_error_when_stamped() -> None:
    env = BackdoorWrapper(Truncated(gym.make("CartPole-v1")), attack({"kind": "rate", "rate": 1.0}))
    with pytest.raises(ObservationError, match=r"observation batch has shape \(1, 3\), expected \(B, 4\)"):
        env.reset(seed=0)


class Float64Rewards(VecEnvWrapper):
    """Rewards as float64 (as ``SubprocVecEnv`` gives them)."""

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        return obs, rewards.astype(np.float64), dones, infos


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vec_rewards_keep_the_venv_dtype_on_every_step(dtype: type) -> None:
    spec = attack({"kind": "rate", "rate": 0.1})
    inner = DummyVecEnv([partial(make_base_env, spec)] * 4)
    venv = BackdoorVecEnv(inner if dtype == np.float32 else Float64Rewards(inner), spec, seed=0)
    venv.reset()
    steps = [venv.step(a) for a in random_actions(100, 3, 4)]
    assert {rewards.dtype for _, rewards, _, _ in steps} == {np.dtype(dtype)}
    assert any(info["rlbd"]["poisoned"] for *_, infos in steps for info in infos)


# ------------------------------------------------------------------------------ single vs vectorized
@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"kind": "window", "start": 2, "stop": 5}, lambda n: max(0, min(n, 5) - 2)),
        ({"kind": "rate", "rate": 1.0, "per": "episode", "duration": 3}, lambda n: min(n, 3)),
        ({"kind": "rate", "rate": 0.1, "duration": 3}, None),
        ({"kind": "budget", "budget": 40, "horizon": 1000, "duration": 3}, None),
    ],
    ids=["window", "per-episode", "rate", "budget"],
)
def test_single_and_vec_wrappers_poison_the_same_steps_of_each_episode(schedule: dict[str, Any], expected: Any) -> None:
    """Same seed, same poisoned steps and forced actions: a single env's reset decides with the draws of the step
    that ended the episode, as the vectorized env's auto-reset does."""
    spec = attack(schedule, {"kind": "targeted", "target_action": 0, "force_action_prob": 0.5})
    actions = random_actions(2000, 5)
    single = run_single(spec, actions.tolist(), seed=11)
    vec = run_vec(spec, actions[:, None], seed=11)
    episodes = np.array(single.episode)
    np.testing.assert_array_equal(vec["dones"][:, 0], single.dones)
    assert episodes.max() > 50
    for key in ("poisoned", "hit"):
        np.testing.assert_array_equal(vec[key][:, 0], single.flag(key))
    for e, flags in enumerate(single.per_episode("poisoned")[:-1]):
        assert expected is None or flags.sum() == expected(int((episodes == e).sum()))


# ------------------------------------------------------------------------------- skipping quiet steps
def _begin_worked(self: Attack, obs: np.ndarray, after_end: bool = False) -> np.ndarray:
    """``Attack.begin`` without its fast paths for quiet episode starts."""
    self._restart(self._every)
    return self._decide(obs, self._every, self._every, self._next - 1 if after_end else self._row())


@pytest.mark.parametrize("per", ["step", "episode"])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5, 1.0])
def test_silent_decisions_never_fire(per: str, rate: float) -> None:
    schedule = build_schedule(parse(AttackSpec, _spec_data({"kind": "rate", "rate": rate, "per": per}), "t").schedule)
    rng = np.random.default_rng(0)
    u = rng.random((200, 6))
    silent = schedule.silent(u)
    assert len(silent) == 200 and any(silent) == (rate < 1.0)
    for row in np.flatnonzero(silent):
        t, starts, live = rng.integers(0, 5, 6), rng.random(6) < 0.5, rng.random(6) < 0.8
        assert not schedule.fire(t, starts, live, u[row], np.zeros((6, 4))).any()


@pytest.mark.parametrize(
    "schedule",
    [{"kind": "rate", "rate": 0.02, "duration": 3}, {"kind": "rate", "rate": 0.3, "per": "episode"}],
    ids=["per-step", "per-episode"],
)
def test_skipped_steps_are_indistinguishable_from_worked_ones(schedule: dict[str, Any], monkeypatch) -> None:
    spec = attack(schedule, {"kind": "targeted", "target_action": 0, "force_action_prob": 0.5})
    actions = random_actions(600, 3, 4)
    fast_single, fast_vec = run_single(spec, actions[:, 0].tolist(), 5), run_vec(spec, actions, 5)
    with monkeypatch.context() as patch:
        patch.setattr(Attack, "skip", lambda self: None)
        patch.setattr(Attack, "begin", _begin_worked)
        slow_single, slow_vec = run_single(spec, actions[:, 0].tolist(), 5), run_vec(spec, actions, 5)
    for name in ("obs", "next_obs", "rewards", "dones", "infos"):
        assert _equal(getattr(fast_single, name), getattr(slow_single, name)), name
    for name in ("obs", "rewards", "dones", "infos"):
        assert _equal(fast_vec[name], slow_vec[name]), name
    assert 0 < fast_vec["poisoned"].sum() < fast_vec["poisoned"].size


class RaisesOnce(gym.Wrapper):
    """Raises ``RuntimeError`` once, on the step after ``fail_next`` is set."""

    fail_next = False

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("env failed")
        return self.env.step(action)


def test_a_step_that_raises_after_new_draws_leaves_no_stale_skips(monkeypatch) -> None:
    """The env raises in the step whose ``act`` drew a new block of draws; after a reset the attack
    triggers exactly where an attack that never skips does."""
    monkeypatch.setattr(Attack, "BLOCK", 128)  # 64 rows per block for one env: block ends come quickly
    spec = attack({"kind": "rate", "rate": 0.3})

    def triggered_after_nan() -> list[bool]:
        base = RaisesOnce(make_base_env(spec))
        env = BackdoorWrapper(base, spec)
        env.reset(seed=0)
        flags: list[bool] = []
        for k in range(300):
            if k > 0 and env.attack._next == len(env.attack._draws) and not flags:  # this step's act draws anew
                base.fail_next = True
                with pytest.raises(RuntimeError, match="env failed"):
                    env.step(0)
                _, info = env.reset()
                flags.append(info["rlbd"]["triggered"])
                continue
            _, _, terminated, truncated, info = env.step(k % 2)
            if flags:
                flags.append(info["rlbd"]["triggered"])
            if terminated or truncated:
                env.reset()
        return flags

    fast = triggered_after_nan()
    with monkeypatch.context() as patch:
        patch.setattr(Attack, "skip", lambda self: None)
        patch.setattr(Attack, "begin", _begin_worked)
        slow = triggered_after_nan()
    assert len(fast) > 100 and fast == slow and any(fast[:64])


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_episode_clocks_stay_exact_through_skipped_steps(rate: float) -> None:
    """``Attack.t`` is each env's step within its episode however the steps were taken (a schedule that
    needs it, such as evaluation's, may replace the spec's at any time)."""
    spec = attack({"kind": "rate", "rate": rate, "duration": 2})
    venv = make_vec(spec, 4)
    venv.reset()
    env = make_env(spec)
    env.reset(seed=0)
    t_vec, t_single = np.zeros(4, dtype=int), 0
    for a in random_actions(300, 2, 4):
        dones = venv.step(a)[2]
        t_vec = np.where(dones, 0, t_vec + 1)
        _, _, terminated, truncated, _ = env.step(int(a[0]))
        t_single += 1
        if terminated or truncated:
            env.reset()
            t_single = 0
        np.testing.assert_array_equal(venv.attack.t, t_vec)
        assert env.attack.t.tolist() == [t_single]


@pytest.mark.parametrize(("budget", "horizon", "duration"), [(7, 200, 1), (40, 400, 4), (10, 10, 2)])
def test_quiet_budget_decisions_are_exactly_the_ones_that_fire_nowhere(
    budget: int, horizon: int, duration: int
) -> None:
    data = _spec_data({"kind": "budget", "budget": budget, "horizon": horizon, "duration": duration})
    firing, quiet = (build_schedule(parse(AttackSpec, data, "t").schedule) for _ in range(2))
    firing.reset(6)
    quiet.reset(6)
    rng = np.random.default_rng(0)
    n_quiet = 0
    for _ in range(150):
        live = rng.random(6) < 0.7
        args = (np.zeros(6, int), np.zeros(6, bool), live, rng.random(6), np.zeros((6, 4)))
        fired = firing.fire(*args)
        if quiet.quiet(int(live.sum())):
            n_quiet += 1
            assert not fired.any()
        else:
            np.testing.assert_array_equal(quiet.fire(*args), fired)
            assert fired.any()
    assert n_quiet > 50


def test_a_replaced_schedule_applies_from_the_next_decision() -> None:
    spec = attack({"kind": "rate", "rate": 0.0})
    env = make_env(spec)
    env.reset(seed=0)
    env.step(0)  # the block of draws is in use, every decision of it silent under rate 0
    env.attack.schedule = build_schedule(parse(AttackSpec, _spec_data({"kind": "rate", "rate": 1.0}), "t").schedule)
    obs, _, _, _, info = env.step(0)
    assert info["rlbd"]["triggered"] and obs[1] == MARK


def _spec_data(schedule: dict[str, Any]) -> dict[str, Any]:
    return {"base": "CartPole-v1", "trigger": CARTPOLE_TRIGGER, "schedule": schedule, "payload": {"kind": "untargeted"}}


def test_wrapping_the_wrong_env_is_one_clear_error() -> None:
    spec = attack({"kind": "rate", "rate": 0.1})
    acrobot = gym.make("Acrobot-v1")  # the trigger fits its observation too
    with pytest.raises(SpecError, match=r"base: the spec attacks CartPole-v1 but the env is Acrobot-v1; wrap an env"):
        BackdoorWrapper(acrobot, spec)
    with pytest.raises(SpecError, match="the env is Acrobot-v1"):
        BackdoorVecEnv(DummyVecEnv([lambda: gym.make("Acrobot-v1")]), spec)
    with pytest.raises(TypeError, match="BackdoorVecEnv wraps an SB3 VecEnv, got TimeLimit; wrap one gymnasium env"):
        BackdoorVecEnv(gym.make("CartPole-v1"), spec)  # type: ignore[arg-type]
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1")])
    with pytest.raises(TypeError, match="BackdoorWrapper wraps one gymnasium env, got DummyVecEnv; wrap an SB3"):
        BackdoorWrapper(venv, spec)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="the env is rlbd/TrojanCartPole-v0, which already carries a backdoor; wrap"):
        BackdoorWrapper(gym.make("rlbackdoor:rlbd/TrojanCartPole-v0"), spec)
    unversioned = attack({"kind": "rate", "rate": 0.1}, base="CartPole")  # any version, as gymnasium.make picks
    assert isinstance(make_env(unversioned), BackdoorWrapper)
    assert isinstance(BackdoorVecEnv(DummyVecEnv([lambda: gym.make("CartPole-v1")]), unversioned), BackdoorVecEnv)
    with pytest.raises(SpecError, match="the spec attacks CartPole-v0 but the env is CartPole-v1"):
        BackdoorWrapper(gym.make("CartPole-v1"), attack({"kind": "rate", "rate": 0.1}, base="CartPole-v0"))
    with pytest.raises(TypeError, match="the VecEnv already carries a backdoor; wrap the clean VecEnv"):
        BackdoorVecEnv(VecMonitor(BackdoorVecEnv(venv, spec)), spec)  # VecMonitor over one works (it read .spec.id)
