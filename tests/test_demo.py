"""The demo (the README's main command) end to end at a small size: two real PPO runs, evaluation, the defense row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlbackdoor.demo import main
from rlbackdoor.training.artifacts import read_card


def test_demo_trains_evaluates_defends_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["--timesteps", "2048", "--episodes", "3", "--seeds", "2", "--n-clean", "20", "--out", str(out)]
    assert main([*argv, "--wandb-mode", "disabled"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["clean agent", "backdoored agent", "backdoored + track sanitizer"]
    for name, row in rows.items():
        assert name.split()[0] in printed
        assert 0.0 <= row["asr"] <= 1.0 and row["ctp"] > 0
        assert row["asr_ci_low"] <= row["asr"] <= row["asr_ci_high"]
    assert rows["clean agent"]["ctp_ratio"] == 1.0
    assert 0 < rows["backdoored agent"]["poison_rate"] < 0.02
    clean, backdoored = read_card(results["runs"]["clean"]), read_card(results["runs"]["backdoored"])
    assert clean["poisoning"] is None and backdoored["poisoning"] == "inner"
    assert backdoored["env"] == "rlbd/TrojanCartPole-v1"


@pytest.mark.parametrize(("option", "value"), [("--n-clean", "1"), ("--seeds", "0"), ("--timesteps", "-5")])
def test_demo_bad_input_is_one_line_exit_2_before_training(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([option, value, "--out", str(tmp_path / "d"), "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlbackdoor.demo: error: {option} must be at least") and "\n" not in err
    assert not (tmp_path / "d").exists()
