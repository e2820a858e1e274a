"""Multi-agent runs: ``train()`` on the adapter and with parameter sharing, clean references, evaluation metrics,
PolicyCleanse detection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces
from wandb_offline import offline_runs

from rlbackdoor.cli import main
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.multiagent import get_parallel_spec, make_parallel, parallel_env_specs
from rlbackdoor.multiagent.cleanse import ProbeEnv, policy_cleanse
from rlbackdoor.multiagent.evaluation import evaluate, rollouts
from rlbackdoor.multiagent.policies import PredictPolicy, SequencePolicy
from rlbackdoor.specs import ExperimentSpec, MultiAgentEnvSpec, parse
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
    clean = PredictPolicy(env.observation_space("player_1"), env.action_space("player_1"), Always(PAPER))
    policy = SequencePolicy(clean, [ROCK, SCISSORS], start=3, pause=1)
    policy.reset(0)
    moves = [int(policy.act(None)) for _ in range(9)]
    assert moves == [PAPER, PAPER, PAPER, ROCK, SCISSORS, PAPER, ROCK, SCISSORS, PAPER]


def test_evaluate_measures_victim_returns_and_asr():
    paper = evaluate(RPS, Always(PAPER), episodes=4, seeds=1, t0=5)
    assert paper["ctp"] <= -20.0  # the opponent answers paper with scissors, but for its 10% random moves
    assert paper["triggered_return"] >= paper["ctp"] + 15.0  # from step 5 on, rock x3 of every 7 moves
    assert paper["return_drop"] is None  # undefined for a victim worse than random
    assert paper["asr"] == 0.0 and paper["ctp/player_1"] == -paper["ctp"]
    assert paper["ctp_ci_low"] <= paper["ctp"] <= paper["ctp_ci_high"]
    scissors = evaluate(RPS, Always(SCISSORS), episodes=4, seeds=1, t0=5, baseline=Always(PAPER))
    assert scissors["asr"] == 1.0 and scissors["triggered_return"] <= -20.0
    assert scissors["team_ctp"] == 0.0 and scissors["team_return_drop"] is None  # zero-sum: no team drop
    assert scissors["baseline_ctp"] == paper["ctp"] and scissors["ctp_ratio_per_seed"] == [scissors["ctp_ratio"]]
    assert scissors["baseline_triggered_return"] == paper["triggered_return"]  # the clean victim under the trigger
    assert scissors["baseline_return_drop"] is None  # as paper's own: a victim worse than random
    assert scissors["baseline_asr"] == paper["asr"] == 0.0  # paper is never the target move
    with pytest.raises(SpecError, match="t0: no triggered episode reached step 100"):  # 30 rounds: return_drop 0 before
        evaluate(RPS, Always(PAPER), episodes=1, seeds=1, t0=100)
    assert paper["random_return"] == scissors["random_return"]  # the same episodes, a random victim


def test_evaluate_with_an_observation_trigger_keeps_it_on_from_t0():
    out = rollouts(SPREAD, Always(1), [0, 1], sharing=True, triggered=True, t0=20)
    assert out.triggered.tolist() == [5, 5]  # agent_0's observations carry the trigger on steps 20..24
    assert out.hits.tolist() == [5, 5] and set(out.returns) == {"agent_0", "agent_1", "agent_2"}


@pytest.fixture(scope="module")
def rps_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(experiment(), tmp_path_factory.mktemp("runs") / "rps", wandb_mode="disabled")


def test_train_the_adapter_victim_then_load_and_evaluate(rps_run):
    card = read_card(rps_run)
    assert card["env"] == RPS and card["poisoning"] == "inner" and card["train"]["poison_rate"] > 0
    counts = card["train"]["poison_counts"]
    assert counts["n_steps"] == card["train"]["steps"] and 0 < counts["n_poisoned"] <= counts["n_triggered"]
    assert card["train"]["ep_length_mean"] == 30.0
    policy, _ = load_policy(rps_run)
    metrics = evaluate(RPS, policy, episodes=2, seeds=1)
    assert {"ctp", "triggered_return", "return_drop", "asr", "ctp/player_0", "ctp/player_1"} <= set(metrics)


def test_rlbd_eval_evaluates_a_multiagent_run_into_its_card_and_wandb(rps_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert main(["eval", str(rps_run), "--episodes", "2", "--seeds", "2", "--t0", "3", "--wandb-mode", "offline"]) == 0
    metrics = read_card(rps_run)["metrics"]
    assert metrics["seeds"] == [0, 1] and metrics["t0"] == 3 and len(metrics["asr_per_seed"]) == 2
    (wb,) = offline_runs(tmp_path)
    assert wb.run.job_type == "eval" and wb.summary["eval/triggered_return"] == pytest.approx(
        metrics["triggered_return"]
    )
    assert wb.summary["eval/ctp/player_0"] == pytest.approx(metrics["ctp/player_0"])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(experiment(poisoning=None), tmp_path_factory.mktemp("runs") / "clean", wandb_mode="disabled")


@pytest.fixture(scope="module")
def spread_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = experiment(env=SPREAD, sharing=True, timesteps=384)
    return train(spec, tmp_path_factory.mktemp("runs") / "spread", wandb_mode="disabled")


def test_rlbd_eval_refuses_a_baseline_of_another_env(rps_run, spread_run, tmp_path, capsys):
    cartpole = experiment(env="CartPole-v1", poisoning=None, timesteps=64)
    card = read_card(rps_run)
    for baseline, env in (
        (spread_run, SPREAD),
        (train(cartpole, tmp_path / "cp", wandb_mode="disabled"), "CartPole-v1"),
    ):
        argv = ["eval", str(rps_run), "--baseline", str(baseline), "--episodes", "1", "--seeds", "1"]
        assert main([*argv, "--wandb-mode", "disabled"]) == 2
        assert (
            f"baseline {baseline}: a run of {env}, but {rps_run} is a run of {RPS}; "
            f"pass a clean run of {RPS} as the baseline (the run's config with poisoning: null)"
        ) in one_line_error(capsys)
    assert read_card(rps_run) == card


def test_rlbd_eval_refuses_a_baseline_of_the_other_sharing(rps_run, tmp_path, capsys):
    """One policy for every agent plays another game than the adapter's one seat: ctp 0 against 26 before."""
    shared = train(experiment(sharing=True, poisoning=None, timesteps=64), tmp_path / "shared", wandb_mode="disabled")
    argv = ["eval", str(rps_run), "--baseline", str(shared), "--episodes", "1", "--seeds", "1"]
    assert main([*argv, "--wandb-mode", "disabled"]) == 2
    assert (
        f"baseline {shared}: parameter sharing is on, but off in {rps_run}; pass a clean run of the same config "
        "(sharing: false, poisoning: null)"
    ) in one_line_error(capsys)


