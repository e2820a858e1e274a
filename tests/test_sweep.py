"""``rlbd sweep``: W&B sweep files expanded locally, commands built as ``wandb agent`` builds them, real runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
from wandb_offline import offline_runs

from rlbackdoor.bench.sweep import Sweep
from rlbackdoor.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "experiments" / "cartpole_smoke.yaml"


def write_sweep(path: Path, **fields: Any) -> Path:
    config = {
        "name": "smoke",
        "program": "rlbd",
        "command": ["rlbd", "train", str(SMOKE), "${args}"],
        "method": "grid",
        "parameters": {"attack.schedule.rate": {"values": [0.1, 0.2]}, "seed": {"values": [0, 1, 2]}},
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_grid_expansion_and_every_macro_as_wandb_agent_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLBD_TEST_FLAG", "--no-progress")
    command = [
        "${env}",
        "${interpreter}",
        "${program}",
        "train",
        str(SMOKE),
        "${envvar:RLBD_TEST_FLAG}",
        "${args}",
        "${args_no_hyphens}",
        "${args_no_equals}",
        "${args_json}",
        "${not_a_macro}",
        "x${args}",
    ]
    sweep = Sweep(write_sweep(tmp_path / "s.yaml", command=command, program="-m rlbackdoor"))
    points = sweep.points()
    assert points == [{"attack.schedule.rate": r, "seed": s} for r in (0.1, 0.2) for s in (0, 1, 2)]
    assert sweep.points(count=4) == points[:4]
    point = points[5]
    wandb_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    assert sweep.command_for(point) == [
        "/usr/bin/env",
        "python",
        "-m rlbackdoor",
        "train",
        str(SMOKE),
        "--no-progress",
        *wandb_vars["args"],
        *wandb_vars["args_no_hyphens"],
        *wandb_vars["args_no_equals"],
        *wandb_vars["args_json"],
        "x${args}",  # only whole-word macros are replaced, as in wandb agent
    ]
    assert wandb_vars["args"] == ["--attack.schedule.rate=0.2", "--seed=2"]
    assert json.loads(wandb_vars["args_json"][0]) == point


def test_random_draws_are_seeded_and_within_bounds(tmp_path: Path) -> None:
    parameters = {
        "hyperparams.learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
        "hyperparams.n_epochs": {"min": 1, "max": 4},
        "hyperparams.gamma": {"min": 0.9, "max": 0.99},
        "hyperparams.ent_coef": {"values": [0.0, 0.01]},
        "seed": {"value": 7},
    }
    sweep = Sweep(write_sweep(tmp_path / "s.yaml", method="random", parameters=parameters, run_cap=5))
    points = sweep.points(count=50, seed=3)
    assert len(points) == 5 and points == sweep.points(count=50, seed=3) and points != sweep.points(seed=4)
    for p in points:
        assert 1e-5 <= p["hyperparams.learning_rate"] <= 1e-2
        assert isinstance(p["hyperparams.n_epochs"], int) and 1 <= p["hyperparams.n_epochs"] <= 4
        assert 0.9 <= p["hyperparams.gamma"] <= 0.99 and p["hyperparams.ent_coef"] in (0.0, 0.01) and p["seed"] == 7
    assert sweep.command_for(points[0])[-1] == "--seed=7"


def one_random(name: str, **spec: Any) -> dict[str, Any]:
    """Fields of a one-run random sweep over one parameter."""
    return {"method": "random", "run_cap": 1, "parameters": {name: spec}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "bayes"}, "method bayes needs the W&B sweep server; run it with wandb sweep + wandb agent"),
        ({"method": "hyperband"}, "method 'hyperband' is not a sweep method; use grid or random"),
        ({"parameters": {"learning_rate": {"values": [0.1]}}}, "parameter 'learning_rate' does not fit"),
        ({"parameters": {"attack.schedule.rte": {"values": [0.1]}}}, "parameter 'attack.schedule.rte' does not fit"),
        ({"parameters": {"seed": {"values": [-1]}}}, "parameter 'seed' does not fit"),
        ({"parameters": {"hyperparams": {"parameters": {"gamma": {"value": 0.9}}}}}, "name nested fields with dots"),
        ({"parameters": {"seed": {"min": 0, "max": 3}}}, "a grid sweep needs value or values"),
        ({"method": "random", "parameters": {"seed": {"distribution": "beta", "min": 0, "max": 1}}}, "'beta'"),
        ({"method": "random"}, "a random sweep runs until stopped; give --count N"),
        (one_random("attack.schedule.rate", min=0.5, max=0.1), "'attack.schedule.rate': min 0.5 and max 0.1 are not"),
        (one_random("attack.schedule.rate", min=0.1, max=float("nan")), "min 0.1 and max nan are not a range"),
        (one_random("hyperparams.learning_rate", distribution="log_uniform_values", min=0, max=1), "needs min > 0"),
        ({"metrics": {"name": "x"}}, "unknown key 'metrics'"),
        ({"command": ["python", "train.py", "${args}"]}, "the command runs neither 'rlbd train CONFIG'"),
        ({"command": ["rlbd", "train", "nowhere.yaml", "${args}"]}, "the command's config nowhere.yaml does not exist"),
        ({"command": ["${program}", "train", str(SMOKE)], "program": None}, "uses ${program} but the file has no"),
        ({"program": 3}, "program 3 is not a string; name the script the command runs"),
        ({"program": ["rlbd", "train"]}, "program ['rlbd', 'train'] is not a string"),
        (
            {"parameters": {"seed": {"values": [0, 1]}, "attack.schedule.rate": {"values": [0.1, 0.2, 5.0]}}},
            "parameter 'attack.schedule.rate' does not fit",
        ),
        ({"parameters": {"attack.schedule.rate": {"values": [0.1, 5.0]}}}, "with value 5.0 ("),
        (
            {"parameters": {"hyperparams.learning_rate": {"values": [1e-3, 2.0]}}},
            "with value 2.0 (hyperparams.learning_rate: 2.0 is not in (0, 1]",
        ),
        (one_random("hyperparams.batch_size", min=0, max=64), "with value 0 (hyperparams.batch_size: 0 is not a count"),
        (one_random("attack.schedule.rate", min=0.5, max=2.0), "'attack.schedule.rate' does not fit"),
        (one_random("seed", min=0, max=2**40), "parameter 'seed' does not fit"),
        (one_random("attack.schedule.rate", distribution="log_uniform", min=-5, max=1), "with value 2.718"),
        (one_random("n_envs", distribution="q_uniform", min=8, max=2000, q=8), "with value 2000 ("),
        # a float distribution on an integer field: its ends are whole, the draws inside are not
        (one_random("n_envs", distribution="uniform", min=1, max=8), "'n_envs' does not fit"),
        (one_random("n_envs", min=1.0, max=9.0), "with value 4.05572809"),  # the midpoint, 5.0, would pass
        (one_random("n_envs", distribution="log_uniform_values", min=1, max=8), "'n_envs' does not fit"),
        (one_random("n_envs", distribution="normal", mu=4, sigma=1), "with value 4.381966"),
    ],
)
def test_bad_sweep_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict, message: str) -> None:
    path = write_sweep(tmp_path / "s.yaml", **fields)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"parameters": {"seed": {"values": [0, 1]}, "hyperparams.learning_rat": {"values": [1e-3, 3e-4]}}},
        one_random("hyperparams.learning_rat", distribution="log_uniform_values", min=1e-4, max=1e-2),
        {
            "command": ["rlbd", "bench", str(ROOT / "configs" / "bench" / "small.yaml"), "${args}"],
            "parameters": {"hyperparams.learning_rat": {"value": 1e-3}},
        },
    ],
    ids=["grid", "random", "bench"],
)
def test_hyperparameters_sb3_does_not_take_are_refused_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fields: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default sweep folder and run directories would land here
    path = write_sweep(tmp_path / "s.yaml", **fields)
    assert main(["sweep", str(path), "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: parameter 'hyperparams.learning_rat' does not fit" in err
    assert "(hyperparams.learning_rat: no such hyperparameter of SB3 PPO" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_values_are_checked_alone_and_combinations_left_to_the_runs(tmp_path: Path) -> None:
    # a2c takes no batch_size (the config's), but every run also sets hyperparams; one run has n_envs 1 with n_steps 1,
    # which SB3 refuses, but no run of the sweep does
    command = ["rlbd", "train", str(SMOKE), "--no-progress", "--checkpoint-every=0", "--wandb-mode=disabled", "${args}"]
    parameters = {
        "algo": {"value": "a2c"},
        "hyperparams": {"value": {"n_steps": 1, "learning_rate": 0.001}},
        "n_envs": {"value": 2},
        "timesteps": {"value": 64},
    }
    path = write_sweep(tmp_path / "s.yaml", name="combos", command=command, parameters=parameters)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("name", ["../escape", "a/b", "/tmp/abs", "..", ".hidden", "two words"])
def test_sweep_names_that_are_not_folder_names_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path / "s.yaml", name=name)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: name '{name}' is not a folder name (runs/sweeps/<name>)" in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]  # no runs/ folder, inside runs/sweeps/ or out of it


def test_bad_out_paths_are_refused_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path / "s.yaml")
    for out, message in [(path, "is a file, not a folder"), (path / "out", f"{path} is a file, not a folder")]:
        assert main(["sweep", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {message}" in err and err.count("\n") == 1 and "Traceback" not in err


def test_seed_of_a_grid_and_relative_configs_outside_their_folder_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = ROOT / "configs" / "sweeps" / "cartpole_smoke_grid.yaml"
    monkeypatch.chdir(ROOT)
    assert main(["sweep", str(grid), "--seed", "3", "--out", str(tmp_path / "o")]) == 2  # it was ignored
    assert (
        "--seed seeds the draws of a random sweep; a grid sweep draws nothing: drop --seed" in capsys.readouterr().err
    )
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(grid)]) == 2
    assert f"does not exist (from {tmp_path}: commands run in the current folder); fix" in capsys.readouterr().err


def test_repository_sweep_files_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # their commands name configs relative to the repository
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        sweep = Sweep(path)
        command = sweep.command_for(sweep.points(count=2)[0])
        assert command[0] == "rlbd" and command[1] in ("train", "bench") and command[-1].startswith("--"), path


def test_two_run_sweep_runs_rlbd_train_offline_in_the_sweep_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.chdir(tmp_path)  # rlbd train's default run directories land under runs/ here
    command = ["rlbd", "train", str(SMOKE), "--no-progress", "--checkpoint-every=0", "${args}"]
    parameters = {"attack.schedule.rate": {"values": [0.05, 0.2]}, "timesteps": {"value": 512}}
    path = write_sweep(tmp_path / "s.yaml", name="smoke-grid", command=command, parameters=parameters)
    assert main(["sweep", str(path), "--out", str(tmp_path / "sweep")]) == 0
    assert "2 runs, 0 failed" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "sweep" / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1] and all(r["returncode"] == 0 for r in records)
    cards = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("cartpole_smoke/*/card.json"))]
    assert sorted(c["attack"]["schedule"]["rate"] for c in cards) == [0.05, 0.2]
    run_dirs = sorted(str(p.parent.resolve()) for p in (tmp_path / "runs").glob("cartpole_smoke/*/card.json"))
    assert sorted(r["run_dir"] for r in records) == run_dirs  # each run's directory, as rlbd train printed it
    assert main(["sweep", str(path), "--out", str(tmp_path / "sweep")]) == 2  # the records stay one sweep's
    assert "it holds the runs of an earlier sweep (runs.jsonl); pick another folder" in capsys.readouterr().err
    assert all(c["timesteps"] == 512 for c in cards)
    runs = offline_runs(wandb_dir)
    assert len(runs) == 2 and all(r.run.run_group == "smoke-grid" and r.run.job_type == "train" for r in runs)
    assert all(list(r.run.tags) == ["sweep"] for r in runs)
    assert sorted(r.config["attack"]["schedule"]["rate"] for r in runs) == [0.05, 0.2]


@pytest.mark.parametrize(
    ("parameter", "message"),
    [
        ({"distribution": "normal", "sigma": -1}, "sigma -1 is not a finite number >= 0"),
        ({"distribution": "normal", "mu": "x"}, "mu 'x' is not a finite number"),
        ({"distribution": "q_uniform", "min": 0, "max": 1, "q": 0}, "q 0 is not a finite number > 0"),
        ({"values": [0, 1], "probabilities": [0.9, 0.9]}, "probabilities [0.9, 0.9] are not one weight"),
        ({"values": [0, 1], "probabilities": [1.0]}, "probabilities [1.0] are not one weight"),
        ({"distribution": "int_uniform", "min": 0, "max": 10**30}, "int_uniform needs integer min and max"),
        ({"min": 0, "max": 10**400}, "min 0 and max 1000"),
        ({"distribution": "normal", "mu": 10**400}, f"mu {10**400} is not a finite number; fix it"),
        (
            {"distribution": "log_uniform", "min": -1000, "max": 1000},
            "log_uniform draws inf, not a finite number; min and max are exponents of e: keep max below 709",
        ),
        ({"distribution": "q_uniform", "min": 0, "max": 1e300, "q": 1e-300}, "q_uniform draws inf, not a finite"),
    ],
)
def test_distribution_parameters_are_checked_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parameter: dict[str, Any], message: str
) -> None:
    path = write_sweep(tmp_path / "s.yaml", method="random", parameters={"seed": parameter})
    assert main(["sweep", str(path), "--count", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: parameter 'seed': {message}" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cap", [1.5, "abc", -3, 0, True, 10_001])
def test_run_caps_that_are_not_counts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], cap: Any) -> None:
    path = write_sweep(tmp_path / "s.yaml", run_cap=cap)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"run_cap {cap!r} is not a whole number in 1..10000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(path), "--count", "10001", "--out", str(tmp_path / "out")]) == 2
    assert "'--count': Input should be less than or equal to 10000" in capsys.readouterr().err


def test_float_distributions_that_draw_whole_numbers_fit_integer_fields(tmp_path: Path) -> None:
    parameters = {
        "n_envs": {"distribution": "q_uniform", "min": 1, "max": 8},
        "timesteps": {"distribution": "q_log_uniform_values", "min": 512, "max": 4096, "q": 512},
    }
    sweep = Sweep(write_sweep(tmp_path / "s.yaml", method="random", parameters=parameters))
    points = sweep.points(count=20, seed=1)
    assert all(float(p["n_envs"]).is_integer() and 1 <= p["n_envs"] <= 8 for p in points)
    assert all(p["timesteps"] % 512 == 0 for p in points)


def test_grids_larger_than_the_run_limit_are_refused_before_they_are_expanded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    values = list(range(101))
    path = write_sweep(tmp_path / "s.yaml", parameters={"seed": {"values": values}, "n_envs": {"values": values}})
    checked = []
    monkeypatch.setattr("rlbackdoor.bench.sweep.Sweep._check_fields", lambda self: checked.append(self))
    assert main(["sweep", str(path), "--count", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: the grid has 10,201 points, more than the 10,000 runs a local sweep starts" in err
    assert err.count("\n") == 1 and "Traceback" not in err and not checked  # no config was loaded
    assert not (tmp_path / "out").exists()
    exact = write_sweep(
        tmp_path / "e.yaml", parameters={"seed": {"values": values[:100]}, "n_envs": {"values": values[:100]}}
    )
    assert Sweep(exact).points(count=3) == [{"n_envs": 0, "seed": s} for s in range(3)]  # fields in file order
