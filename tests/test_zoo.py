"""The agent zoo: draws, per-agent experiments, ``rlbd zoo`` with real (tiny) training, resume, manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from wandb_offline import offline_runs

from rlbackdoor.cli import main
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.training.artifacts import read_card
from rlbackdoor.zoo import ZooAgent, draw, experiments, load_zoo, read_manifest, write_manifest

TINY = {
    "name": "tiny",
    "agents": 2,
    "seed": 3,
    "env": "CartPole-v1",
    "algo": "ppo",
    "timesteps": 256,
    "n_envs": 2,
    "hyperparams": {"n_steps": 64, "batch_size": 64, "n_epochs": 1, "policy_kwargs": {"net_arch": [16]}},
    "poisoning": {"choice": ["inner", "outer"]},
    "attack": {
        "trigger": {"kind": "value", "indices": {"sample": [1, 3], "k": 1}, "values": [{"uniform": [2.0, 3.0]}]},
        "schedule": {"kind": "rate", "rate": {"uniform": [0.05, 0.1]}},
        "payload": {"kind": "targeted", "target_action": {"randint": [0, 1]}},
    },
}


def write(tmp_path: Path, data: dict, name: str = "zoo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------- draws
def test_draws_resolve_every_kind_and_repeat_with_the_seed() -> None:
    node = {
        "a": {"choice": [{"uniform": [0.0, 1.0]}, {"randint": [5, 5]}]},
        "b": {"sample": [1, 2, 3, 4], "k": 3},
        "c": [{"randint": [0, 2]}, 7, "text"],
        "d": {"kind": "value", "nested": {"uniform": [-2.0, -1.0]}},
    }
    out = draw(node, np.random.default_rng(0))
    assert out == draw(node, np.random.default_rng(0))
    assert out["a"] == 5 or 0.0 <= out["a"] <= 1.0
    assert len(out["b"]) == 3 == len(set(out["b"])) and set(out["b"]) <= {1, 2, 3, 4}
    assert out["c"][0] in (0, 1, 2) and out["c"][1:] == [7, "text"]
    assert out["d"]["kind"] == "value" and -2.0 <= out["d"]["nested"] <= -1.0
    values = {draw({"randint": [0, 3]}, np.random.default_rng(s)) for s in range(64)}
    assert values == {0, 1, 2, 3}  # both ends included


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"choice": []}, "x: choice needs a non-empty list"),
        ({"uniform": [1.0]}, "x: uniform needs [low, high] numbers"),
        ({"uniform": [2.0, 1.0]}, "x: uniform range [2.0, 1.0] is empty"),
        ({"randint": [0.5, 2]}, "x: randint needs integer ends"),
        ({"randint": [0, 2**63]}, r"x: randint needs integer ends below 2\*\*62"),
        ({"sample": [1, 2], "k": 3}, "x: sample k=3 must be an integer in [1, 2]"),
        ({"uniform": [float("nan"), 4.0]}, "x: uniform ends must be finite numbers within float range"),
        ({"uniform": [0.0, float("inf")]}, "x: uniform ends must be finite numbers within float range"),
        ({"uniform": [0, 10**400]}, "x: uniform ends must be finite numbers within float range"),
        ({"randint": [-(10**400), 0]}, "x: randint ends must be finite numbers within float range"),
        ({"uniform": [-1e308, 1e308]}, "x: uniform range [-1e.308, 1e.308] is wider than float range; narrow it"),
        ({"uniform": [True, 2.0]}, "x: uniform needs [low, high] numbers"),
        ({"randint": [0, True]}, "x: randint needs [low, high] numbers"),
        ({"sample": [1, 2], "k": True}, "x: sample k=True must be an integer in [1, 2]"),
    ],
)
def test_malformed_draws_are_spec_errors_naming_the_field(node: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        draw(node, np.random.default_rng(0), "x")


def test_experiments_half_clean_controls_half_backdoored_and_stable_when_growing(tmp_path: Path) -> None:
    spec = load_zoo(write(tmp_path, {**TINY, "agents": 6}))
    runs = experiments(spec)
    assert [r.name for r in runs][:2] == ["tiny-0-clean", "tiny-1-backdoored"]
    assert len({r.seed for r in runs}) == 6
    for i, run in enumerate(runs):
        assert run.attack is not None and run.poisoning in ("inner", "outer")
        if i % 2 == 0:  # the control: same pipeline, a trigger that never fires
            assert run.attack.schedule.rate == 0.0 and run.poisoning == "inner"
        else:
            assert 0.05 <= run.attack.schedule.rate <= 0.1 and run.attack.trigger.indices[0] in (1, 3)
    bigger = experiments(load_zoo(write(tmp_path, {**TINY, "agents": 8})))
    assert [r.model_dump() for r in bigger[:6]] == [r.model_dump() for r in runs]


def test_attack_draws_that_do_not_fit_the_env_fail_before_training(tmp_path: Path, capsys) -> None:
    bad = {**TINY, "attack": {**TINY["attack"], "trigger": {"kind": "value", "indices": [7], "values": [1.0]}}}
    out = tmp_path / "zoo"
    assert main(["zoo", str(write(tmp_path, bad)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "agent 0-clean" in err and "out of range" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["zoo", str(write(tmp_path, {**TINY, "agents": 1})), "--out", str(out)]) == 2
    assert "agents" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"agents": 10**20}, "agents: Input should be less than or equal to 1000"),
        ({"timesteps": 10**20}, "timesteps: Input should be less than or equal to 1000000000"),
        ({"seed": True}, "seed: Input should be a valid integer"),
        ({"seed": 429_496}, "seed: Input should be less than or equal to 429495"),  # agent seeds stay below 2**32
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ],
)
def test_zoo_fields_beyond_their_limits_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict, message: str
) -> None:
    config, out = write(tmp_path, {**TINY, **fields}), tmp_path / "zoo"
    assert main(["zoo", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlbd: error: {config}: {message}") and "\n" not in err
    assert not out.exists()


def test_malformed_draws_anywhere_in_the_config_fail_naming_the_file(tmp_path: Path, capsys) -> None:
    trigger = {**TINY["attack"]["trigger"], "values": [{"uniform": [0, 10**323]}]}  # an int beyond float range
    config = write(tmp_path, {**TINY, "attack": {**TINY["attack"], "trigger": trigger}})
    out = tmp_path / "zoo"
    assert main(["zoo", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{config}: attack.trigger.values.0: uniform ends must be finite numbers within float range" in err
    assert not out.exists()
    unchosen = write(tmp_path, {**TINY, "poisoning": {"choice": ["inner", {"choice": []}]}})
    with pytest.raises(SpecError) as info:
        load_zoo(unchosen)  # an item no agent may draw is checked too
    assert str(info.value).startswith(f"{unchosen}: poisoning: choice needs a non-empty list")


# ------------------------------------------------------------------------------------- build, resume
def test_rlbd_zoo_trains_writes_the_manifest_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, out = write(tmp_path, TINY), tmp_path / "zoo"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))  # the workers inherit it
    (tmp_path / "wandb").mkdir()
    argv = ["zoo", str(config), "--out", str(out), "--workers", "2"]
    assert main([*argv, "--wandb-mode", "offline"]) == 0
    runs = offline_runs(tmp_path / "wandb")  # one group for the zoo; each run named once after its agent
    assert sorted(r.run.display_name for r in runs) == ["tiny-0-clean", "tiny-1-backdoored"]
    assert {r.run.run_group for r in runs} == {"tiny"}
    argv.extend(["--wandb-mode", "disabled"])
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["agents"]
    assert [(r["path"], r["backdoored"]) for r in rows] == [("agents/0-clean", False), ("agents/1-backdoored", True)]
    assert rows[0]["attack"] is None and rows[1]["attack"]["trigger"]["kind"] == "value"
    assert read_card(out / rows[1]["path"])["attack"] == rows[1]["attack"]
    assert read_card(out / rows[0]["path"])["train"]["poison_rate"] == 0.0
    agents = read_manifest(out)
    assert [a.backdoored for a in agents] == [False, True] and agents[0].path == out / "agents/0-clean"

    kept = (out / rows[0]["path"] / "card.json").stat().st_mtime_ns
    (out / rows[1]["path"] / "card.json").unlink()  # an unfinished agent
    assert main(argv) == 0
    assert (out / rows[0]["path"] / "card.json").stat().st_mtime_ns == kept  # finished agents are skipped
    assert (out / rows[1]["path"] / "card.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["agents"] == rows
    assert main([*argv, "--set", "timesteps=512"]) == 2  # never mixes agents of two configs


def test_a_zoo_of_an_untrainable_config_fails_before_writing_anything(tmp_path: Path, capsys) -> None:
    broken = {**TINY, "hyperparams": {**TINY["hyperparams"], "policy_kwargs": {"net_arch": [-1]}}}
    out = tmp_path / "zoo"
    assert (
        main(["zoo", str(write(tmp_path, broken, "broken.yaml")), "--out", str(out), "--wandb-mode", "disabled"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "zoo tiny: agent 0-clean: hyperparams: SB3 PPO rejects the run (Trying to create tensor" in err
    assert not out.exists()


def test_a_zoo_that_kept_nothing_reruns_with_another_config_and_one_that_kept_something_does_not(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "zoo"
    other = load_zoo(write(tmp_path, {**TINY, "timesteps": 512}, "other.yaml"))
    interrupted = out / "agents" / "1-backdoored" / "checkpoints" / "000128"  # an agent of that config, resumable
    interrupted.mkdir(parents=True)
    write_manifest(out, [], {"name": "tiny", "config": other.model_dump(mode="json")})  # a first attempt that failed
    (interrupted / "state.json").write_text("{}")
    argv = ["zoo", str(write(tmp_path, TINY)), "--out", str(out), "--wandb-mode", "disabled"]
    assert main(argv) == 2
    assert "another config (0 agents finished, 1 interrupted); resume it with that config" in capsys.readouterr().err
    assert (interrupted / "state.json").is_file()
    shutil.rmtree(interrupted)  # nothing left to keep: the rerun starts over
    assert main([*argv, "--workers", "2"]) == 0
    assert [a.backdoored for a in read_manifest(out)] == [False, True]
    assert read_card(out / "agents" / "1-backdoored")["config"]["timesteps"] == TINY["timesteps"]


def test_bad_out_paths_fail_before_training(tmp_path: Path, capsys) -> None:
    config = write(tmp_path, TINY)
    for out, message in [(config, "is a file, not a folder"), (config / "zoo", f"{config} is a file, not a folder")]:
        assert main(["zoo", str(config), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rlbd: error: --out {out}: {message}") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.yaml"]


# ------------------------------------------------------------------------------------------ manifests
def test_hand_written_manifest_with_absolute_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    path = write_manifest(tmp_path, [ZooAgent(tmp_path / "inside", False, None), ZooAgent(elsewhere, True, {"x": 1})])
    rows = json.loads(path.read_text())["agents"]
    assert rows[0]["path"] == "inside" and rows[1]["path"] == str(elsewhere.resolve())
    assert [a.path for a in read_manifest(tmp_path)] == [tmp_path / "inside", elsewhere.resolve()]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "no manifest.json"),
        ("{not json", r"manifest\.json: unreadable \(Expecting property name"),
        ("[" * 100_000, r"manifest\.json: unreadable \(maximum recursion depth exceeded"),
        ('{"agents": {}}', 'expected {"agents": \\[...\\]}'),
        ('{"agents": []}', "the zoo is empty"),
        ('{"agents": [{"path": "a"}]}', "agents.0 needs 'path'"),
    ],
)
def test_bad_manifests_are_artifact_errors(tmp_path: Path, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(tmp_path)


def test_oversized_and_irregular_manifests_are_artifact_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlbackdoor.zoo.MAX_MANIFEST_BYTES", 64)
    (tmp_path / "manifest.json").write_text(json.dumps({"agents": [{"path": "a" * 64, "backdoored": False}]}))
    with pytest.raises(ArtifactError, match=r"manifest\.json: unreadable \(larger than 64 bytes\)"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(ArtifactError, match=r"manifest\.json: unreadable \(not a regular file\)"):
        read_manifest(tmp_path)


def test_rlbd_detect_reports_a_nested_manifest_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "manifest.json").write_text("[" * 100_000)
    report = tmp_path / "report.json"
    assert main(["detect", str(tmp_path), "--detector", "probe", "--json", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlbd: error: {tmp_path / 'manifest.json'}: unreadable (maximum recursion depth")
    assert "\n" not in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_rlbd_detect_and_sanitize_refuse_paths_the_os_cannot_look_up_in_one_line(tmp_path: Path, capsys) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "manifest.json").write_text(json.dumps({"agents": [{"path": "a" * 300, "backdoored": False}]}))
    for command in (["detect", "--detector", "probe"], ["sanitize", "--method", "support"]):
        assert main([command[0], str(zoo), *command[1:], "--wandb-mode", "disabled"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rlbd: error: {zoo / 'manifest.json'}: agents.0.path: cannot look up ")
        assert "(File name too long); use a shorter or accessible path" in err and "\n" not in err
    long = tmp_path / ("b" * 300)
    assert main(["detect", str(long), "--detector", "probe"]) == 2
    assert "rlbd: error: rlbd detect: cannot look up" in capsys.readouterr().err
    assert main(["detect", str(zoo), "--detector", "probe", "--json", str(long / "r.json")]) == 2
    assert "rlbd: error: --json: cannot look up" in capsys.readouterr().err
    assert main(["zoo", str(write(tmp_path, TINY)), "--out", str(long)]) == 2
    assert "rlbd: error: --out: cannot look up" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo", "zoo.yaml"]


@pytest.mark.parametrize("text", ["[" * 100_000, "{not json"])
def test_a_zoo_over_an_unreadable_manifest_fails_before_writing_anything(tmp_path: Path, capsys, text: str) -> None:
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    assert main(["zoo", str(write(tmp_path, TINY)), "--out", str(out), "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlbd: error: {out / 'manifest.json'}: unreadable (") and "\n" not in err
    assert "delete it to start the zoo over, or use a new --out" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == text