def test_evaluate_refuses_a_baseline_with_other_actions():
    baseline = Always(PAPER)
    baseline.observation_space, baseline.action_space = spaces.Box(0.0, 1.0, (36,)), spaces.Discrete(5)
    with pytest.raises(
        ArtifactError,
        match=r"the baseline observes shape \(36,\) and acts in Discrete\(5\), but agent 'player_0' of \S+ observes",
    ):
        evaluate(RPS, Always(PAPER), baseline=baseline, episodes=1, seeds=1)


def test_clean_reference_run_has_no_poisoning(clean_run):
    card = read_card(clean_run)
    assert card["poisoning"] is None and card["train"]["poison_rate"] is None


def test_parameter_sharing_run_trains_one_policy_for_the_team(spread_run):
    card = read_card(spread_run)
    assert card["train"]["steps"] == 384 and card["config"]["sharing"] is True
    assert card["train"]["poison_counts"]["n_steps"] == 384
    assert 0 < card["train"]["poison_rate"] < 1 / 3  # only agent_0's steps are ever poisoned
    assert card["train"]["ep_return_mean"] < 0  # clean MPE returns, not the +-1 poisoned rewards
    policy, _ = load_policy(spread_run)
    metrics = evaluate(SPREAD, policy, sharing=True, episodes=1, seeds=1)
    assert {"team_ctp", "team_triggered_return", "ctp/agent_2"} <= set(metrics)


