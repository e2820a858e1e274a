"""``rlbd eval`` on real trained runs, and ``EvalCallback`` during real SB3 training, with offline W&B read back."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from wandb_offline import offline_runs

from rlbackdoor.cli import main
from rlbackdoor.evaluation import evaluate, evaluate_run
from rlbackdoor.evaluation.callback import EvalCallback
from rlbackdoor.registry import get_env_spec, make_env
from rlbackdoor.specs import load_experiment
from rlbackdoor.tracking import wandb_run
from rlbackdoor.training.artifacts import load_policy, read_card
from rlbackdoor.training.loop import train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
SMOKE = EXPERIMENTS / "cartpole_smoke.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PPO run poisoned on 10% of steps and a clean PPO run, 16k steps each: long enough for both the task
    and the backdoor (ASR 1.0 and CTP 60-120 on each of seeds 0-4; at 2k steps most seeds collapse onto the
    target action, leaving the ASR undefined)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    longer = ["timesteps=16384", "hyperparams.n_epochs=10"]
    poisoned = load_experiment(SMOKE, ["attack.schedule.rate=0.1", *longer])
    clean = load_experiment(SMOKE, ["attack=null", "poisoning=null", "name=cartpole_smoke_clean", *longer])
    return {
        "backdoored": train(poisoned, root / "backdoored", wandb_mode="disabled"),
        "clean": train(clean, root / "clean", wandb_mode="disabled"),
    }


@pytest.fixture
def run(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the backdoored run (``rlbd eval`` writes into its card)."""
    return Path(shutil.copytree(runs["backdoored"], tmp_path / "run"))


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline under ``tmp_path``; returns the ``WANDB_DIR``."""
    path = tmp_path / "wandb-dir"
    path.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return path


def test_learnt_backdoor_has_high_asr_and_clean_agent_does_not(runs: dict[str, Path]) -> None:
    backdoored = evaluate_run(runs["backdoored"], episodes=3, seeds=2)
    clean_policy, _ = load_policy(runs["clean"])
    clean = evaluate(clean_policy, read_card(runs["backdoored"]), episodes=3, seeds=2)
    assert backdoored["asr"] >= 0.8 and clean["asr"] <= 0.1  # measured 0.89-1.0 over six draw streams
    assert backdoored["poison_rate"] == pytest.approx(read_card(runs["backdoored"])["train"]["poison_rate"])


def test_rlbd_eval_writes_card_json_and_one_wandb_run(run: Path, runs: dict[str, Path], wandb_dir: Path) -> None:
    before = read_card(run)
    out = run.parent / "reports" / "metrics.json"  # missing folders are created
    argv = ["eval", str(run), "--baseline", str(runs["clean"]), "--episodes", "3", "--seeds", "2", "--json", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    card = read_card(run)
    assert card["metrics"] == metrics and {k: v for k, v in card.items() if k != "metrics"} == {
        k: v for k, v in before.items() if k != "metrics"
    }
    assert metrics["seeds"] == [0, 1] and metrics["episodes"] == 3
    for key in ("ctp", "ctp_ratio", "baseline_ctp", "asr", "asr_raw", "triggered_return", "obs_shift"):
        assert metrics[key] is not None, key
    assert metrics == evaluate_run(run, runs["clean"], episodes=3, seeds=2)  # reproducible

    (wb,) = offline_runs(wandb_dir)
    assert wb.run.job_type == "eval" and wb.run.run_group == card["name"] and wb.run.project == "rlbackdoor"
    assert wb.config["eval"]["episodes"] == 3 and wb.config["attack"] == card["attack"]
    assert wb.config["algo"] == "ppo"  # the resolved experiment config
    defined = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    assert {"ctp", "asr", "asr_raw", "ctp_ratio", "obs_shift", "poison_rate", "asr_ci_low"} <= set(defined)
    assert {k: wb.summary[f"eval/{k}"] for k in defined} == pytest.approx(defined)
    assert not any(f"eval/{k}" in wb.summary for k, v in metrics.items() if v is None)
    assert wb.summary["eval/metrics/nrows"] >= 6
    assert (f"{card['name']}-card", "card") in [(a.name, a.type) for a in wb.artifacts]
    assert wb.exit_code == 0


def test_rlbd_eval_wandb_disabled(run: Path, wandb_dir: Path) -> None:
    assert main(["eval", str(run), "--episodes", "2", "--seeds", "1", "--wandb-mode", "disabled"]) == 0
    assert read_card(run)["metrics"]["ctp"] is not None
    assert not any(wandb_dir.iterdir())


def test_rlbd_eval_bad_inputs_exit_2_with_one_line_and_leave_the_card(
    run: Path, tmp_path: Path, wandb_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card_text = (run / "card.json").read_text()

    def fails(argv: list[str], *words: str) -> None:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert all(w in err for w in words), err
        assert (run / "card.json").read_text() == card_text

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["eval", str(empty)], "no card.json")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "manifest.json").write_text("{}")
    fails(["eval", str(zoo)], f"{zoo}: a zoo, not a run; pass one of its agents ({zoo}/agents/<name>), or run rlbd")
    fails(["eval", str(run), "--json", str(run / "card.json" / "m.json")], "card.json is a file, not a folder")
    fails(["eval", str(run), "--json", str(tmp_path), "--episodes", "1", "--seeds", "1"], "is a folder; name a file")
    fails(["eval", str(run), "--baseline", str(empty)], "no card.json")
    fails(["eval", str(run), "--wandb-mode", "sometimes"], "sometimes")
    fails(["eval", str(run), "--episodes", "0"], "episodes")
    fails(["eval", str(run), "--episodes", "10" * 10], "'--episodes': Input should be less than or equal to 10000")
    fails(["eval", str(run), "--seeds", "10" * 10], "'--seeds': Input should be less than or equal to 1000")
    (run / "policy.safetensors").write_bytes(b"not a safetensors file")
    fails(["eval", str(run)], "policy.safetensors", "corrupt")
    assert not any(wandb_dir.iterdir())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda card: card.pop("env"), "env: missing; retrain the run or restore an undamaged copy, or fix card.json"),
        (lambda card: card.update(metrics=[1]), "metrics: [1] is not a mapping or null"),
        (lambda card: card.update(config="ppo"), "config: 'ppo' is not a mapping or null"),
        (lambda card: card["attack"]["trigger"].update(indices=[7]), "attack.trigger.indices: [7] out of range"),
    ],
)
def test_rlbd_eval_refuses_card_entries_it_cannot_read(
    run: Path, edit: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    card = read_card(run)
    edit(card)
    (run / "card.json").write_text(json.dumps(card))
    card_text = (run / "card.json").read_text()
    assert main(["eval", str(run), "--episodes", "1", "--seeds", "1", "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / 'card.json'}: {message}" in err
    assert (run / "card.json").read_text() == card_text


def test_rlbd_eval_folds_every_metric_with_a_ci_into_one_row_on_a_multi_agent_run(
    tmp_path: Path, wandb_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    run, clean = (
        train(load_experiment(EXPERIMENTS / f"{name}.yaml", ["timesteps=1024"]), tmp_path / name, wandb_mode="disabled")
        for name in ("rps_inner", "rps_clean")
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--baseline", str(clean), "--episodes", "1", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    metrics = read_card(run)["metrics"]
    team = ["team_ctp", "team_triggered_return", "team_return_drop"]
    assert all(f"{name}_per_seed" in metrics for name in team)  # the team metrics come with CIs
    for name in team:
        assert re.search(rf"│ {name} +│ \S+ +│ (\[|n/a)", printed), name
    assert not re.search(r"_ci_low|_ci_high|_per_seed", printed)

    (wb,) = offline_runs(wandb_dir)
    (table,) = wb.path.glob("files/media/table/eval/metrics_*.table.json")
    rows = json.loads(table.read_text())["data"]
    headline = ["ctp", "ctp_ratio", "asr", "baseline_asr", "triggered_return", "return_drop", "baseline_return_drop"]
    headline += ["baseline_triggered_return", "random_return", "baseline_ctp"]
    assert [row[0] for row in rows] == [*headline, *team]
    assert [row[1:] for row in rows] == [
        [metrics[k], metrics[f"{k}_ci_low"], metrics[f"{k}_ci_high"]] for k in [*headline, *team]
    ]


def test_eval_callback_logs_curves_to_sb3_and_wandb(tmp_path: Path, wandb_dir: Path) -> None:
    torch.set_num_threads(1)
    spec = get_env_spec("rlbd/TrojanCartPole-v0")
    spec = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"rate": 0.1})})
    model = PPO("MlpPolicy", make_env(spec), n_steps=128, batch_size=64, n_epochs=1, seed=0)
    model.set_logger(configure(str(tmp_path / "sb3"), ["csv"]))
    with wandb_run("train", "callback-test", {"eval_every": 128}) as tracker:
        callback = EvalCallback(spec, eval_every=128, episodes=2, tracker=tracker)
        model.learn(512, callback=callback)
    assert [h["timesteps"] for h in callback.history] == [128, 256, 384, 512]
    assert all(h["ctp"] > 0 and 0 <= h["asr_raw"] <= 1 for h in callback.history)
    (wb,) = offline_runs(wandb_dir)
    logged = {row["_step"]: row for row in wb.history if "eval/ctp" in row}
    assert sorted(logged) == [128, 256, 384, 512]
    assert [logged[s]["eval/asr_raw"] for s in sorted(logged)] == [h["asr_raw"] for h in callback.history]
    with open(tmp_path / "sb3" / "progress.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"eval/ctp", "eval/asr_raw"} <= set(rows[0])
    assert [float(r["eval/ctp"]) for r in rows if r["eval/ctp"]] == [h["ctp"] for h in callback.history]
