"""W&B tracking: mode selection, real offline runs read back from their transaction log, failures that never raise."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image
from wandb_offline import offline_runs

from rlbackdoor.errors import SpecError
from rlbackdoor.tracking import prefixed, resolve_mode, wandb_run


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No API key, no netrc, W&B directories under ``tmp_path``; returns the ``WANDB_DIR``."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (("WANDB_DIR", "w"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


def test_mode_explicit_wins_over_environment(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("disabled") == "disabled"
    assert resolve_mode(None) == "offline"


def test_mode_online_iff_api_key_configured(wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode() == "offline"
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.com")
    assert resolve_mode() == "offline"


def test_mode_aliases_and_bad_modes(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mode("dryrun") == "offline"
    with pytest.raises(SpecError, match="use one of online, offline, disabled"):
        resolve_mode("sometimes")
    monkeypatch.setenv("WANDB_MODE", "nope")
    with pytest.raises(SpecError, match="WANDB_MODE 'nope'"):
        resolve_mode()


def test_prefixed_keys() -> None:
    assert prefixed("eval", {"asr": 0.5, "ctp": 10.0}) == {"eval/asr": 0.5, "eval/ctp": 10.0}


def test_offline_run_written_and_read_back(wandb_env: Path, tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "exp"}))
    png = tmp_path / "plot.png"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(png)
    config = {"name": "exp", "algo": "ppo", "hyperparams": {"n_steps": 32}}
    with wandb_run("eval", "exp", config, project="rlbd-test") as tracker:
        assert tracker.active
        tracker.log(prefixed("eval", {"asr": 0.25}), step=1)
        tracker.log(prefixed("eval", {"asr": 0.75}), step=2)
        tracker.summary({"eval/ctp": 123.5})
        tracker.log_artifact(card, "exp-card", "card")
        tracker.log_table("eval/runs", ["seed", "ctp"], [[0, 1.0], [1, 2.0]])
        tracker.log_image("eval/plot", png)
    (run,) = offline_runs(wandb_env)
    assert tracker.run_dir == run.path and run.path.is_relative_to(wandb_env)
    assert run.run.project == "rlbd-test" and run.run.run_group == "exp" and run.run.job_type == "eval"
    assert run.run.display_name == "exp"
    assert {k: run.config[k] for k in config} == config
    assert [row["eval/asr"] for row in run.history if "eval/asr" in row] == [0.25, 0.75]
    assert run.summary["eval/ctp"] == 123.5 and run.summary["eval/asr"] == 0.75
    assert run.summary["eval/runs/nrows"] == 2
    assert run.summary["eval/plot/_type"] == "image-file" and run.summary["eval/plot/width"] == 8
    assert ("exp-card", "card") in [(a.name, a.type) for a in run.artifacts]
    assert run.exit_code == 0


def test_exception_in_block_propagates_and_marks_run_failed(wandb_env: Path) -> None:
    with pytest.raises(KeyError), wandb_run("train", "exp", {}, group="g") as tracker:
        tracker.log({"train/x": 1.0})
        raise KeyError("boom")
    (run,) = offline_runs(wandb_env)
    assert run.exit_code == 1 and run.run.run_group == "g"


def test_disabled_writes_nothing(wandb_env: Path) -> None:
    with wandb_run("eval", "exp", {}, mode="disabled") as tracker:
        assert not tracker.active and tracker.run_dir is None
        tracker.log({"eval/asr": 1.0})
        tracker.summary({"eval/asr": 1.0})
    assert not any(wandb_env.iterdir())


def test_init_failure_warns_and_never_raises(wandb_env: Path) -> None:
    with (
        pytest.warns(RuntimeWarning, match="W&B init failed"),
        wandb_run("eval", "exp", {}, project="bad/project#") as t,
    ):
        assert not t.active
        t.log({"eval/asr": 1.0})
        t.log_artifact(Path("missing"), "x", "card")


def test_failure_mid_run_warns_once_then_noops(wandb_env: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with wandb_run("eval", "exp-mid", {}) as tracker:
            tracker.log_artifact(wandb_env / "does-not-exist.json", "card", "card")
            assert not tracker.active
            tracker.log({"eval/asr": 1.0})
            tracker.log_artifact(wandb_env / "does-not-exist.json", "card", "card")
    assert len([w for w in caught if "W&B log_artifact failed" in str(w.message)]) == 1
    (run,) = offline_runs(wandb_env)
    assert run.exit_code == 0 and not any("eval/asr" in row for row in run.history)


def test_unwritable_wandb_dir_never_raises(wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "sub"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "fallback"))
    (tmp_path / "fallback").mkdir()
    with wandb_run("eval", "exp", {"a": 1}) as tracker:
        tracker.log({"eval/asr": 0.5})
    assert blocker.is_file()
