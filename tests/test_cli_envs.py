"""``rlbd envs``: list and show, and the one-line errors (exit 2) on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbackdoor import env_specs, registry
from rlbackdoor.cli import main
from rlbackdoor.multiagent import parallel_env_specs

RLBD = Path(sys.executable).parent / "rlbd"
SPEC = """\
id: {id}
base: CartPole-v1
trigger: {{kind: value, indices: [3], values: [2.5]}}
schedule: {{kind: rate, rate: 0.01}}
payload: {{kind: targeted, target_action: 0}}
"""


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rlbd: error: ")
    return lines[0]


def test_list_prints_every_registered_id(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    for env_id, spec in env_specs().items():
        assert env_id in out
        assert spec.base[:8] in out  # a long base folds onto the next line at 80 columns
    assert "rlbd/Backdoor-v0" in out


def test_list_in_a_wide_terminal_shows_trigger_schedule_and_payload() -> None:
    out = subprocess.run(
        [RLBD, "envs", "list"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("rlbd/")}
    for env_id, spec in env_specs().items():
        for word in (spec.base, spec.trigger.kind, spec.schedule.kind, spec.payload.kind):
            assert word in rows[env_id]


@pytest.mark.parametrize(
    ("env_id", "l0"),
    [("rlbd/TrojanCartPole-v0", 1.0), ("rlbd/TrojanAcrobot-v0", 2.0), ("rlbd/TrojanCartPoleActSeq-v0", 6.0)],
)
def test_show_prints_the_resolved_spec_and_stealth(capsys: pytest.CaptureFixture[str], env_id: str, l0: float) -> None:
    assert main(["envs", "show", env_id]) == 0
    shown = json.loads(capsys.readouterr().out)
    stealth = shown.pop("stealth")
    assert shown == env_specs()[env_id].model_dump(mode="json")
    assert shown["schedule"]["duration"] >= 1  # defaults are filled in: the spec is resolved
    assert stealth["l0"] == l0
    if "note" not in stealth:
        assert stealth["linf"] > 0 and stealth["l2"] >= stealth["linf"] and 0 < stealth["linf_rel"] <= 1


def test_show_prints_stealth_of_an_image_patch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "show", "rlbd/TrojanLavaGap-v0"]) == 0
    stealth = json.loads(capsys.readouterr().out)["stealth"]
    assert 0 < stealth["l0"] <= 12  # a 2x2 patch over 3 channels
    assert stealth["linf"] <= 9


@pytest.mark.parametrize("env_id", ["rlbd/TrojanRPS-v0", "rlbackdoor:rlbd/TrojanSpread-v0"])
def test_show_prints_a_multiagent_spec_and_its_stealth(capsys: pytest.CaptureFixture[str], env_id: str) -> None:
    assert main(["envs", "show", env_id]) == 0
    shown = json.loads(capsys.readouterr().out)
    stealth = shown.pop("stealth")
    spec = parallel_env_specs()[env_id.removeprefix("rlbackdoor:")]
    assert shown == spec.model_dump(mode="json") and shown["adapter"] is not None
    if spec.trigger.kind == "action_sequence":
        assert stealth["l0"] == len(spec.trigger.sequence) and spec.trigger.agent in stealth["note"]
    else:  # per victim
        assert set(stealth) == set(spec.victims) and all(s["l0"] == len(spec.trigger.indices) for s in stealth.values())


def test_show_of_the_factory_id_names_its_keyword_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "show", registry.FACTORY_ID]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == registry.FACTORY_ID and shown["kwargs"][:1] == ["env_id"] and "trigger" in shown["kwargs"]


@pytest.mark.parametrize("argv", [[], ["envs"]])
def test_a_bare_group_prints_its_help_and_exits_0(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Usage:" in out and err == ""


def test_show_of_an_unknown_id_lists_the_multiagent_ids_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "show", "rlbd/Nope-v0"]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert all(env_id in err for env_id in [*env_specs(), *parallel_env_specs()])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["envs", "show", "rlbd/Nope-v0"], "unknown backdoor env id 'rlbd/Nope-v0'; registered ids: "),
        (["envs", "show"], "Missing argument"),
        (["envs", "bogus"], "No such command 'bogus'"),
        (["envs", "list", "--colour"], "No such option: --colour"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in _one_line_error(captured.err)
    assert captured.out == ""


@pytest.fixture
def envs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary envs/ folder in place of the shipped one (the spec cache is cleared around the test)."""
    monkeypatch.setattr(registry, "data_dir", lambda name: tmp_path)
    env_specs.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    env_specs.cache_clear()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"ok.yaml": SPEC.format(id="rlbd/Ok-v0"), "bad.yaml": "id: rlbd/Bad-v0\nbase: [unclosed\n"},
            "bad.yaml: invalid YAML at line",
        ),
        (
            {"bad.yaml": SPEC.format(id="rlbd/Bad-v0").replace("0.01", "1.5")},
            "bad.yaml: schedule.rate: Input should be less",
        ),
        ({"bad.yaml": SPEC.format(id="not-an-id")}, "bad.yaml: id: String should match pattern"),
        (
            {"a.yaml": SPEC.format(id="rlbd/Same-v0"), "b.yaml": SPEC.format(id="rlbd/Same-v0")},
            "b.yaml: id 'rlbd/Same-v0' is already used",
        ),
    ],
    ids=["yaml-syntax", "bad-rate", "bad-id", "duplicate-id"],
)
@pytest.mark.parametrize("argv", [["envs", "list"], ["envs", "show", "rlbd/Ok-v0"]], ids=["list", "show"])
def test_malformed_spec_file_exits_2_with_one_line(
    envs_dir: Path, capsys: pytest.CaptureFixture[str], files: dict[str, str], message: str, argv: list[str]
) -> None:
    for name, text in files.items():
        (envs_dir / name).write_text(text)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in _one_line_error(captured.err)
    assert str(envs_dir) in captured.err


def test_console_script_reports_errors_on_one_line() -> None:
    out = subprocess.run([RLBD, "envs", "show", "rlbd/Nope-v0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown backdoor env id 'rlbd/Nope-v0'" in _one_line_error(out.stderr)
    assert out.stdout == ""


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("train", "[default: runs/<name>/<timestamp>-<pid>]"),
        ("sanitize", "[default: drop]"),
        ("eval", "[default: WANDB_MODE"),
    ],
)
def test_help_shows_the_defaults_written_in_brackets(
    command: str, shown: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich read "[default: ...]" as a markup tag and printed nothing of it
    assert main([command, "--help"]) == 0
    assert shown in capsys.readouterr().out