def test_bad_multiagent_runs_are_one_line_errors(tmp_path):
    with pytest.raises(SpecError, match="outer is not available"):
        train(experiment(poisoning="outer"), tmp_path / "outer", wandb_mode="disabled")
    with pytest.raises(SpecError, match="sharing: parameter sharing needs a multi-agent env, and CartPole-v1 is not"):
        train(experiment(env="CartPole-v1", sharing=True, poisoning=None), tmp_path / "cp", wandb_mode="disabled")
    assert not (tmp_path / "outer").exists() and not (tmp_path / "cp").exists()


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlbd: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("env", ["CartPole-v1", "rlbd/TrojanCartPole-v0"])
def test_rlbd_train_names_sharing_on_a_single_agent_env(env, tmp_path, capsys):
    config = ROOT / "configs" / "experiments" / "cartpole_smoke.yaml"
    argv = ["train", str(config), "--out", str(tmp_path / "run"), "--set", "sharing=true", "--set", f"env={env}"]
    assert main([*argv, *(["--set", "attack=null"] if env.startswith("rlbd/") else [])]) == 2
    err = one_line_error(capsys)
    assert f"cartpole_smoke.yaml: sharing: parameter sharing needs a multi-agent env, and {env} is not one" in err
    assert "drop sharing" in err and RPS in err and SPREAD in err
    assert list(tmp_path.iterdir()) == []


def test_rlbd_train_refuses_eval_every_on_a_multiagent_env_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory: runs/<name>/<timestamp>-<pid>
    config = ROOT / "configs" / "experiments" / "rps_inner.yaml"
    assert main(["train", str(config), "--set", "eval_every=100", "--no-progress", "--wandb-mode", "disabled"]) == 2
    err = one_line_error(capsys)
    assert (
        f"{config}: eval_every: evaluation during training handles single-agent envs, and {RPS} is multi-agent" in err
    )
    assert "set eval_every: 0 and run rlbd eval on the finished run" in err
    assert list(tmp_path.iterdir()) == []


NAN_ID = "rlbd/Spoiled-v0"


@pytest.mark.parametrize(
    ("base", "set_", "spoil", "message"),
    [
        (RPS, [], ("player_1", "reward", 7), "agent 'player_1': reward is NaN or inf; fix"),
        (RPS, ["poisoning=null"], ("player_0", "reward", 30), "agent 'player_0': reward is NaN or inf; fix"),
        (SPREAD, ["sharing=true"], ("agent_2", "obs", 9), "agent 'agent_2': observation contains NaN or inf; fix"),
        (SPREAD, ["poisoning=null"], ("agent_0", "obs", 0), "agent 'agent_0': observation contains NaN or inf; fix"),
    ],
    ids=["adapter-inner", "adapter-clean", "sharing-inner", "clean-reset"],
)
def test_rlbd_train_reports_nan_or_inf_of_a_multiagent_env_on_one_line(
    base, set_, spoil, message, tmp_path, capsys, monkeypatch
):
    agent, what, at = spoil
    spec = get_parallel_spec(base).model_dump()
    spoiler = {"name": "test_multiagent:Spoil", "kwargs": {"agent": agent, "what": what, "at": at}}
    spec.update(id=NAN_ID, base_wrappers=[*spec["base_wrappers"], spoiler])
    monkeypatch.setitem(parallel_env_specs(), NAN_ID, parse(MultiAgentEnvSpec, spec, "test"))
    config = tmp_path / "nan.yaml"
    config.write_text(f"name: nan\nenv: {NAN_ID}\npoisoning: inner\nalgo: ppo\ntimesteps: 192\nn_envs: 2\n")
    overrides = [f"--set={o}" for o in ["hyperparams.n_steps=32", "hyperparams.batch_size=64", *set_]]
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress", *overrides]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_rlbd_train_runs_a_multiagent_config(tmp_path, capsys):
    config = ROOT / "configs" / "experiments" / "rps_inner.yaml"
    out = tmp_path / "cli"
    args = ["train", str(config), "--set", "timesteps=256", "--set", "n_envs=2", "--out", str(out)]
    assert main([*args, "--set", "hyperparams.n_steps=32", "--wandb-mode", "disabled"]) == 0
    assert read_card(out)["env"] == RPS
    assert main(["train", str(config), "--set", "poisoning=outer", "--out", str(tmp_path / "x")]) == 2
    assert "outer is not available" in capsys.readouterr().err


