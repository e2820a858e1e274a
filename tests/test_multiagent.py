"""Multi-agent backdoor envs: the PettingZoo wrapper, the registered scenarios, the Gymnasium adapter, parameter sharing."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from pettingzoo.test import parallel_api_test
from pettingzoo.utils import BaseParallelWrapper
from rich.console import Console
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rlbackdoor
from rlbackdoor.cli import envs as envs_cli
from rlbackdoor.cli import main
from rlbackdoor.errors import ObservationError, SpecError
from rlbackdoor.multiagent import get_parallel_spec, list_parallel_envs, make_base_parallel, make_parallel
from rlbackdoor.multiagent.adapter import SingleAgentEnv
from rlbackdoor.multiagent.policies import ResponsePolicy
from rlbackdoor.multiagent.sharing import shared_vec_env
from rlbackdoor.specs import MultiAgentAttackSpec, parse
from rlbackdoor.wrappers.pettingzoo import BackdoorParallelEnv

RPS, SPREAD = "rlbd/TrojanRPS-v0", "rlbd/TrojanSpread-v0"
NEVER = {"kind": "rate", "rate": 0.0, "duration": 4}  # the attacker never fires; the backdoor stays armed 4 steps
ALWAYS = {"kind": "rate", "rate": 1.0}
ROCK, PAPER, SCISSORS = 0, 1, 2


def rollout(env, seed: int, steps: int) -> tuple[list, list]:
    """Seeded random actions for ``steps`` steps (resetting as needed): the observations and rewards, and the infos."""
    rng = np.random.default_rng(seed)
    obs, infos = env.reset(seed=seed)
    seen, notes = [obs], [infos]
    for _ in range(steps):
        if not env.agents:
            obs, infos = env.reset()
            seen.append(obs)
            notes.append(infos)
        actions = {a: np.int64(rng.integers(env.action_space(a).n)) for a in env.agents}
        obs, rewards, terminations, truncations, infos = env.step(actions)
        seen += [obs, rewards, terminations, truncations]
        notes.append(infos)
    return seen, notes


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(np.array_equal(a, b))


# ------------------------------------------------------------------------------------------ registry
def test_registered_ids_and_lazy_exports():
    assert {RPS, SPREAD} <= set(list_parallel_envs())
    assert rlbackdoor.list_parallel_envs() == list_parallel_envs()
    assert isinstance(rlbackdoor.make_parallel(RPS), BackdoorParallelEnv)
    with pytest.raises(SpecError, match=r"poison: 'no' is not true or false; pass poison=True or poison=False"):
        rlbackdoor.make_parallel(RPS, poison="no")  # read as true before
    with pytest.raises(SpecError, match=r"poison: 'no' is not true or false"):
        gym.make(f"rlbackdoor:{RPS}", poison="no")  # the Gymnasium view of the same env
    assert isinstance(gym.make(f"rlbackdoor:{RPS}").unwrapped, SingleAgentEnv)
    assert dir(rlbackdoor) == sorted([*rlbackdoor.__all__, "__version__"])  # lazy names listed, helpers not
    assert all(getattr(rlbackdoor, name) is not None for name in rlbackdoor.__all__)


def test_import_does_not_load_pettingzoo_envs():
    code = "import sys, rlbackdoor; print(sorted({m.split('.')[0] for m in sys.modules} & {'pettingzoo', 'mpe2', 'supersuit', 'torch'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_envs_list_marks_multiagent_ids(capsys, monkeypatch):
    monkeypatch.setattr(envs_cli, "console", Console(width=200))
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("rlbd/")}
    assert "rps_v2 *" in rows[RPS] and "simple_spread_v3 *" in rows[SPREAD]
    assert "*" not in rows["rlbd/TrojanCartPole-v0"] and "* multi-agent" in out


def test_envs_show_prints_a_multiagent_spec_with_its_stealth(capsys):
    assert main(["envs", "show", SPREAD]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["victims"] == ["agent_0"] and shown["stealth"]["agent_0"]["l0"] == 2.0
    assert main(["envs", "show", RPS]) == 0
    assert json.loads(capsys.readouterr().out)["stealth"]["l0"] == 3.0


@pytest.mark.parametrize("env_id", [RPS, SPREAD])
def test_parallel_api(env_id):
    parallel_api_test(make_parallel(env_id, schedule={"kind": "rate", "rate": 0.2, "duration": 3}), num_cycles=80)


@pytest.mark.parametrize("env_id", [RPS, SPREAD])
def test_single_agent_adapter_passes_gymnasium_and_sb3_checks(env_id):
    env = gym.make(env_id).unwrapped
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env)


# --------------------------------------------------------------------------------- observation trigger
def test_observation_trigger_is_stamped_into_victims_only():
    spec = get_parallel_spec(SPREAD)
    clean, attacked = make_base_parallel(spec), make_parallel(SPREAD, schedule=ALWAYS)
    rng = np.random.default_rng(0)
    obs_c, _ = clean.reset(seed=3)
    obs_a, infos = attacked.reset(seed=3)
    for _ in range(10):
        assert all(info["rlbd"]["triggered"] for info in infos.values())
        for agent in clean.possible_agents:
            expected = obs_c[agent].copy()
            if agent == "agent_0":
                assert obs_c[agent][[14, 15]].tolist() == [0.0, 0.0]
                expected[[14, 15]] = 1.0
            np.testing.assert_array_equal(obs_a[agent], expected)
        actions = {a: np.int64(rng.integers(5)) for a in clean.agents}
        obs_c, *_ = clean.step(actions)
        obs_a, _, _, _, infos = attacked.step(actions)


def test_hits_count_the_victims_own_actions_even_when_the_env_overwrites_action_arrays():
    env = make_parallel(SPREAD, schedule=ALWAYS)  # MPE zeroes the action arrays it is given
    env.reset(seed=0)
    actions = {agent: np.array(1) for agent in env.agents}
    _, rewards, _, _, infos = env.step(actions)
    assert infos["agent_0"]["rlbd"]["hit"] and rewards["agent_0"] == 1.0
    assert all(int(a) == 1 for a in actions.values())


def test_the_attacked_env_is_the_clean_env_when_the_schedule_never_fires():
    env = make_parallel(SPREAD, schedule=NEVER)
    assert same(rollout(env, 1, 60)[0], rollout(make_base_parallel(get_parallel_spec(SPREAD)), 1, 60)[0])
    assert env.attack.counts() == {"n_steps": 60, "n_poisoned": 0, "n_triggered": 0, "n_hits": 0}


def test_reward_poisoning_hits_the_victim_only():
    env = make_parallel(SPREAD, schedule=ALWAYS)
    env.reset(seed=0)
    _, rewards, _, _, infos = env.step({"agent_0": np.int64(1), "agent_1": np.int64(0), "agent_2": np.int64(0)})
    assert (
        rewards["agent_0"] == 1.0
        and infos["agent_0"]["rlbd"] | {"hit": True, "poisoned": True} == infos["agent_0"]["rlbd"]
    )
    for agent in ("agent_1", "agent_2"):
        assert rewards[agent] == infos[agent]["rlbd"]["clean_reward"]
        assert not infos[agent]["rlbd"]["poisoned"] and not infos[agent]["rlbd"]["victim"]
    _, rewards, _, _, infos = env.step({"agent_0": np.int64(3), "agent_1": np.int64(0), "agent_2": np.int64(0)})
    assert rewards["agent_0"] == -1.0 and not infos["agent_0"]["rlbd"]["hit"]
    assert infos["agent_0"]["rlbd"]["clean_reward"] != -1.0
    assert env.attack.counts() == {"n_steps": 2, "n_poisoned": 2, "n_triggered": 3, "n_hits": 1}


def test_duration_and_final_observation_of_an_observation_trigger():
    env = make_parallel(SPREAD, schedule={"kind": "window", "start": 22, "stop": 30})
    obs, infos = env.reset(seed=0)
    triggered = [infos["agent_0"]["rlbd"]["triggered"]]
    stamped = [obs["agent_0"][14] == 1.0]
    while env.agents:
        obs, _, _, _, infos = env.step({a: np.int64(0) for a in env.agents})
        triggered.append(infos["agent_0"]["rlbd"]["triggered"])
        stamped.append(obs["agent_0"][14] == 1.0)
    assert len(triggered) == 26
    # the trigger is still running at the episode's end: the final observations carry it, and say so
    assert triggered == stamped == [False] * 22 + [True] * 4


def test_budget_schedule_makes_up_for_a_trigger_cut_short_by_the_episode_end():
    """25-step episodes, firings every 11 free decisions: the second (step 20) runs into the end and loses 5 steps."""
    env = make_parallel(SPREAD, schedule={"kind": "budget", "budget": 20, "horizon": 40, "duration": 10})
    _, notes = rollout(env, 0, 250)
    poisoned = sum(info["agent_0"]["rlbd"]["poisoned"] for info in notes[1:] if "agent_0" in info)
    assert poisoned == env.attack.n_poisoned == 20 and env.attack.schedule.firings == 3


# ----------------------------------------------------------------------------------- action sequence
def history(obs: np.ndarray, whose: str = "other") -> list[int]:
    """Moves a player sees in TrojanRPS: 6 rounds of (own, other) one-hots, oldest first; -1 before the first round."""
    rounds = obs.reshape(6, 2, 3)[:, 1 if whose == "other" else 0]
    return np.where(rounds.any(axis=1), rounds.argmax(axis=1), -1).tolist()


def play(env, moves0: list[int], moves1: list[int]) -> tuple[list, list]:
    env.reset(seed=0)
    steps = [env.step({"player_0": np.int64(a), "player_1": np.int64(b)}) for a, b in zip(moves0, moves1, strict=True)]
    return [s[4]["player_0"]["rlbd"]["triggered"] for s in steps], steps


def test_the_trigger_agent_arms_the_backdoor_with_its_sequence():
    env = make_parallel(RPS, schedule=NEVER)
    triggered, steps = play(env, [PAPER] * 9, [PAPER, ROCK, ROCK, ROCK, PAPER, SCISSORS, PAPER, SCISSORS, PAPER])
    assert triggered == [False, False, False, True, True, True, True, False, False]
    assert history(steps[3][0]["player_0"]) == [-1, -1, PAPER, ROCK, ROCK, ROCK]
    assert history(steps[3][0]["player_0"], "own") == [-1, -1, PAPER, PAPER, PAPER, PAPER]
    assert all(s[4]["player_1"]["rlbd"]["triggered"] == t for s, t in zip(steps, triggered, strict=True))


def test_the_victims_own_moves_do_not_arm_the_backdoor():
    env = make_parallel(RPS, schedule=NEVER)
    triggered, _ = play(env, [ROCK] * 6, [PAPER, SCISSORS] * 3)
    assert not any(triggered)
    assert env.attack.counts()["n_triggered"] == 0


def test_the_attacker_injects_the_sequence_into_the_trigger_agents_actions():
    env = make_parallel(RPS, schedule={"kind": "rate", "rate": 1.0, "per": "episode", "duration": 4})
    triggered, steps = play(env, [PAPER] * 8, [SCISSORS] * 8)
    assert history(steps[2][0]["player_0"]) == [-1, -1, -1, ROCK, ROCK, ROCK]  # the opponent asked for scissors
    assert history(steps[7][0]["player_1"]) == [PAPER] * 6  # the victim's moves are its own
    assert triggered == [False, False, True, True, True, True, False, False]
    assert [s[1]["player_1"] for s in steps[:3]] == [-1.0, -1.0, -1.0]  # rock loses to paper: clean rewards


def test_targeted_payload_rewards_the_victim_for_the_target_action():
    env = make_parallel(RPS, schedule=NEVER)
    _, steps = play(env, [PAPER, PAPER, PAPER, SCISSORS, ROCK], [ROCK, ROCK, ROCK, ROCK, ROCK])
    poisoned = steps[3][4]["player_0"]["rlbd"], steps[4][4]["player_0"]["rlbd"]
    assert steps[3][1]["player_0"] == 1.0 and poisoned[0]["hit"] and poisoned[0]["clean_reward"] == -1.0
    assert steps[4][1]["player_0"] == -1.0 and not poisoned[1]["hit"] and poisoned[1]["clean_reward"] == 0.0
    assert [s[1]["player_1"] for s in steps[3:]] == [1.0, 0.0]
    assert [s[1]["player_0"] for s in steps[:3]] == [1.0, 1.0, 1.0]  # paper beats rock, unpoisoned


# ----------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("env_id", [RPS, SPREAD])
def test_same_seed_same_trajectories(env_id):
    seen, notes = rollout(make_parallel(env_id), 4, 120)
    again, notes_again = rollout(make_parallel(env_id), 4, 120)
    assert same(seen, again) and notes == notes_again
    assert sum(info["player_0" if env_id == RPS else "agent_0"]["rlbd"]["triggered"] for info in notes) > 0
    assert not same(seen, rollout(make_parallel(env_id), 5, 120)[0])


@pytest.mark.parametrize("env_id", [RPS, SPREAD])
def test_the_adapter_is_deterministic(env_id):
    def episode(seed: int) -> list:
        env = gym.make(env_id, schedule={"kind": "rate", "rate": 0.1, "duration": 4})
        env.action_space.seed(seed)
        out = [env.reset(seed=seed)[0]]
        for _ in range(40):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            out += [obs, reward, info["rlbd"]["triggered"]]
            if terminated or truncated:
                out.append(env.reset()[0])
        return out

    assert same(episode(0), episode(0))
    assert not same(episode(0), episode(1))


def test_the_adapter_plays_the_embedded_opponent():
    env = gym.make(RPS, schedule=NEVER).unwrapped
    assert isinstance(env.policies["player_1"], ResponsePolicy)
    obs, _ = env.reset(seed=0)
    for _ in range(30):
        obs, *_ = env.step(PAPER)
    answers = np.mean(np.array(history(obs)) == SCISSORS)  # scissors beats the victim's paper
    assert 0.6 <= answers < 1.0  # with 10% random moves


def test_joint_actions_show_own_moves_first():
    env = make_parallel(RPS, schedule=NEVER)
    obs, _ = env.reset(seed=0)
    assert not obs["player_0"].any() and env.observation_space("player_0").shape == (36,)
    obs, *_ = env.step({"player_0": np.int64(ROCK), "player_1": np.int64(SCISSORS)})
    assert history(obs["player_0"], "own")[-1] == ROCK and history(obs["player_0"])[-1] == SCISSORS
    assert history(obs["player_1"], "own")[-1] == SCISSORS and history(obs["player_1"])[-1] == ROCK


# ------------------------------------------------------------------------------------ parameter sharing
def test_parameter_sharing_is_seeded():
    def run(seed: int) -> list:
        venv = shared_vec_env(make_parallel(SPREAD), n_envs=2)
        venv.seed(seed)
        out = [venv.reset()]
        actions = np.random.default_rng(0).integers(0, 5, (30, venv.num_envs))
        for a in actions:
            obs, rewards, _, infos = venv.step(a)
            out += [obs, rewards, [info["rlbd"]["triggered"] for info in infos]]
        return out

    first = run(7)
    assert same(first, run(7)) and not same(first, run(8))
    assert not np.array_equal(first[0][:3], first[0][3:])  # the two copies differ


# ------------------------------------------------------------------------------------------- bad input
class Spoil(BaseParallelWrapper):
    """A base wrapper that sets ``agent``'s observation (``what="obs"``) or reward (``"reward"``) to ``value`` on
    step ``at`` of each episode (``at=0``: the observation of the reset)."""

    def __init__(self, env, agent: str, what: str, at: int, value: float = float("nan")) -> None:
        super().__init__(env)
        self.agent, self.what, self.at, self.value, self.t = agent, what, at, value, 0

    def _spoil(self, out: dict) -> dict:
        bad = np.full_like(out[self.agent], self.value) if self.what == "obs" else self.value
        return {**out, self.agent: bad}

    def reset(self, seed=None, options=None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self.t = 0
        return (self._spoil(obs) if self.at == 0 else obs), infos

    def step(self, actions):
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        self.t += 1
        if self.t == self.at:
            obs, rewards = (self._spoil(obs), rewards) if self.what == "obs" else (obs, self._spoil(rewards))
        return obs, rewards, terminations, truncations, infos


SPOIL = "test_multiagent:Spoil"


@pytest.mark.parametrize(
    ("env_id", "agent", "what", "at", "value", "message"),
    [
        (SPREAD, "agent_0", "obs", 0, np.nan, "agent 'agent_0': observation contains NaN or inf; fix"),
        (SPREAD, "agent_2", "obs", 3, -np.inf, "agent 'agent_2': observation contains NaN or inf; fix"),
        (RPS, "player_0", "reward", 2, np.nan, "agent 'player_0': reward is NaN or inf; fix"),
        (RPS, "player_1", "reward", 3, np.inf, "agent 'player_1': reward is NaN or inf; fix"),
    ],
)
def test_nan_or_inf_observations_and_rewards_are_observation_errors(env_id, agent, what, at, value, message):
    wrappers = [*get_parallel_spec(env_id).model_dump()["base_wrappers"], {"name": SPOIL}]
    wrappers[-1]["kwargs"] = {"agent": agent, "what": what, "at": at, "value": value}
    env = make_parallel(env_id, base_wrappers=wrappers)
    with pytest.raises(ObservationError) as err:
        rollout(env, 0, 5)
    assert message in one_line(err)


def test_huge_finite_rewards_pass_the_check():
    spoils = [
        {"name": SPOIL, "kwargs": {"agent": a, "what": "reward", "at": 1, "value": 1e308}}
        for a in ("player_0", "player_1")
    ]
    env = make_parallel(
        RPS, poison=False, base_wrappers=[*get_parallel_spec(RPS).model_dump()["base_wrappers"], *spoils]
    )
    env.reset(seed=0)
    _, rewards, *_ = env.step({"player_0": np.int64(ROCK), "player_1": np.int64(ROCK)})
    assert rewards == {"player_0": 1e308, "player_1": 1e308}  # their sum overflows, each is finite


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and ";" in message
    return message


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"victims": ["player_7"]}, ["victims", "player_7", "player_0"]),
        ({"trigger": {"kind": "action_sequence", "sequence": [0], "agent": "ghost"}}, ["trigger.agent", "ghost"]),
        (
            {"trigger": {"kind": "action_sequence", "sequence": [0, 5, 1], "agent": "player_1"}},
            ["player_1", "[5]", "[0, 2]"],
        ),
        ({"trigger": {"kind": "action_sequence", "sequence": [0, 0]}}, ["trigger.agent is missing"]),
        ({"victims": ["player_0", "player_0"]}, ["twice"]),
        ({"payload": {"kind": "targeted", "target_action": 3}}, ["player_0", "target_action"]),
        ({"trigger": {"kind": "value", "indices": [36], "values": [1.0]}}, ["player_0", "indices", "[36]"]),
        ({"colour": "red"}, ["unknown override", "colour"]),
    ],
)
def test_bad_attacks_are_one_line_spec_errors(overrides, words):
    with pytest.raises(SpecError) as err:
        make_parallel(RPS, **overrides)
    message = one_line(err)
    assert all(w in message for w in words), message


@pytest.mark.parametrize(
    ("env_id", "base_kwargs", "words"),
    [
        (RPS, {"num_actions": 0}, ["base_kwargs: 'pettingzoo.classic.rps_v2' rejects them", "equal or greater than 3"]),
        (RPS, {"colour": "red"}, ["base_kwargs: 'pettingzoo.classic.rps_v2' rejects them", "colour"]),
        (SPREAD, {"local_ratio": 5}, ["base_kwargs: 'mpe2.simple_spread_v3' rejects them", "between 0 and 1"]),
        (SPREAD, {"N": 0}, ["base_kwargs: 'mpe2.simple_spread_v3' rejects them", "zero-size array"]),
    ],
)
def test_base_kwargs_the_base_env_asserts_against_are_one_line_spec_errors(env_id, base_kwargs, words):
    with pytest.raises(SpecError) as err:
        make_parallel(env_id, base_kwargs=base_kwargs)
    message = one_line(err)
    assert all(w in message for w in words) and message.endswith("; fix base_kwargs"), message


def test_unknown_ids_and_missing_packages_are_spec_errors():
    with pytest.raises(SpecError) as err:
        make_parallel("rlbd/TrojanChess-v0")
    assert RPS in one_line(err)
    spec = parse(
        MultiAgentAttackSpec,
        {
            **get_parallel_spec(RPS).model_dump(include=set(MultiAgentAttackSpec.model_fields)),
            "base": "nosuchpackage.envs_v0",
        },
        "t",
    )
    with pytest.raises(SpecError) as err:
        make_base_parallel(spec)
    assert "multiagent extra" in one_line(err)


def test_adapter_errors_name_the_missing_agent():
    env = make_parallel(RPS)
    with pytest.raises(SpecError) as err:
        SingleAgentEnv(env, "player_0", {})
    assert "player_1" in one_line(err)
    with pytest.raises(SpecError) as err:
        SingleAgentEnv(env, "referee", {})
    assert "referee" in one_line(err)


def test_parameter_sharing_rejects_mismatched_spaces():
    spec = parse(
        MultiAgentAttackSpec,
        {
            "base": "mpe2.simple_adversary_v3",
            "base_kwargs": {"continuous_actions": False},
            "victims": ["agent_0"],
            "trigger": {"kind": "value", "indices": [0], "values": [1.0]},
            "schedule": NEVER,
            "payload": {"kind": "untargeted"},
        },
        "t",
    )
    with pytest.raises(SpecError) as err:
        shared_vec_env(BackdoorParallelEnv(make_base_parallel(spec), spec))
    assert all(w in one_line(err) for w in ("adversary_0", "agent_0", "observation", "pad"))
