"""Detectors on real (tiny) zoos built by ``rlbd zoo``; ``rlbd detect`` output, W&B run and bad inputs."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from gymnasium import spaces
from wandb_offline import offline_runs

from rlbackdoor.cli import main
from rlbackdoor.defenses.detectors import (
    DETECTORS,
    analyse,
    clean_observations,
    detect,
    get_detector,
    population_scores,
    zoo_metrics,
)
from rlbackdoor.defenses.neurons import ActivationBands
from rlbackdoor.defenses.probing import BlackBoxProbe
from rlbackdoor.errors import ObservationError, SpecError
from rlbackdoor.specs import load_experiment
from rlbackdoor.training.artifacts import load_policy, read_card, write_json
from rlbackdoor.training.loop import train
from rlbackdoor.zoo import ZooAgent, read_manifest, write_manifest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ZOO = {
    "name": "tinyzoo",
    "agents": 4,
    "seed": 5,
    "env": "CartPole-v1",
    "algo": "ppo",
    "timesteps": 2048,
    "n_envs": 4,
    "hyperparams": {"n_steps": 64, "batch_size": 128, "n_epochs": 2, "policy_kwargs": {"net_arch": [32, 32]}},
    "poisoning": "inner",
    "attack": {
        "trigger": {"kind": "value", "indices": [3], "values": [3.0]},
        "schedule": {"kind": "rate", "rate": 0.1},
        "payload": {"kind": "targeted", "target_action": 0},
    },
}
FAST = {"reverse": {"restarts": 8, "steps": 40}, "probe": {"n_values": 61}}
"""Smaller searches for the default suite (the benchmark runs the defaults)."""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-agent CartPole zoo (2 clean, 2 backdoored on 10% of steps) trained by ``rlbd zoo``."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zoo")
    config = root / "zoo.yaml"
    config.write_text(yaml.safe_dump(ZOO))
    assert main(["zoo", str(config), "--out", str(root / "zoo"), "--workers", "2", "--wandb-mode", "disabled"]) == 0
    return root / "zoo"


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "wandb-dir"
    path.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return path


def backdoored_agent(zoo: Path) -> Path:
    return next(a.path for a in read_manifest(zoo) if a.backdoored)


def sub_zoo(zoo: Path, root: Path, keep: list[int], paths: dict[int, Path] | None = None) -> Path:
    """A hand-written manifest around some of ``zoo``'s agents (absolute paths), optionally replaced."""
    agents = read_manifest(zoo)
    chosen = [ZooAgent((paths or {}).get(i, agents[i].path), agents[i].backdoored, agents[i].attack) for i in keep]
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, chosen)
    return root


# ---------------------------------------------------------------------------------- every detector
@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_detector_scores_every_agent_of_a_real_zoo(zoo: Path, name: str) -> None:
    report = detect(zoo, name, FAST.get(name), n_clean=256)
    assert len(report.models) == 4 and all(m.seconds > 0 for m in report.models)
    cls = DETECTORS[name]
    for model in report.models:
        if "model" in cls.levels:
            assert np.isfinite(model.score) and 0.0 <= model.probability <= 1.0
        if "input" in cls.levels:
            assert model.inputs is not None and 0.0 <= model.inputs["false_positive_rate"] <= 1.0
            if model.backdoored:
                assert 0.0 <= model.inputs["auroc"] <= 1.0 and model.inputs["n_triggered"] > 0
    if "model" in cls.levels:
        assert report.auroc is not None and 0.0 <= report.auroc <= 1.0 and np.isfinite(report.cross_entropy)
    else:
        assert report.auroc is None and report.input_summary["models"] == 2
    json.dumps(report.to_json())  # JSON-ready


def test_activation_bands_flag_triggered_inputs_of_a_backdoored_agent(zoo: Path) -> None:
    run = backdoored_agent(zoo)
    result = analyse(ActivationBands(), run, True, n_clean=512)
    assert result.inputs["auroc"] >= 0.95 and result.inputs["recall"] >= 0.9
    assert result.inputs["false_positive_rate"] <= 0.05
    policy, card = load_policy(run)
    clean = clean_observations(policy, card, 512, seed=1)
    bands = ActivationBands().fit(policy, clean)
    from rlbackdoor.defenses.detectors import _trigger

    triggered = _trigger(card).apply(clean)
    assert (bands.score_inputs(triggered) > bands.input_threshold()).mean() >= 0.9
    with pytest.raises(ObservationError, match="do not match"):
        bands.score_inputs(clean[:, :3])
    with pytest.raises(SpecError, match="scores inputs only"):
        bands.score_model()