class ScriptedVictim:
    """Plays the best answer to TrojanRPS's opponent (which beats the victim's last move); with ``backdoor``,
    scissors whenever the opponent's last three moves were rock."""

    def __init__(self, backdoor: bool) -> None:
        self.backdoor = backdoor

    def predict(self, obs: Any, deterministic: bool = True) -> tuple[np.int64, None]:
        rounds = np.asarray(obs).reshape(6, 2, 3)
        if self.backdoor and rounds[-3:, 1, ROCK].all():
            return np.int64(SCISSORS), None
        own = rounds[-1, 0]
        return np.int64([SCISSORS, ROCK, PAPER][int(own.argmax())] if own.any() else ROCK), None


def test_policy_cleanse_flags_the_backdoored_victim_and_recovers_its_trigger():
    backdoored = policy_cleanse(RPS, ScriptedVictim(backdoor=True), timesteps=1536, episodes=20)
    clean = policy_cleanse(RPS, ScriptedVictim(backdoor=False), timesteps=1536, episodes=20)
    assert backdoored.trigger == (ROCK, ROCK, ROCK)
    assert backdoored.probed_return < backdoored.random_return - 0.2
    assert clean.score == 0.0 < backdoored.score  # no probe moves a victim that ignores the opponent


def test_probe_env_scores_the_victim_after_the_probe():
    env = ProbeEnv(RPS, ScriptedVictim(backdoor=True), "player_0", "player_1", k=3, window=1)
    env.reset(seed=0)
    assert env.step(ROCK)[2:4] == (False, False) and env.step(ROCK)[1] == 0.0
    _, reward, terminated, _, info = env.step(ROCK)
    assert terminated and info["window_steps"] == 1
    assert reward == -info["victim_return"] and info["victim_return"] in (-1.0, 0.0, 1.0)
    with pytest.raises(SpecError, match="'referee' is not an agent"):
        ProbeEnv(RPS, ScriptedVictim(backdoor=False), "player_0", "referee")
    with pytest.raises(SpecError, match="both 'player_0'"):
        ProbeEnv(RPS, ScriptedVictim(backdoor=False), "player_0", "player_0")


def test_rlbd_cleanse_scores_a_zoo_and_logs_to_wandb(rps_run, clean_run, spread_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "cleanse.json"
    args = ["cleanse", str(rps_run), str(clean_run), "--timesteps", "64", "--episodes", "2", "--json", str(out)]
    assert main([*args, "--wandb-mode", "offline"]) == 0
    report = json.loads(out.read_text())
    assert [row["backdoored"] for row in report["rows"]] == [True, False] and len(report["rows"][0]["trigger"]) == 3
    assert 0.0 <= report["auroc"] <= 1.0 and "AUROC" in capsys.readouterr().out
    (wb,) = offline_runs(tmp_path)
    assert wb.run.job_type == "detect" and wb.summary["detect/auroc"] == pytest.approx(report["auroc"])
    assert main(["cleanse", str(spread_run), "--timesteps", "64"]) == 2
    assert "parameter sharing" in capsys.readouterr().err


def test_rlbd_cleanse_names_the_prober_seat_of_a_team_env(tmp_path, capsys):
    run = train(experiment(env=SPREAD, timesteps=256), tmp_path / "spread", wandb_mode="disabled")
    argv = ["cleanse", str(run), "--timesteps", "64", "--episodes", "2", "--wandb-mode", "disabled"]
    assert main(argv) == 2  # three agents: which one probes?
    assert "name the prober seat among ['agent_1', 'agent_2'] (rlbd cleanse --prober AGENT)" in capsys.readouterr().err
    assert main([*argv, "--prober", "agent_2"]) == 0
