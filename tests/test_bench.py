"""``rlbd bench``: matrix expansion and validation, a real bench killed and resumed, failed cells, the Ray backend."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from wandb_offline import offline_runs

from rlbackdoor.bench.cells import run_cell
from rlbackdoor.bench.matrix import expand, load_bench
from rlbackdoor.bench.runner import read_results
from rlbackdoor.cli import main
from rlbackdoor.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "bench" / "small.yaml"
TINY_HYPERPARAMS = {"n_steps": 64, "batch_size": 128, "n_epochs": 2, "policy_kwargs": {"net_arch": [32, 32]}}


def write_bench(path: Path, **fields: Any) -> Path:
    """A seconds-long bench on rlbd/TrojanCartPole-v1 (2048 PPO steps per agent), with ``fields`` over it."""
    config = {
        "name": "tiny",
        "envs": ["rlbd/TrojanCartPole-v1"],
        "poisoning": ["inner"],
        "poison_rates": [0.1],
        "algo": "ppo",
        "timesteps": 2048,
        "n_envs": 4,
        "hyperparams": TINY_HYPERPARAMS,
        "seeds": 1,
        "eval": {"episodes": 2, "seeds": 2},
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ expansion
def test_small_matrix_cells_ids_and_dependencies() -> None:
    spec = load_bench(SMALL)
    cells = expand(spec, SMALL.parent)
    kinds = [c.kind for c in cells]
    # per seed: 1 clean + 2 attacks x 2 rates, a sanitizer cell per backdoored agent, a detector cell
    assert (kinds.count("train"), kinds.count("sanitize"), kinds.count("detect")) == (10, 8, 2)
    assert len({c.id for c in cells}) == len(cells)
    assert [c.id for c in expand(spec, SMALL.parent)] == [c.id for c in cells]  # stable
    by_id = {c.id: c for c in cells}
    for cell in cells:  # every dependency comes earlier, and is a train cell of the same env and seed
        for need in cell.needs:
            assert need in by_id and list(by_id).index(need) < list(by_id).index(cell.id)
            assert by_id[need].kind == "train" and by_id[need].labels["seed"] == cell.labels["seed"]
    backdoored = [c for c in cells if c.kind == "train" and c.labels["poisoning"] != "clean"]
    assert {(c.labels["poisoning"], c.labels["poison_rate"]) for c in backdoored} == {
        (p, r) for p in ("inner", "outer") for r in (0.01, 0.05)
    }
    assert all(c.config["experiment"]["attack"]["schedule"]["rate"] == c.labels["poison_rate"] for c in backdoored)
    assert all(c.config["experiment"]["timesteps"] == 20000 for c in backdoored)
    detect = [c for c in cells if c.kind == "detect"]
    assert all(sorted(c.config["population"].values()) == [False, True, True, True, True] for c in detect)
    # ids follow the resolved config: more timesteps change every cell, another detector only the detect cells
    longer = expand(load_bench(SMALL, ["timesteps=30000"]), SMALL.parent)
    assert not {c.id for c in longer} & set(by_id)
    other = expand(load_bench(SMALL, ["defenses.detectors=[reverse]"]), SMALL.parent)
    assert {c.id for c in other if c.kind != "detect"} == {c.id for c in cells if c.kind != "detect"}


def test_rates_of_a_budget_schedule_from_an_experiment_config(tmp_path: Path) -> None:
    bench = write_bench(tmp_path / "b.yaml", envs=[str(ROOT / "configs/experiments/cartpole_inner.yaml")])
    bench.write_text(bench.read_text().replace("- 0.1", "- 0.002"))
    cells = expand(load_bench(bench), tmp_path)
    (poisoned,) = [c for c in cells if c.labels["poisoning"] == "inner"]
    schedule = poisoned.config["experiment"]["attack"]["schedule"]
    assert schedule == {"kind": "budget", "budget": 200, "horizon": 100000, "duration": 1}
    assert poisoned.labels == {
        "env": "cartpole_inner",
        "poisoning": "inner",
        "poison_rate": 0.002,
        "seed": 0,
        "defense": "none",
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("defenses.detectors=[nope]", "unknown detector 'nope'; use one of"),
        ("defenses.sanitizers=[nope]", "unknown sanitizer 'nope'; use one of"),
        ("envs=[rlbd/Nope-v0]", "{bench}: envs: unknown env 'rlbd/Nope-v0'; use a registered id"),
        ("envs=[missing.yaml]", "experiment config 'missing.yaml' not found"),
        ("poisonning=[inner]", "'--poisonning=[inner]' is neither an option (see --help) nor a config field"),
        ("poison_rates=[0]", "poison_rates [0.0] must lie in (0, 1]"),
        ("poisoning=[sideways]", "poisoning.0: Input should be 'inner' or 'outer'"),
        ("algo=null", "{bench}: env rlbd/TrojanCartPole-v1: algo: Field required (fix: add this field)"),
        ("eval.episodes=100000000000000000000", "eval.episodes: Input should be less than or equal to 10000"),
        ("eval.seeds=1001", "eval.seeds: Input should be less than or equal to 1000"),
        ("defenses.n_clean=100000000000000000000", "defenses.n_clean: Input should be less than or equal to 1000000"),
        ("timesteps=100000000000000000000", "timesteps: Input should be less than or equal to 1000000000"),
        ("poison_rates=[]", "poison_rates: List should have at least 1 item after validation, not 0"),
        ("seeds=true", "seeds: Input should be a valid integer"),
        ("seeds=[0, true]", "seeds.1: Input should be a valid integer"),
        ("seeds=[0, 0]", "seeds: seeds lists 0 twice; name each once"),
        ("seeds=5000", "seeds: Input should be less than or equal to 1000 (fix: give a smaller value)"),
        (f"seeds=[{', '.join(map(str, range(1001)))}]", "seeds: List should have at most 1000 items after validation"),
        ("seeds=[]", "seeds: List should have at least 1 item after validation, not 0"),
        ("seeds=[-1]", "seeds.0: Input should be greater than or equal to 0"),
        ("seeds=[4294967296]", "seeds.0: Input should be less than or equal to 4294967295"),
        ("eval.seeds=true", "eval.seeds: Input should be a valid integer"),
        ("defenses.detectors=[probe, probe]", "detectors lists probe twice"),
        ("envs=[rlbd/TrojanRPS-v0]", "is multi-agent; poison_rates, sanitizers and detectors apply to single-agent"),
    ],
)
def test_bad_bench_configs_fail_before_any_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    bench = write_bench(tmp_path / "b.yaml", defenses={"detectors": ["probe"]})
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--out", str(out), f"--{override}"]) == 2
    err = capsys.readouterr().err
    assert message.replace("{bench}", str(bench)) in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_backends_fail_before_any_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = write_bench(tmp_path / "b.yaml")
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--out", str(out), "--backend", "ray", "--ray-address", "127.0.0.1:1"]) == 2
    assert "Ray cluster at 127.0.0.1:1 is unreachable" in capsys.readouterr().err
    assert main(["bench", str(bench), "--out", str(out), "--backend", "dask"]) == 2
    assert "unknown backend 'dask'; use one of local, ray" in capsys.readouterr().err
    assert main(["bench", str(bench), "--out", str(out), "--ray-address", "127.0.0.1:1"]) == 2
    assert "--ray-address needs --backend ray" in capsys.readouterr().err
    assert not out.exists()


def test_bad_out_paths_fail_before_any_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = write_bench(tmp_path / "b.yaml")

    def refused(out: Path, message: str) -> None:
        assert main(["bench", str(bench), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {message}" in err and err.count("\n") == 1 and "Traceback" not in err

    refused(bench, "is a file, not a folder")
    refused(bench / "out", f"{bench} is a file, not a folder")
    refused(bench / "deeper" / "out", f"{bench} is a file, not a folder")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    refused(tmp_path / "new" / "out", f"folder {tmp_path} is not writable")
    assert not (tmp_path / "new").exists() and bench.is_file()


# ------------------------------------------------------------------------------------- a real bench
def test_bench_killed_midway_resumes_without_recomputing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bench SIGKILLed after its first result line, restarted: finished cells are skipped, the rest run,
    and the report (CSV, markdown, plots, one W&B bench run) covers the whole matrix."""
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    bench = write_bench(
        tmp_path / "b.yaml", defenses={"sanitizers": ["support"], "detectors": ["probe"], "n_clean": 64}
    )
    out = tmp_path / "out"
    results = out / "results.jsonl"
    rlbd = Path(sys.executable).parent / "rlbd"
    command = [str(rlbd), "bench", str(bench), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (results.is_file() and results.read_text().count("\n") >= 1):
        assert proc.poll() is None, "the bench ended before writing a result"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = lines(results)
    assert 1 <= len(before) < 4 and all(r["status"] == "ok" for r in before)
    first = before[0]
    card = Path(first["metrics"]["run_dir"]) / "card.json"
    card_mtime = card.stat().st_mtime_ns

    assert main(["bench", str(bench), "--out", str(out), "--workers", "2"]) == 0
    stdout = capsys.readouterr().out
    assert f"4 cells: computed {4 - len(before)}, skipped {len(before)} finished, failed 0" in stdout
    after = lines(results)
    assert after[: len(before)] == before  # finished lines untouched
    assert len(after) == 4 and len({r["id"] for r in after}) == 4  # no cell computed twice
    assert card.stat().st_mtime_ns == card_mtime  # the finished agent was not retrained
    assert not list((out / "runs").glob(".*"))  # no half-written artifact left behind
    records = read_results(results)
    kinds = sorted(r["kind"] for r in records.values())
    assert kinds == ["detect", "sanitize", "train", "train"] and all(r["status"] == "ok" for r in records.values())
    poisoned = next(r for r in records.values() if r["kind"] == "train" and r["poisoning"] == "inner")
    assert 0.0 <= poisoned["metrics"]["asr_raw"] <= 1.0 and poisoned["metrics"]["ctp_ratio"] is not None
    detect = next(r for r in records.values() if r["kind"] == "detect")
    assert 0.0 <= detect["metrics"]["auroc"] <= 1.0 and len(detect["metrics"]["scores"]) == 2

    # a cell's result does not depend on what its worker ran before (the sanitizer's clean rollouts sample actions)
    sanitized = next(c for c in json.loads((out / "bench.json").read_text())["cells"] if c["kind"] == "sanitize")
    torch.rand(7)
    again = run_cell(sanitized, str(out))
    assert again["status"] == "ok" and again["metrics"] == records[sanitized["id"]]["metrics"]

    rows = list(csv.DictReader((out / "results.csv").open()))
    metrics = {(r["kind"], r["poisoning"], r["metric"]): r for r in rows}
    assert float(metrics["train", "inner", "ctp_ratio"]["iqm"]) == pytest.approx(poisoned["metrics"]["ctp_ratio"])
    assert float(metrics["detect", "all", "auroc"]["iqm"]) == pytest.approx(detect["metrics"]["auroc"])
    assert {"ctp", "ctp_ratio", "asr_raw"} <= {m for k, p, m in metrics if k == "train"}
    assert {"ctp_after", "ctp_ratio_after"} <= {m for k, p, m in metrics if k == "sanitize"}
    markdown = (out / "results.md").read_text()
    assert "## Agents" in markdown and "## Sanitizers (run time)" in markdown and "## Detectors" in markdown
    for name in ("asr_ctp_vs_rate", "sanitizers", "roc_probe"):
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 200

    (run,) = [r for r in offline_runs(wandb_dir) if r.run.job_type == "bench"]  # the killed bench never reported
    assert run.run.run_group == "tiny" and run.exit_code == 0
    assert run.summary["bench/cells"] == 4 and run.summary["bench/cells_ok"] == 4
    assert run.summary["bench/results/nrows"] == len(rows)
    assert run.summary["bench/roc_probe/_type"] == "image-file"
    assert run.config["defenses"]["detectors"] == ["probe"]

    # hostile lines: a finished cell whose record is malformed runs again, other malformed lines are skipped
    train = {**first, "metrics": {**first["metrics"], "ctp": 10**400}}
    hostile = [{**r, "metrics": "x"} if r["kind"] == "detect" else r for r in after] + [{"id": [1]}, train]
    results.write_text("".join(json.dumps(r) + "\n" for r in hostile))
    assert main(["bench", str(bench), "--out", str(out), "--wandb-mode", "disabled"]) == 0
    assert "4 cells: computed 1, skipped 3 finished, failed 0" in capsys.readouterr().out
    assert read_results(results)[detect["id"]]["metrics"]["auroc"] == detect["metrics"]["auroc"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["kind"], r["metric"]): r["per_seed"] for r in rows}["train", "ctp"].startswith("0:")


