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


def test_the_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The README's "From Python" block as written, at 2048 steps and 2 episodes, from another directory."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("From Python, the same steps", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    small = {
        '"configs/': f'"{root}/configs/',
        "timesteps=100000": "timesteps=2048",
        "episodes=10, seeds=3": "episodes=2, seeds=1",
    }
    for text, replacement in small.items():
        assert text in block
        block = block.replace(text, replacement)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    asr, low, high, ctp = map(float, capsys.readouterr().out.split())
    assert 0 <= low <= asr <= high <= 1 and ctp > 0
    assert len(list((tmp_path / "runs" / "cartpole_inner").iterdir())) == 1