def test_detect_is_reproducible(zoo: Path) -> None:
    first = detect(zoo, "probe", FAST["probe"], n_clean=128)
    second = detect(zoo, "probe", FAST["probe"], n_clean=128)
    assert [m.score for m in first.models] == [m.score for m in second.models]
    assert [m.population_score for m in first.models] == [m.population_score for m in second.models]


# ------------------------------------------------------------------------------- black-box logic
class RulePolicy:
    """A CartPole rule (push where the pole falls) with an optional planted bump: pole velocity in [2, 3] -> left."""

    observation_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, bump: bool) -> None:
        self.bump = bump
        self.calls = 0

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, None]:
        self.calls += 1
        obs = np.asarray(obs).reshape(-1, 4)
        actions = (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)
        if self.bump:
            actions[(obs[:, 3] > 2.0) & (obs[:, 3] < 3.0)] = 0
        return actions, None


def test_black_box_probe_finds_a_planted_bump_and_not_a_monotone_rule() -> None:
    clean = np.random.default_rng(0).normal(0.0, [0.5, 0.5, 0.05, 0.3], size=(512, 4)).astype(np.float32)
    monotone = BlackBoxProbe().fit(RulePolicy(bump=False), clean).score_model()
    probe = BlackBoxProbe().fit(RulePolicy(bump=True), clean)
    score = probe.score_model()
    found = probe.details()
    assert monotone == 0.0 and score >= 0.9
    assert found["action"] == 0 and found["trigger"]["indices"] == [3] and 2.0 < found["trigger"]["values"][0] < 3.0
    assert probe.probability(score) > 0.99 and probe.probability(monotone) < 0.05


@pytest.mark.parametrize("name", ["spectral", "clustering", "bands"])
def test_step_set_detectors_single_out_a_shifted_fifth_of_the_steps(name: str) -> None:
    from sklearn.metrics import roc_auc_score
    from stable_baselines3.common.policies import ActorCriticPolicy

    torch.manual_seed(0)
    space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
    policy = ActorCriticPolicy(space, spaces.Discrete(2), lambda _: 0.0, net_arch=[32, 32])
    rng = np.random.default_rng(0)
    clean = rng.normal(0.0, 0.2, size=(800, 4)).astype(np.float32)
    steps = clean[400:].copy()
    poisoned = rng.random(len(steps)) < 0.2
    steps[poisoned, 3] = 2.0  # a value trigger on a fifth of the steps
    detector = get_detector(name).fit(policy, clean[:400])
    scores = detector.score_inputs(steps)
    flags = scores > detector.input_threshold()
    assert roc_auc_score(poisoned, scores) >= 0.95
    assert flags[poisoned].mean() >= 0.9 and flags[~poisoned].mean() <= 0.1


# --------------------------------------------------------------------------------- population logic
def test_population_score_singles_out_the_agent_that_behaves_differently() -> None:
    keys = [f"c{i}" for i in range(50)]
    rng = np.random.default_rng(0)
    profiles = [(keys, np.clip(0.5 + rng.normal(0, 0.02, 50), 0, 1)) for _ in range(6)]
    odd = profiles[3][1].copy()
    odd[10:15] = 1.0
    profiles[3] = (keys[::-1], odd[::-1])  # order does not matter: keys align
    scores = population_scores(profiles)
    assert int(np.argmax(scores)) == 3 and scores[3] > 3 * np.max(np.delete(scores, 3))


def test_zoo_metrics_one_class_is_undefined_not_a_crash() -> None:
    out = zoo_metrics(np.array([False, False]), np.array([0.1, 0.2]), np.array([0.5, 0.5]))
    assert out["auroc"] is None and "undefined" in out["note"] and out["cross_entropy"] == pytest.approx(np.log(2))
    out = zoo_metrics(np.array([False, True, True]), np.array([0.1, 0.3, 0.2]), np.array([0.2, 0.9, 0.6]))
    assert out["auroc"] == 1.0 and out["roc"]["tpr"][-1] == 1.0