def test_failed_cell_is_retried_then_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell that fails (twice) is recorded, its dependants as failed too, and the rest completes. The failure here
    is an env whose agents SB3 rejects, let through the up-front check to stand for one that fails mid-training."""
    monkeypatch.setattr("rlbackdoor.training.loop.check_trainable", lambda spec: None)
    broken = yaml.safe_load((ROOT / "configs/experiments/cartpole_smoke.yaml").read_text())
    broken |= {"name": "broken", "hyperparams": {**broken["hyperparams"], "not_a_ppo_argument": 1}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    bench = write_bench(tmp_path / "b.yaml", envs=["broken.yaml", "rlbd/TrojanCartPole-v1"], hyperparams={})
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "4 cells: computed 2, skipped 0 finished, failed 2" in captured.out
    records = lines(out / "results.jsonl")
    assert len(records) == 4
    failed = [r for r in records if r["status"] == "failed"]
    assert {r["env"] for r in failed} == {"broken"}
    clean = next(r for r in failed if r["poisoning"] == "clean")
    assert clean["attempts"] == 2 and "not_a_ppo_argument" in clean["error"]
    dependant = next(r for r in failed if r["poisoning"] == "inner")
    assert dependant["error"] == f"needs cell {clean['id']}, which failed"
    assert all(r["status"] == "ok" for r in records if r["env"] == "rlbd/TrojanCartPole-v1")
    assert "## Failed cells" in (out / "results.md").read_text()


def test_ray_backend_runs_a_tiny_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = write_bench(tmp_path / "b.yaml")
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--out", str(out), "--workers", "2", "--backend", "ray"]) == 0
    assert "2 cells: computed 2, skipped 0 finished, failed 0" in capsys.readouterr().out
    records = lines(out / "results.jsonl")
    assert [r["poisoning"] for r in records] == ["clean", "inner"] and all(r["status"] == "ok" for r in records)
    assert all(r["pid"] != os.getpid() for r in records)  # ran in Ray workers
    assert records[1]["metrics"]["ctp_ratio"] is not None


@pytest.mark.parametrize(
    ("hyperparams", "message"),
    [
        ({"foo": 1}, "unexpected keyword argument 'foo'"),
        ({"n_steps": -4}, "hyperparams.n_steps: -4 is not a count"),
        ({"policy_kwargs": {"net_arch": [70000]}}, "net_arch.0: 70000 is not a layer size"),
    ],
)
def test_agents_that_cannot_train_fail_before_any_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hyperparams: dict[str, Any], message: str
) -> None:
    bench = write_bench(tmp_path / "b.yaml", hyperparams={**TINY_HYPERPARAMS, **hyperparams})
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"rlbd: error: {bench}: env rlbd/TrojanCartPole-v1: " in err and message in err and "Traceback" not in err
    assert not out.exists()


OK = {"id": "a", "kind": "train", "env": "e", "poisoning": "clean", "poison_rate": 0.0, "seed": 0, "defense": "none"}
OK |= {"status": "ok", "metrics": {"ctp": 500.0, "asr": None, "poison_rate": 0}}
HOSTILE = [
    {"id": [1], "status": "ok"},
    {**OK, "id": 1},
    {**OK, "kind": "other"},
    {**OK, "status": [1]},
    {**OK, "status": "failed", "error": {"a": [1]}},
    {k: v for k, v in OK.items() if k != "metrics"},
    {k: v for k, v in OK.items() if k != "seed"},
    {**OK, "seed": True},
    {**OK, "env": None},
    {**OK, "poison_rate": "x"},
    *({**OK, "metrics": m} for m in (None, [1], "x")),
    *({**OK, "metrics": {"ctp": v}} for v in ("x", [1], {"a": 1}, True, 10**400)),
    {**OK, "kind": "detect", "metrics": {"auroc": 0.5, "roc": {"fpr": [0.0], "tpr": [0.0, 1.0]}}},
    {**OK, "kind": "detect", "metrics": {"auroc": 0.5, "population_roc": {"fpr": ["x"], "tpr": [1]}}},
    {**OK, "kind": "detect", "metrics": {"auroc": 0.5, "roc": [1]}},
]


def test_read_results_skips_lines_that_are_not_records_and_refuses_unreadable_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line that is not JSON, or not a record of the shape the runner writes, is skipped: its cell runs again."""
    results = tmp_path / "results.jsonl"
    failed = {**OK, "id": "b", "status": "failed", "error": "boom"}
    detect = {**OK, "id": "c", "kind": "detect", "metrics": {"auroc": None, "roc": {"fpr": [0, 1], "tpr": [0, 1]}}}
    torn = ["[" * 100_000, '{"id": "b", "sta']
    hostile = [json.dumps({**h, "id": "b"} if isinstance(h.get("id"), str) else h) for h in HOSTILE]
    results.write_text("\n".join([*map(json.dumps, (OK, failed, detect)), *torn, *hostile]) + "\n")
    assert read_results(results) == {"a": OK, "b": failed, "c": detect}
    results.write_text("\n".join(json.dumps(h) for h in HOSTILE) + "\n")
    assert read_results(results) == {}
    monkeypatch.setattr("rlbackdoor.bench.runner.MAX_RESULTS_BYTES", 64)
    with pytest.raises(ArtifactError, match=r"results\.jsonl: unreadable \(larger than 64 bytes\); move it away"):
        read_results(results)


@pytest.mark.parametrize("damage", ["oversized", "folder"])
def test_a_bench_over_an_unreadable_results_file_fails_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    bench, out = write_bench(tmp_path / "b.yaml"), tmp_path / "out"
    out.mkdir()
    if damage == "folder":
        (out / "results.jsonl").mkdir()
    else:
        (out / "results.jsonl").write_text(json.dumps({"id": "x" * 100}) + "\n")
        monkeypatch.setattr("rlbackdoor.bench.runner.MAX_RESULTS_BYTES", 64)
    assert main(["bench", str(bench), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    reason = "not a regular file" if damage == "folder" else "larger than 64 bytes"
    assert f"{out / 'results.jsonl'}: unreadable ({reason}); move it away" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["results.jsonl"]


def test_a_bench_refuses_the_folder_of_another_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its report overwrote the other's and its records joined the other's results.jsonl."""
    bench, out = write_bench(tmp_path / "b.yaml"), tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"config": {"name": "other"}, "cells": []}))
    assert main(["bench", str(bench), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds the results of bench 'other', not " in err and "choose another --out" in err
    assert [p.name for p in out.iterdir()] == ["bench.json"]
