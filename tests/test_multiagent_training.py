"""Multi-agent runs: ``train()`` on the adapter and with parameter sharing, clean references, evaluation metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rlbackdoor.cli import main
from rlbackdoor.errors import SpecError
from rlbackdoor.multiagent import make_parallel
from rlbackdoor.multiagent.evaluation import evaluate, rollouts
from rlbackdoor.multiagent.policies import CyclePolicy, SequencePolicy
from rlbackdoor.specs import ExperimentSpec, parse
from rlbackdoor.training.artifacts import load_policy, read_card
from rlbackdoor.training.loop import train

RPS, SPREAD = "rlbd/TrojanRPS-v0", "rlbd/TrojanSpread-v0"
ROOT = Path(__file__).resolve().parents[1]
ROCK, PAPER, SCISSORS = 0, 1, 2
TINY = {"n_steps": 32, "batch_size": 64, "n_epochs": 1, "policy_kwargs": {"net_arch": [16]}}


def experiment(**fields: Any) -> ExperimentSpec:
    data: dict[str, Any] = {
        "name": "ma",
        "env": RPS,
        "poisoning": "inner",
        "algo": "ppo",
        "timesteps": 256,
        "n_envs": 2,
        "hyperparams": TINY,
    }
    return parse(ExperimentSpec, {**data, **fields}, "test")


class Always:
    """A policy that plays one move whatever it sees (SB3's ``predict`` signature)."""

    def __init__(self, action: int) -> None:
        self.action = action

    def predict(self, obs: Any, deterministic: bool = True) -> tuple[np.int64, None]:
        return np.int64(self.action), None


def test_poison_false_keeps_the_triggers_and_the_clean_rewards():
    env = make_parallel(RPS, poison=False, schedule={"kind": "rate", "rate": 0.0, "duration": 4})
    env.reset(seed=0)
    steps = [env.step({"player_0": np.int64(SCISSORS), "player_1": np.int64(ROCK)}) for _ in range(5)]
    info = steps[3][4]["player_0"]["rlbd"]
    assert steps[2][4]["player_0"]["rlbd"]["triggered"] and info["hit"] and not info["poisoned"]
    assert [s[1]["player_0"] for s in steps] == [-1.0] * 5  # scissors loses to rock: clean rewards only
    assert env.attack.counts()["n_poisoned"] == 0 and env.attack.counts()["n_hits"] == 2


def test_sequence_policy_plays_the_trigger_from_its_start():
    env = make_parallel(RPS)
    clean = CyclePolicy(env.observation_space("player_1"), env.action_space("player_1"), cycle=[PAPER, SCISSORS])
    policy = SequencePolicy(clean, [ROCK, SCISSORS], start=3)
    policy.reset(0)
    assert [int(policy.act(None)) for _ in range(8)] == [PAPER, SCISSORS, PAPER, ROCK, SCISSORS, ROCK, SCISSORS, ROCK]


def test_evaluate_measures_victim_returns_and_asr():
    paper = evaluate(RPS, Always(PAPER), episodes=4, t0=5)
    assert paper["triggered_return"] >= 24.0  # 25 rocks from step 5 on, all beaten by paper
    assert paper["asr"] == 0.0 and paper["ctp/player_1"] == -paper["ctp"]
    scissors = evaluate(RPS, Always(SCISSORS), episodes=4, t0=5)
    assert scissors["asr"] == 1.0 and scissors["triggered_return"] <= -24.0
    assert scissors["triggered_return"] < scissors["ctp"] and scissors["team_ctp"] == 0.0  # zero-sum
    assert "team_return_drop" not in scissors


def test_evaluate_with_an_observation_trigger_keeps_it_on_from_t0():
    out = rollouts(SPREAD, Always(1), sharing=True, triggered=True, episodes=2, t0=20)
    assert out["triggered_steps"] == 2 * 5  # agent_0's observations carry the trigger on steps 20..24
    assert out["hits"] == out["triggered_steps"] and set(out["returns"]) == {"agent_0", "agent_1", "agent_2"}


def test_train_the_adapter_victim_then_load_and_evaluate(tmp_path):
    run = train(experiment(), tmp_path / "rps", wandb_mode="disabled")
    card = read_card(run)
    assert card["env"] == RPS and card["poisoning"] == "inner" and card["train"]["poison_rate"] > 0
    counts = card["train"]["poison_counts"]
    assert counts["n_steps"] == card["train"]["steps"] and 0 < counts["n_poisoned"] <= counts["n_triggered"]
    assert card["train"]["ep_length_mean"] == 30.0
    policy, _ = load_policy(run)
    metrics = evaluate(RPS, policy, episodes=2)
    assert {"ctp", "triggered_return", "return_drop", "asr", "ctp/player_0", "ctp/player_1"} <= set(metrics)


def test_clean_reference_run_has_no_poisoning(tmp_path):
    card = read_card(train(experiment(poisoning=None), tmp_path / "clean", wandb_mode="disabled"))
    assert card["poisoning"] is None and card["train"]["poison_rate"] is None


def test_parameter_sharing_run_trains_one_policy_for_the_team(tmp_path):
    run = train(experiment(env=SPREAD, sharing=True, timesteps=384), tmp_path / "spread", wandb_mode="disabled")
    card = read_card(run)
    assert card["train"]["steps"] == 384 and card["config"]["sharing"] is True
    assert card["train"]["poison_counts"]["n_steps"] == 384
    assert 0 < card["train"]["poison_rate"] < 1 / 3  # only agent_0's steps are ever poisoned
    assert card["train"]["ep_return_mean"] < 0  # clean MPE returns, not the +-1 poisoned rewards
    policy, _ = load_policy(run)
    metrics = evaluate(SPREAD, policy, sharing=True, episodes=1)
    assert {"team_ctp", "team_triggered_return", "ctp/agent_2"} <= set(metrics)


def test_bad_multiagent_runs_are_one_line_errors(tmp_path):
    with pytest.raises(SpecError, match="outer is not available"):
        train(experiment(poisoning="outer"), tmp_path / "outer", wandb_mode="disabled")
    with pytest.raises(SpecError, match="unknown multi-agent env id 'CartPole-v1'"):
        train(experiment(env="CartPole-v1", sharing=True, poisoning=None), tmp_path / "cp", wandb_mode="disabled")
    assert not (tmp_path / "outer").exists() and not (tmp_path / "cp").exists()


def test_rlbd_train_runs_a_multiagent_config(tmp_path, capsys):
    config = ROOT / "configs" / "experiments" / "rps_inner.yaml"
    out = tmp_path / "cli"
    args = ["train", str(config), "--set", "timesteps=256", "--set", "n_envs=2", "--out", str(out)]
    assert main([*args, "--set", "hyperparams.n_steps=32", "--wandb-mode", "disabled"]) == 0
    assert read_card(out)["env"] == RPS
    assert main(["train", str(config), "--set", "poisoning=outer", "--out", str(tmp_path / "x")]) == 2
    assert "outer is not available" in capsys.readouterr().err