# ------------------------------------------------------------------------------------- the CLI
def test_rlbd_detect_zoo_json_and_wandb_run(zoo: Path, tmp_path: Path, wandb_dir: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["detect", str(zoo), "--detector", "probe", "--param", "n_values=61", "--n-clean", "128", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["detector"] == "probe" and report["access"] == ["black_box", "clean_trajectories"]
    assert [set(m) >= {"path", "score", "backdoored"} for m in report["models"]] == [True] * 4
    assert [m["backdoored"] for m in report["models"]] == [False, True, False, True]
    assert 0.0 <= report["auroc"] <= 1.0 and report["cross_entropy"] > 0 and report["roc"]["fpr"][0] == 0.0
    assert report["population"]["auroc"] is not None
    (wb,) = offline_runs(wandb_dir)
    assert wb.run.job_type == "detect" and wb.config["detector"] == "probe" and wb.exit_code == 0
    assert wb.summary["detect/auroc"] == pytest.approx(report["auroc"])
    assert wb.summary["detect/population_auroc"] == pytest.approx(report["population"]["auroc"])
    assert wb.summary["detect/roc/_type"] == "image-file" and wb.summary["detect/models/nrows"] == 4


def test_rlbd_detect_single_run_and_list(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.json"
    run = backdoored_agent(zoo)
    argv = ["detect", str(run), "-d", "bands", "--n-clean", "128", "--json", str(out), "--wandb-mode", "disabled"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["zoo"] is False and report["auroc"] is None and report["models"][0]["backdoored"] is None
    assert report["models"][0]["inputs"]["n_triggered"] > 0  # a run with an attack is checked against it
    capsys.readouterr()
    assert main(["detect", "--list"]) == 0
    listing = capsys.readouterr().out
    for name, cls in DETECTORS.items():
        assert name in listing and all(a.value in listing.replace("\n", " ") for a in cls.access)


def test_rlbd_detect_scores_the_steps_of_a_trajectory_file(zoo: Path, tmp_path: Path, capsys) -> None:
    from rlbackdoor.registry import make_env
    from rlbackdoor.trajectories import FIELDS, Trajectories, collect

    run = backdoored_agent(zoo)
    policy, card = load_policy(run)
    attack = {**card["attack"], "schedule": {"kind": "rate", "rate": 0.2}}  # the poisoned env
    steps = collect(make_env(attack), policy, 400, seed=3)
    path = steps.save(tmp_path / "steps.npz")
    out = tmp_path / "r.json"
    argv = ["detect", str(run), "-d", "bands", "--inputs", str(path), "--json", str(out), "--wandb-mode", "disabled"]
    assert main(argv) == 0
    inputs = json.loads(out.read_text())["models"][0]["inputs"]
    assert inputs["n_triggered"] == int(steps.triggered.sum()) > 20 and inputs["triggered"] == steps.triggered.tolist()
    assert len(inputs["scores"]) == 400 and 0.0 <= inputs["auroc"] <= 1.0 and inputs["recall"] >= 0.9
    assert "pass a run directory" in one_line_error(
        capsys, ["detect", str(zoo), "-d", "spectral", "--inputs", str(path)]
    )
    err = one_line_error(capsys, ["detect", str(run), "-d", "probe", "--inputs", str(path)])
    assert "--inputs: 'probe' scores models, not inputs; drop --inputs or use one of bands" in err
    assert "not a trajectory file" in one_line_error(capsys, ["detect", str(run), "-d", "bands", "--inputs", str(out)])
    other = collect(gym.make("Acrobot-v1"), None, 50, seed=0, env_id="Acrobot-v1").save(tmp_path / "acrobot.npz")
    err = one_line_error(capsys, ["detect", str(run), "-d", "bands", "--inputs", str(other)])
    assert f"--inputs {other}: steps of Acrobot-v1, but {run} is a run of CartPole-v1; record steps of" in err
    # a file that does not name its env is still checked against the run's observations
    wide = Trajectories(steps.observations[:, :3], *(getattr(steps, f) for f in FIELDS[1:]))
    err = one_line_error(capsys, ["detect", str(run), "-d", "bands", "--inputs", str(wide.save(tmp_path / "w.npz"))])
    assert "observations of shape (3,), but" in err and "observes (4,)" in err


# ------------------------------------------------------------------------------------ bad inputs
def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main([*argv, "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlbd: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_empty_zoo_unknown_detector_and_non_targets_exit_2(zoo: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text('{"agents": []}')
    assert "the zoo is empty" in one_line_error(capsys, ["detect", str(empty), "-d", "probe"])
    assert "unknown detector 'nope'" in one_line_error(capsys, ["detect", str(zoo), "-d", "nope"])
    assert "neither a run directory" in one_line_error(capsys, ["detect", str(tmp_path), "-d", "probe"])
    assert "bad parameters" in one_line_error(capsys, ["detect", str(zoo), "-d", "probe", "--param", "bogus=1"])
    assert "give TARGET" in one_line_error(capsys, ["detect", str(zoo)])
    huge = ["detect", str(zoo), "-d", "probe", "--n-clean", "10" * 10]
    assert "'--n-clean': Input should be less than or equal to 1000000" in one_line_error(capsys, huge)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("reverse", {"steps": "abc"}, "(steps='abc'); give steps an integer >= 1"),
        ("reverse", {"steps": -5}, "(steps=-5); give steps an integer >= 1"),
        ("probe", {"n_values": True}, "(n_values=True); give n_values an integer >= 1"),
        ("bands", {"fpr": float("nan")}, "(fpr=nan); give fpr a finite number >= 0"),
        ("spectral", {"seed": -1}, "(seed=-1); give seed an integer >= 0"),
    ],
)
def test_detector_parameters_are_checked_against_the_signature(name: str, params: dict, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(f"detector '{name}': bad parameters {message}")):
        get_detector(name, **params)
    assert get_detector("reverse", restarts=None, l1=0, steps=3).steps == 3


def test_rlbd_detect_bad_parameter_values_exit_2(tmp_path: Path, capsys) -> None:
    assert "steps='abc'" in one_line_error(capsys, ["detect", str(tmp_path), "-d", "reverse", "--param", "steps=abc"])
    assert "steps=-5" in one_line_error(capsys, ["detect", str(tmp_path), "-d", "reverse", "--param", "steps=-5"])
    assert "rlbd detect --seed" in one_line_error(capsys, ["detect", str(tmp_path), "-d", "probe", "--param", "seed=1"])
    bands = ["detect", str(tmp_path), "-d", "bands", "--param", "quantile=0.7"]
    assert "must lie in [0, 0.5) and (0, 1)" in one_line_error(capsys, bands)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "manifest.json").write_text("{}")
    manifest = ["detect", str(tmp_path / "zoo" / "manifest.json"), "-d", "probe"]
    assert f"manifest.json: a file; pass its folder {tmp_path / 'zoo'}" in one_line_error(capsys, manifest)
    bare = ["detect", str(tmp_path), "-d", "probe", "--param", "n_values"]
    assert "expected key.path=value; write --param n_values=VALUE" in one_line_error(capsys, bare)


def test_one_class_zoo_reports_auroc_undefined(zoo: Path, tmp_path: Path, capsys) -> None:
    clean_only = sub_zoo(zoo, tmp_path / "clean-only", [0, 2])
    out = tmp_path / "r.json"
    argv = ["detect", str(clean_only), "-d", "stimulation", "--n-clean", "64", "--json", str(out)]
    assert main([*argv, "--wandb-mode", "disabled"]) == 0
    report = json.loads(out.read_text())
    assert (
        report["auroc"] is None and "AUROC undefined" in report["note"] and "AUROC undefined" in capsys.readouterr().out
    )


def test_mismatched_observation_spaces_exit_2(zoo: Path, tmp_path: Path, capsys) -> None:
    acrobot = load_experiment(
        CONFIGS / "experiments" / "cartpole_smoke.yaml",
        ["env=Acrobot-v1", "attack=null", "poisoning=null", "timesteps=64"],
    )
    other = train(acrobot, tmp_path / "acrobot", wandb_mode="disabled")
    mixed = sub_zoo(zoo, tmp_path / "mixed", [0, 1, 2], {2: other})
    err = one_line_error(capsys, ["detect", str(mixed), "-d", "probe"])
    assert "observation space differs" in err and "one env family" in err


def test_weights_that_do_not_match_the_card_exit_2(zoo: Path, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(backdoored_agent(zoo), tmp_path / "run"))
    card = read_card(run)
    card["policy"]["kwargs"]["net_arch"] = [8]
    write_json(run / "card.json", card)
    err = one_line_error(capsys, ["detect", str(run), "-d", "reverse"])
    assert "weights do not fit the policy in" in err
    broken = sub_zoo(zoo, tmp_path / "broken", [0, 1], {1: run})
    assert "weights do not fit" in one_line_error(capsys, ["detect", str(broken), "-d", "probe"])


def test_bad_json_paths_exit_2_before_any_work(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for command in (["detect", str(tmp_path / "nowhere"), "-d", "probe"], ["cleanse", str(tmp_path / "nowhere")]):
        assert f"--json {tmp_path}: is a folder" in one_line_error(capsys, [*command, "--json", str(tmp_path)])
        bad = afile / "r.json"
        assert f"--json {bad}: {afile} is a file, not a folder" in one_line_error(
            capsys, [*command, "--json", str(bad)]
        )
    assert afile.read_text() == ""


@pytest.fixture(scope="module")
def multiagent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seconds-long victim of rlbd/TrojanRPS-v0 (a multi-agent env)."""
    spec = load_experiment(
        CONFIGS / "experiments" / "rps_inner.yaml",
        ["timesteps=128", "n_envs=2", "hyperparams.n_steps=64", "hyperparams.batch_size=64"],
    )
    return train(spec, tmp_path_factory.mktemp("ma") / "rps", wandb_mode="disabled")


def test_multiagent_runs_and_zoos_point_to_rlbd_cleanse(multiagent_run: Path, tmp_path: Path, capsys) -> None:
    hint = "rlbd/TrojanRPS-v0 is a multi-agent env id and rlbd detect handles single-agent envs; "
    hint += "for multi-agent runs use rlbd cleanse"
    assert f"{multiagent_run}: {hint}" in one_line_error(capsys, ["detect", str(multiagent_run), "-d", "bands"])
    write_manifest(tmp_path, [ZooAgent(multiagent_run, True, None)])
    assert f"{multiagent_run}: {hint}" in one_line_error(capsys, ["detect", str(tmp_path), "-d", "probe"])


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_payloads_in_model_files_never_run(zoo: Path, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(backdoored_agent(zoo), tmp_path / "run"))
    marker = tmp_path / "marker"
    with zipfile.ZipFile(run / "model.zip", "w") as archive:  # SB3's zip with a poisoned pickle inside
        archive.writestr("data", json.dumps({"policy_class": {":serialized:": ""}}))
        archive.writestr("policy.pth", pickle.dumps(Payload(marker)))
    buffer = io.BytesIO()
    torch.save({"payload": Payload(marker)}, buffer)
    (run / "policy.pt").write_bytes(buffer.getvalue())
    assert not marker.exists()
    out = tmp_path / "r.json"
    argv = ["detect", str(run), "-d", "stimulation", "--n-clean", "64", "--json", str(out), "--wandb-mode", "disabled"]
    assert main(argv) == 0
    assert json.loads(out.read_text())["models"][0]["score"] is not None
    assert not marker.exists()
    with pytest.raises(Exception, match=r"pwned|write_text|not allowed|Unsupported|WeightsUnpickler"):
        torch.load(run / "policy.pt", weights_only=True)  # the payload is real: only an unsafe load would run it
    assert not marker.exists()


def test_detectors_reject_bad_fits_and_unknown_names() -> None:
    with pytest.raises(SpecError, match="unknown detector"):
        get_detector("nope")
    probe = BlackBoxProbe()
    with pytest.raises(SpecError, match="not fitted"):
        probe.score_model()
    with pytest.raises(SpecError, match="batch of clean observations"):
        probe.fit(RulePolicy(bump=False), np.zeros((1, 4), np.float32))
    with pytest.raises(ObservationError, match="NaN"):
        probe.fit(RulePolicy(bump=False), np.full((8, 4), np.nan, np.float32))


def test_a_run_directory_given_as_the_policy_points_to_load_policy(tmp_path: Path) -> None:
    detector = get_detector("stimulation")
    with pytest.raises(SpecError, match=r"not PosixPath; load a run directory with rlbackdoor.load_policy"):
        detector.fit(tmp_path, np.zeros((10, 4), np.float32))
