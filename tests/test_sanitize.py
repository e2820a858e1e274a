"""Run-time sanitization scored with the evaluation metrics, and ``rlbd sanitize``."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from wandb_offline import offline_runs

import rlbackdoor
from rlbackdoor.cli import main
from rlbackdoor.defenses.sanitize import clean_transitions, sanitize_agent, tracked_metrics
from rlbackdoor.defenses.support import SupportSanitizer, TrackingPolicy, TransitionModel
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import ExperimentSpec
from rlbackdoor.trajectories import Trajectories, collect

CARD = {"env": "rlbd/TrojanCartPole-v0", "attack": None}


class Backdoored:
    """A stabilising linear controller for CartPole, except the target 0 whenever the angular velocity
    reads > 2 (the trigger is 2.5)."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        obs = np.asarray(obs, dtype=np.float64)
        b = obs.reshape(-1, 4)
        push = (0.5 * b[:, 0] + 1.0 * b[:, 1] + 15 * b[:, 2] + 2.5 * b[:, 3] > 0).astype(np.int64)
        actions = np.where(b[:, 3] > 2, 0, push)
        return (actions if obs.ndim == 2 else actions[0]), state


class Lean:
    """Pushes toward the pole's angle only: a weak clean policy, the baseline of ``ctp_ratio``."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        return (np.asarray(obs).reshape(-1, 4)[:, 2] > 0).astype(np.int64), state


def test_impute_sanitizer_forgets_the_trigger_value(tmp_path: Path):
    result = sanitize_agent(Backdoored(), CARD, "impute", n_clean=200, episodes=3, seeds=2)
    assert result["asr_after"] < 0.5 * result["asr_before"]


def test_support_sanitizer_removes_a_value_backdoor_and_keeps_the_task():
    result = sanitize_agent(Backdoored(), CARD, "support", n_clean=200, episodes=3, seeds=2, curve=[10, 50])
    assert result["asr_before"] == 1.0
    assert result["asr_after"] == 0.0
    assert result["ctp_after"] >= 0.99 * result["ctp_before"]
    assert result["ctp_after_ci_low"] <= result["ctp_after"] <= result["ctp_after_ci_high"]
    assert [p["n_clean"] for p in result["curve"]] == [10, 50, 200]
    assert all(p["asr_after"] <= 0.05 for p in result["curve"])  # the target, from n = 10 on


def test_tracking_restores_the_overwritten_feature_from_the_dynamics():
    """The trigger overwrites the angular velocity, which the last observation and action predict: the
    tracked agent acts as on the true state, where a single-observation repair can only guess."""
    result = sanitize_agent(Backdoored(), CARD, "track", n_clean=20, episodes=3, seeds=1, baseline=Lean())
    assert result["asr_before"] == 1.0 and result["asr_after"] <= 0.02
    assert result["ctp_after"] == result["ctp_before"] == 500.0
    assert result["ctp_ratio_after"] == result["ctp_ratio_before"]  # paired: the same random returns and resamples
    with pytest.raises(SpecError, match="no attack"):
        tracked_metrics(TrackingPolicy(Backdoored(), None, None), {"env": "CartPole-v1", "attack": None})


def test_tracking_replaces_features_that_contradict_the_dynamics():
    """A flagged observation after an unrepaired one: a feature off its prediction by far more than the
    clean model errs is replaced even where it looks plausible alone; after a repair, only the suspect ones."""
    data = collect(gym.make("CartPole-v1"), Backdoored(), 1000, 0)
    keep = ~data.dones[:-1].astype(bool)
    model = TransitionModel(2).fit(data.observations[:-1][keep], data.actions[:-1][keep], data.observations[1:][keep])
    assert (model.spread < 1e-3).all()  # CartPole's Euler step is nearly linear at small angles
    sanitizer = SupportSanitizer(repair="impute").fit(data.observations[:200])
    tracker = TrackingPolicy(Backdoored(), sanitizer, model)
    (s0, s1, s2), (a0, a1) = data.observations[10:13], data.actions[10:12]
    tampered = [s + np.array([4.0, 0.05, 0.0, 0.0], dtype=np.float32) for s in (s1, s2)]  # x off the box, v not
    assert not sanitizer.suspect(tampered[0][None].astype(np.float64))[0, 1]
    tracker.reset()
    np.testing.assert_array_equal(tracker.sanitize(s0), s0)
    tracker.observe(s0, a0)
    np.testing.assert_allclose(tracker.sanitize(tampered[0]), s1, atol=1e-3)
    tracker.observe(s1, a1)
    after_repair = tracker.sanitize(tampered[1])
    np.testing.assert_allclose(after_repair[[0, 2, 3]], s2[[0, 2, 3]], atol=1e-3)
    assert after_repair[1] == tampered[1][1]


def test_clean_rollouts_of_a_sampling_agent_are_reproducible(smoke_run: Path):
    policy, card = rlbackdoor.load_policy(smoke_run)
    first = clean_transitions(policy, card, 50, min_steps=200)
    torch.rand(1)  # whatever else draws from torch in between
    for part, again in zip(first, clean_transitions(policy, card, 50, min_steps=200), strict=True):
        np.testing.assert_array_equal(part, again)
    assert not np.array_equal(first[0], clean_transitions(policy, card, 50, seed=1, min_steps=200)[0])


def test_subspace_cannot_help_on_full_rank_observations():
    """CartPole's 4 numbers span R^4: the full basis is the identity (the backdoor stays); a smaller one
    drops a direction the task needs (the clean return collapses)."""
    full = sanitize_agent(Backdoored(), CARD, "subspace", n_clean=100, dim=4, episodes=2, seeds=1)
    assert full["asr_after"] == full["asr_before"] == 1.0 and full["ctp_after"] == full["ctp_before"]
    auto = sanitize_agent(Backdoored(), CARD, "subspace", n_clean=100, episodes=2, seeds=1)
    assert auto["dim"] < 4 and auto["ctp_after"] < 0.5 * auto["ctp_before"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = rlbackdoor.specs.load(ExperimentSpec, Path("configs/experiments/cartpole_smoke.yaml"))
    return rlbackdoor.train(spec, tmp_path_factory.mktemp("runs") / "smoke", wandb_mode="offline")


def test_cli_reports_before_and_after_as_json(smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "reports" / "s.json"  # missing folders are created
    code = main(
        ["sanitize", str(smoke_run), "--method", "support", "--n-clean", "40", "--curve", "20",
         "--episodes", "2", "--seeds", "1", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    for key in ("asr_before", "asr_after", "ctp_before", "ctp_after", "n_clean", "dim"):
        assert key in data
    assert data["n_clean"] == 40 and len(data["curve"]) == 2
    (wb,) = offline_runs(tmp_path / "wandb")  # grouped with the run's experiment, its card attached
    assert wb.run.run_group == "cartpole_smoke" and wb.run.job_type == "sanitize"
    assert wb.run.display_name == f"cartpole_smoke-sanitize-support-{smoke_run.name}"  # one name per method
    assert wb.config["sanitizer"]["method"] == "support" and wb.config["attack"]["trigger"]["kind"] == "value"
    assert "sanitize" in wb.config and wb.config["hyperparams"]["n_steps"] == 64  # the run's own, from its card
    assert "card" in [a.type for a in wb.artifacts] and wb.summary["sanitize/asr_before"] == data["asr_before"]
    assert main(["sanitize", "--list"]) == 0


def test_cli_filters_a_trajectory_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    path = collect(gym.make("rlbd/TrojanCartPole-v0"), None, 3000, 1, "rlbd/TrojanCartPole-v0").save(tmp_path / "t.npz")
    out = tmp_path / "clean.npz"
    wide = ["sanitize", "--trajectories", str(path), "--n-clean", "300", "--json", str(tmp_path / "wide.json")]
    assert main([*wide, "--out", str(tmp_path / "wide.npz"), "--wandb-mode", "disabled"]) == 0
    wide_report = json.loads((tmp_path / "wide.json").read_text())  # training's margin: nothing clean dropped
    assert wide_report["precision"] == 1.0 and wide_report["recall"] < 0.9  # a trigger near random play's range
    assert (wide_report["margin"], wide_report["n_clean"]) == (5.0, 300)  # training's default, recorded
    # random-policy data lies inside the clean fit's own range: a narrower threshold catches the trigger too
    assert main(["sanitize", "--trajectories", str(path), "--n-clean", "300", "--out", str(out), "--margin", "2",
                 "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    kept = Trajectories.load(out)
    assert report["precision"] == 1.0 and report["recall"] >= 0.9 and len(kept) == 3000 - report["flagged"]
    assert report["margin"] == 2.0
    reward = ["sanitize", "--trajectories", str(path), "--method", "reward", "--dim", "2", "--wandb-mode", "disabled"]
    assert main(reward) == 2 and "--dim applies to the subspace method only" in capsys.readouterr().err
    assert kept.poisoned.sum() <= report["poisoned"] * 0.1
    (wb,) = offline_runs(tmp_path / "wandb")  # one W&B run, grouped by the dataset's env
    assert wb.run.job_type == "sanitize" and wb.run.run_group == "rlbd/TrojanCartPole-v0"
    assert wb.config["sanitizer"]["mode"] == "drop" and wb.summary["sanitize/flagged"] == report["flagged"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sanitize"], "give a RUN_DIR"),
        (["sanitize", "--trajectories", "missing.npz"], "missing.npz: no such file; check the path"),
        (["sanitize", "nowhere", "--method", "support"], "nowhere"),
        (["sanitize", "nowhere", "--curve", "-3,0"], "--curve '-3,0' is not a comma-separated list of integers in 1"),
        (["sanitize", "nowhere", "--curve", "8,1000001"], "list of integers in 1..1000000; e.g. 8,16,32"),
        (["sanitize", "nowhere", "--curve", "9" * 5000], "list of integers in 1..1000000; e.g. 8,16,32"),
        (["sanitize", "nowhere", "--n-clean", "10" * 10], "'--n-clean': Input should be less than or equal to 1000000"),
        (["sanitize", "nowhere", "--episodes", "10001"], "'--episodes': Input should be less than or equal to 10000"),
        (["sanitize", "nowhere", "--seeds", "1001"], "'--seeds': Input should be less than or equal to 1000"),
        (["sanitize", "nowhere", "--mode", "repair"], "sanitize: --mode applies to --trajectories only; drop --mode"),
        (["sanitize", "nowhere", "--out", "x.npz"], "sanitize: --out applies to --trajectories only; drop --out"),
        (["sanitize", "nowhere", "--margin", "2"], "sanitize: --margin applies to --trajectories only; drop --margin"),
        (
            ["sanitize", "--trajectories", "t.npz", "--margin", "0.5"],
            "Invalid value for '--margin': Input should be greater than or equal to 1",
        ),
        (["sanitize", "run", "--trajectories", "t.npz"], "sanitize: RUN_DIR applies to a run, not to --trajectories"),
        (["sanitize", "--trajectories", "t.npz", "--curve", "8"], "--curve applies to a run, not to --trajectories"),
        (["sanitize", "--trajectories", "t.npz", "--baseline", "b"], "--baseline applies to a run, not to"),
        (["sanitize", "--trajectories", "t.npz", "--episodes", "10"], "--episodes applies to a run, not to"),
        (["sanitize", "--trajectories", "t.npz", "--seeds", "3"], "--seeds applies to a run, not to"),
        (["sanitize", "nowhere", "--dim", "-1"], "--dim"),
        (["sanitize", "nowhere", "--episodes", "0"], "--episodes"),
        (["sanitize", "nowhere", "--seeds", "0"], "--seeds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_bad_method_n_and_foreign_trajectories(smoke_run: Path, tmp_path: Path, capsys):
    assert main(["sanitize", str(smoke_run), "--method", "nope"]) == 2
    assert "use one of subspace, support, impute" in capsys.readouterr().err
    for n in ("1", "5"):  # n = 1 advised 2, and n = 2 then advised 6: the least a fit on 4 features takes
        assert main(["sanitize", str(smoke_run), "--n-clean", n, "--curve", "20", "--wandb-mode", "disabled"]) == 2
        assert f"n_clean={n} is too few for support on 4 features; use n >= 6" in capsys.readouterr().err
    for extra, message in (
        (
            ["--method", "subspace", "--dim", "4", "--n-clean", "4"],
            "n_clean=4 is too few for subspace on 4 features; use n",
        ),
        (
            ["--method", "subspace", "--dim", "10"],
            "dim 10 is larger than the 4 features of an observation; use dim <= 4",
        ),
    ):
        assert main(["sanitize", str(smoke_run), *extra, "--wandb-mode", "disabled"]) == 2
        assert message in capsys.readouterr().err
    lava = collect(gym.make("CartPole-v1"), None, 50, 0, "rlbd/TrojanLavaGap-v0").save(tmp_path / "x.npz")
    assert main(["sanitize", "--trajectories", str(lava)]) == 2
    assert "do not come from rlbd/TrojanLavaGap-v0" in capsys.readouterr().err
    data = collect(gym.make("rlbd/TrojanLavaGap-v0"), None, 50, 0, "rlbd/TrojanLavaGap-v0").save(tmp_path / "y.npz")
    assert main(["sanitize", "--trajectories", str(data), "--method", "subspace", "--n-clean", "20"]) == 2
    assert "use n >=" in capsys.readouterr().err


def test_trajectory_actions_outside_the_action_space_are_refused(tmp_path: Path, capsys):
    data = collect(gym.make("rlbd/TrojanCartPole-v0"), None, 50, 0, "rlbd/TrojanCartPole-v0")
    data.actions[3] = 7
    path = data.save(tmp_path / "t.npz")
    out = tmp_path / "clean.npz"
    assert main(["sanitize", "--trajectories", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "action 7 of transition 3 is not in rlbd/TrojanCartPole-v0's Discrete(2)" in err[0]
    assert not out.exists()


def test_bad_output_paths_exit_2_before_any_work(smoke_run: Path, tmp_path: Path, capsys):
    data = collect(gym.make("rlbd/TrojanCartPole-v0"), None, 50, 0, "rlbd/TrojanCartPole-v0").save(tmp_path / "t.npz")
    under = data / "r.json"
    for argv, message in [
        (["sanitize", str(smoke_run), "--json", str(tmp_path)], f"--json {tmp_path}: is a folder; name a file"),
        (["sanitize", str(smoke_run), "--json", str(under)], f"--json {under}: {data} is a file, not a folder"),
        (["sanitize", "--trajectories", str(data), "--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
        (["sanitize", "--trajectories", str(data), "--out", str(under)], f"--out {under}: {data} is a file"),
    ]:
        assert main([*argv, "--wandb-mode", "disabled"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


def test_multiagent_runs_and_datasets_point_to_rlbd_cleanse(tmp_path: Path, capsys):
    spec = rlbackdoor.specs.load_experiment(
        Path("configs/experiments/rps_inner.yaml"),
        ["timesteps=128", "n_envs=2", "hyperparams.n_steps=64", "hyperparams.batch_size=64"],
    )
    run = rlbackdoor.train(spec, tmp_path / "rps", wandb_mode="disabled")
    data = collect(gym.make("CartPole-v1"), None, 50, 0, "rlbd/TrojanRPS-v0").save(tmp_path / "rps.npz")
    hint = "rlbd/TrojanRPS-v0 is a multi-agent env id and rlbd sanitize handles single-agent envs; "
    fixes = ["for multi-agent runs use rlbd cleanse", "filter steps of a single-agent env"]
    for argv, where, fix in [
        (["sanitize", str(run), "--wandb-mode", "disabled"], run, fixes[0]),
        (["sanitize", "--trajectories", str(data)], data, fixes[1]),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{where}: {hint}{fix}" in err[0]


@pytest.mark.parametrize("poisoning", ["inner", "outer"])
def test_training_under_sanitization_reports_its_filter(poisoning: str, tmp_path: Path):
    """Both loops filter the rollout buffer; the poisoned rewards (+-5 for CartPole's 1, or SleeperNets'
    return-relative ones) mark every tampered step, SleeperNets' compensated step before each included."""
    config = Path("configs/experiments/cartpole_smoke.yaml")
    argv = ["train", str(config), "--sanitize", "impute", "--set", f"poisoning={poisoning}", "--out", str(tmp_path / "r"),
            "--set", "attack.payload.reward.hit=5", "--set", "attack.payload.reward.miss=-5",
            "--wandb-mode", "disabled", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    card = json.loads((tmp_path / "r" / "card.json").read_text())
    assert card["config"]["sanitize"]["method"] == "impute"
    train = card["train"]
    assert train["sanitize_rollout_n"] == card["timesteps"]
    poisoned, tampered = train["poison_counts"]["n_poisoned"], train["sanitize_rollout_poisoned"]
    if poisoning == "inner":
        assert tampered == poisoned > 0
    else:  # each poisoned step and the step before it, unless the poisoned one starts an episode
        assert poisoned < tampered <= 2 * poisoned
    assert train["sanitize_rollout_recall"] == 1.0 and train["sanitize_rollout_precision"] >= 0.9


def test_sanitize_config_errors_are_one_line(capsys):
    argv = ["train", "configs/experiments/cartpole_smoke.yaml", "--sanitize", "magic", "--wandb-mode", "disabled"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'--sanitize': Value error, 'magic' is not one of 'support', 'impute'" in err[0]
