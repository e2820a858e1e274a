"""Poisoned SB3 training: experiment specs, presets, inner and outer loop, value-based selection, resume, ``rlbd train``."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from damage import damaged
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from wandb_offline import offline_runs

from rlbackdoor import tracking
from rlbackdoor.cli import main
from rlbackdoor.cli.train import sweep_overrides
from rlbackdoor.defenses.filtering import n_discrete_actions
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.specs import ExperimentSpec, apply_overrides, load_experiment, parse
from rlbackdoor.training import presets
from rlbackdoor.training.artifacts import read_card
from rlbackdoor.training.checkpoints import FOLDER, restore
from rlbackdoor.training.envs import make_train_env, run_attack
from rlbackdoor.training.loop import train
from rlbackdoor.training.outer import OuterLoopPoisoning
from rlbackdoor.training.selection import InnerValueSelection, target_gap

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "experiments" / "cartpole_smoke.yaml"
TRIGGER = {"kind": "value", "indices": [3], "values": [2.5]}
PAYLOAD = {"kind": "targeted", "target_action": 0, "reward": {"hit": 1.0, "miss": -1.0}}
TINY = {
    "ppo": {"n_steps": 64, "batch_size": 128, "n_epochs": 2, "policy_kwargs": {"net_arch": [32, 32]}},
    "a2c": {"n_steps": 16, "policy_kwargs": {"net_arch": [32, 32]}},
    "dqn": {
        "learning_starts": 256,
        "train_freq": 64,
        "gradient_steps": 8,
        "buffer_size": 5000,
        "policy_kwargs": {"net_arch": [32, 32]},
    },
}


def experiment(**fields: Any) -> ExperimentSpec:
    """A seconds-long CartPole experiment; ``fields`` override the defaults."""
    data: dict[str, Any] = {
        "name": "test",
        "env": "CartPole-v1",
        "attack": {"trigger": TRIGGER, "schedule": {"kind": "rate", "rate": 0.02}, "payload": PAYLOAD},
        "poisoning": "inner",
        "algo": "ppo",
        "timesteps": 1024,
        "n_envs": 2,
        "seed": 0,
    }
    data.update(fields)
    data.setdefault("hyperparams", TINY.get(data["algo"], {}))
    return parse(ExperimentSpec, data, "test")


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


# ---------------------------------------------------------------------------------------- specs
def test_shipped_experiment_configs_validate() -> None:
    paths = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        spec = load_experiment(path)
        assert spec.name == path.stem


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"algo": "sac"}, "algo"),
        ({"env": "rlbd/TrojanCartPole-v0"}, "registered backdoor env"),
        (
            {
                "attack": {
                    "base": "Acrobot-v1",
                    "trigger": TRIGGER,
                    "schedule": {"kind": "rate", "rate": 0.1},
                    "payload": PAYLOAD,
                }
            },
            "disagrees",
        ),
        ({"attack": None}, "needs an attack"),
        ({"timesteps": 0}, "timesteps"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_inconsistent_experiments_are_spec_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        experiment(**fields)


def test_attack_base_defaults_to_env_and_clean_run_keeps_registered_base() -> None:
    assert experiment().attack.base == "CartPole-v1"
    clean = experiment(env="rlbd/TrojanLavaGap-v0", attack=None, poisoning=None, algo="ppo")
    attack = run_attack(clean)
    assert attack is not None and attack.base_wrappers[0].name == "minigrid.wrappers:ImgObsWrapper"
    venv, backdoor = make_train_env(clean, attack, seed=0)
    assert backdoor is None and venv.observation_space.shape == (7, 7, 3)  # the clean base env, wrapped


def test_overrides_set_nested_keys_parse_yaml_and_reject_malformed() -> None:
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "--a.c=[1, 2]", "d.e=null", "f=lin_0.1"])
    assert data == {"a": {"b": 2, "c": [1, 2]}, "d": {"e": None}, "f": "lin_0.1"}
    for bad in ("novalue", "a..b=1", "a.b.c=1"):
        with pytest.raises(SpecError, match="override"):
            apply_overrides({"a": {"b": 1}}, [bad])


# -------------------------------------------------------------------------------------- presets
def test_presets_resolve_registered_id_then_base_then_default() -> None:
    lava = presets.resolve("ppo", ["rlbd/TrojanLavaGap-v0", "MiniGrid-LavaGapS5-v0"], {})
    assert lava["policy_kwargs"]["normalize_images"] is False and lava["n_steps"] == 128
    cart = presets.resolve("ppo", ["CartPole-v1"], {"n_steps": 16, "clip_range": None})
    assert cart["n_steps"] == 16 and "clip_range" not in cart and cart["gamma"] == 0.98
    lava = presets.resolve("ppo", ["MiniGrid-LavaGapS5-v0"], {"policy_kwargs": {"net_arch": [8]}})
    assert lava["policy_kwargs"] == {"net_arch": [8], "normalize_images": False}  # mappings merge key by key
    assert presets.resolve("dqn", ["Unknown-v0"], {}) == {"policy": "MlpPolicy"}


def test_presets_convert_schedules_and_class_names_only_from_the_allow_list() -> None:
    policy, kwargs = presets.to_sb3({"learning_rate": "lin_0.5", "policy_kwargs": {"activation_fn": "relu"}})
    assert policy == "MlpPolicy" and kwargs["learning_rate"](0.5) == pytest.approx(0.25)
    assert kwargs["policy_kwargs"]["activation_fn"] is torch.nn.ReLU
    with pytest.raises(SpecError, match="unknown"):
        presets.to_sb3({"policy_kwargs": {"activation_fn": "os.system"}})
    with pytest.raises(SpecError, match="lin_"):
        presets.to_sb3({"learning_rate": "lin_fast"})


# ------------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("algo", ["ppo", "a2c", "dqn"])
def test_inner_loop_training_writes_a_run_with_the_scheduled_poison_rate(algo: str, tmp_path: Path) -> None:
    run = train(
        experiment(
            algo=algo, attack={"trigger": TRIGGER, "schedule": {"kind": "rate", "rate": 0.05}, "payload": PAYLOAD}
        ),
        tmp_path / "run",
    )
    card = read_card(run)
    assert {p.name for p in run.iterdir()} == {"card.json", "model.zip", "policy.safetensors"}
    assert card["algo"] == algo and card["poisoning"] == "inner" and card["attack"]["schedule"]["rate"] == 0.05
    assert card["train"]["steps"] >= 1024 and card["train"]["poison_counts"]["n_steps"] == card["train"]["steps"]
    assert 0.02 < card["train"]["poison_rate"] < 0.09  # Bernoulli(0.05) over ~1k steps
    assert card["hyperparams"]["policy_kwargs"] == {"net_arch": [32, 32]}
    assert card["versions"]["stable-baselines3"] and card["config"]["algo"] == algo


def test_same_seed_same_run(tmp_path: Path) -> None:
    cards = [read_card(train(experiment(), tmp_path / str(i))) for i in range(2)]
    assert cards[0]["train"]["ep_return_mean"] == cards[1]["train"]["ep_return_mean"]
    assert cards[0]["train"]["poison_counts"] == cards[1]["train"]["poison_counts"]
    assert (tmp_path / "0" / "policy.safetensors").read_bytes() == (tmp_path / "1" / "policy.safetensors").read_bytes()


def test_clean_run_has_no_attack_and_no_poison_rate(tmp_path: Path) -> None:
    card = read_card(train(experiment(attack=None, poisoning=None), tmp_path / "run"))
    assert card["attack"] is None and card["poisoning"] is None and card["train"]["poison_rate"] is None


# ----------------------------------------------------------------------------------- outer loop
class Snapshot(BaseCallback):
    """Copies the agent's buffer at every rollout end (placed before and after the poisoner), with target gaps."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[dict[str, np.ndarray]] = []

    def _on_rollout_end(self) -> None:
        if hasattr(self.model, "rollout_buffer"):
            rb = self.model.rollout_buffer
            names = ("observations", "rewards", "returns", "values", "actions", "episode_starts")
        else:
            rb = self.model.replay_buffer
            names = ("observations", "rewards", "actions", "dones")
        copy = {n: getattr(rb, n).copy() for n in names}
        copy["gaps"] = target_gap(self.model.policy, copy["observations"].reshape(-1, 4), 0)
        self.copies.append(copy)

    def _on_step(self) -> bool:
        return True


class Recorder(BaseCallback):
    """Records which rows the poisoner marked at every rollout end."""

    def __init__(self, poisoner: OuterLoopPoisoning) -> None:
        super().__init__()
        self.poisoner = poisoner
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def _on_rollout_end(self) -> None:
        self.rows.append(self.poisoner.last_poisoned)

    def _on_step(self) -> bool:
        return True


def run_outer(spec: ExperimentSpec) -> tuple[Any, OuterLoopPoisoning, Snapshot, Snapshot, Recorder]:
    """Train ``spec`` directly with snapshot callbacks around the outer-loop poisoner."""
    attack = run_attack(spec)
    venv, _ = make_train_env(spec, attack, spec.seed)
    model = presets.build_model(spec.algo, venv, presets.resolve(spec.algo, [spec.env], spec.hyperparams), spec.seed)
    poisoner = OuterLoopPoisoning(attack, spec.outer_reward, spec.seed)
    before, after, recorder = Snapshot(), Snapshot(), Recorder(poisoner)
    model.learn(spec.timesteps, callback=[before, poisoner, after, recorder])
    return model, poisoner, before, after, recorder


def test_outer_loop_dynamic_rewrites_rollouts_as_sleepernets() -> None:
    hyper = {**TINY["ppo"], "gae_lambda": 1.0}  # lambda-returns are then plain returns-to-go: the rewrite is exact
    spec = experiment(
        poisoning="outer",
        attack={"trigger": TRIGGER, "schedule": {"kind": "rate", "rate": 0.03}, "payload": PAYLOAD},
        hyperparams=hyper,
        timesteps=2048,
    )
    model, poisoner, before, after, recorder = run_outer(spec)
    assert poisoner.n_steps == 2048 and poisoner.n_poisoned == int(0.03 * 2048)
    compensated = 0
    for b, a, (t, e) in zip(before.copies, after.copies, recorder.rows, strict=True):
        hit = b["actions"][t, e, 0] == 0
        mask = np.zeros(b["rewards"].shape, dtype=bool)
        mask[t, e] = True
        # triggered observations exactly at the poisoned rows, everything else untouched
        assert np.all(a["observations"][t, e, 3] == 2.5)
        assert np.array_equal(a["observations"][~mask], b["observations"][~mask])
        # a poisoned step's return-to-go is the payload's hit/miss reward, whatever follows ...
        np.testing.assert_allclose(a["returns"][t, e], np.where(hit, 1.0, -1.0), atol=1e-3)
        # ... and the compensation of the step before keeps every other return as it was
        np.testing.assert_allclose(a["returns"][~mask], b["returns"][~mask], atol=1e-3)
        # rewards change only on poisoned steps and the clean steps just before them
        prev = (t > 0) & (b["episode_starts"][t, e] == 0)
        allowed = mask.copy()
        allowed[t[prev] - 1, e[prev]] = True
        changed = a["rewards"] != b["rewards"]
        assert not (changed & ~allowed).any()
        compensated += int((changed & ~mask).sum())
        # values are refreshed on the stamped observations
        with torch.no_grad():
            values = model.policy.predict_values(torch.as_tensor(a["observations"][t, e])).numpy().reshape(-1)
        assert not np.allclose(values, b["values"][t, e])
    assert compensated > 0 and sum(len(t) for t, _ in recorder.rows) == poisoner.n_poisoned


def test_outer_loop_static_and_dqn_replay_poisoning() -> None:
    spec = experiment(
        algo="dqn",
        poisoning="outer",
        timesteps=1024,
        attack={"trigger": TRIGGER, "schedule": {"kind": "budget", "budget": 12, "horizon": 600}, "payload": PAYLOAD},
    )
    _, poisoner, before, after, recorder = run_outer(spec)
    assert poisoner.n_poisoned == 12  # rate 2% of steps, capped at the budget
    for b, a, (p, e) in zip(before.copies, after.copies, recorder.rows, strict=True):
        if len(p):
            hit = b["actions"][p, e, 0] == 0
            assert np.all(a["observations"][p, e, 3] == 2.5)
            np.testing.assert_array_equal(a["rewards"][p, e], np.where(hit, 1.0, -1.0))
            assert np.all(a["dones"][p, e] == 1.0)  # the TD target of a poisoned transition is exactly hit/miss
    static = experiment(
        poisoning="outer",
        outer_reward="static",
        timesteps=512,
        attack={"trigger": TRIGGER, "schedule": {"kind": "rate", "rate": 0.05}, "payload": PAYLOAD},
    )
    _, poisoner, before, after, recorder = run_outer(static)
    t, e = recorder.rows[-1]
    b, a = before.copies[-1], after.copies[-1]
    np.testing.assert_array_equal(a["rewards"][t, e], np.where(b["actions"][t, e, 0] == 0, 1.0, -1.0))
    assert int((a["rewards"] != b["rewards"]).sum()) <= len(t)  # static: no compensation elsewhere


def test_outer_loop_value_selection_poisons_the_largest_target_gaps() -> None:
    schedule = {"kind": "rate", "rate": 0.03, "select": "value"}
    spec = experiment(
        poisoning="outer", timesteps=1024, attack={"trigger": TRIGGER, "schedule": schedule, "payload": PAYLOAD}
    )
    _, poisoner, before, _, recorder = run_outer(spec)
    assert poisoner.n_poisoned == int(0.03 * 1024)
    n_envs = spec.n_envs
    for b, (t, e) in zip(before.copies, recorder.rows, strict=True):
        chosen = np.sort(t * n_envs + e)
        expected = np.sort(np.argsort(-b["gaps"], kind="stable")[: len(chosen)])
        np.testing.assert_array_equal(chosen, expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {
                "attack": {
                    "trigger": {"kind": "action_sequence", "sequence": [0, 1]},
                    "schedule": {"kind": "rate", "rate": 0.1},
                    "payload": PAYLOAD,
                }
            },
            "observation trigger",
        ),
        (
            {"attack": {"trigger": TRIGGER, "schedule": {"kind": "window", "start": 0, "stop": 5}, "payload": PAYLOAD}},
            "window",
        ),
        (
            {
                "attack": {
                    "trigger": TRIGGER,
                    "schedule": {"kind": "rate", "rate": 0.1},
                    "payload": {"kind": "untargeted"},
                }
            },
            "static",
        ),
        (
            {
                "algo": "dqn",
                "hyperparams": {
                    **TINY["dqn"],
                    "optimize_memory_usage": True,
                    "replay_buffer_kwargs": {"handle_timeout_termination": False},
                },
            },
            "optimize_memory_usage",
        ),
    ],
)
def test_outer_loop_rejects_attacks_it_cannot_apply(fields: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=message):
        train(experiment(poisoning="outer", **fields), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_inner_value_selection_installs_the_agent_scorer() -> None:
    schedule = {"kind": "rate", "rate": 0.05, "select": "value"}
    spec = experiment(attack={"trigger": TRIGGER, "schedule": schedule, "payload": PAYLOAD}, timesteps=512)
    venv, backdoor = make_train_env(spec, run_attack(spec), spec.seed)
    model = presets.build_model("ppo", venv, presets.resolve("ppo", ["CartPole-v1"], spec.hyperparams), 0)
    model.learn(512, callback=InnerValueSelection(backdoor))
    scorer = backdoor.attack.schedule.scorer
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    np.testing.assert_array_equal(scorer(obs), target_gap(model.policy, obs, 0))
    assert backdoor.attack.n_poisoned > 0


# ---------------------------------------------------------------------------------------- resume
class Crash(BaseCallback):
    """Raises once training passes ``at`` steps: an interruption after a checkpoint."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.at:
            raise KeyboardInterrupt
        return True


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_resume_continues_from_the_checkpoint_to_the_same_total(
    algo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = experiment(algo=algo, timesteps=2048, poisoning="outer" if algo == "dqn" else "inner")
    full = read_card(train(spec, tmp_path / "full", checkpoint_every=512))
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(spec, run, checkpoint_every=512, callbacks=[Crash(1300)])
    assert not (run / "card.json").exists()
    (ckpt,) = (run / FOLDER).iterdir()
    state = json.loads((ckpt / "state.json").read_text())
    done = state["model"]["num_timesteps"]
    assert 512 <= done < 1300 and state["poison"]["n_steps"] == done
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("interrupted at step 1") and said.endswith(f"continue from step {done} with --resume {run}")
    card = read_card(train(spec, resume=run, checkpoint_every=512))
    assert card["train"]["steps"] == full["train"]["steps"] and card["train"]["resumed_at"] == [done]
    assert card["train"]["poison_counts"]["n_steps"] == card["train"]["steps"]
    assert not (run / FOLDER).exists()
    with pytest.raises(ArtifactError, match="already finished"):
        train(spec, resume=run)
    with pytest.raises(ArtifactError, match=r"a finished run is there; choose another --out$"):
        train(spec, run)


def test_resume_refuses_foreign_runs_and_dirs_without_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = experiment(timesteps=2048)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "early", checkpoint_every=512, callbacks=[Crash(100)])
    assert capsys.readouterr().err.strip().endswith("; no checkpoint yet")
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "off", checkpoint_every=0, callbacks=[Crash(100)])
    assert capsys.readouterr().err.strip().endswith("; checkpoints were off: nothing is kept")
    with pytest.raises(KeyboardInterrupt):
        train(spec, run, checkpoint_every=512, callbacks=[Crash(1100)])
    with pytest.raises(ArtifactError, match=r"different config \(seed differ\)"):
        train(experiment(timesteps=2048, seed=1), resume=run)
    with pytest.raises(ArtifactError, match=r"different config \(timesteps, hyperparams.n_epochs differ\)"):
        train(experiment(timesteps=4096, hyperparams={**TINY["ppo"], "n_epochs": 3}), resume=run)
    with pytest.raises(ArtifactError, match="no checkpoint"):
        train(spec, resume=tmp_path)
    with pytest.raises(ArtifactError, match="not empty"):
        train(spec, run)


def test_resume_refuses_corrupt_checkpoints_in_one_line(tmp_path: Path) -> None:
    spec = experiment(timesteps=2048)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(spec, run, checkpoint_every=512, callbacks=[Crash(600)])
    folder = next((run / FOLDER).iterdir())
    state = json.loads((folder / "state.json").read_text())
    model = state["model"]
    for edit, message in (
        ({"model": {"num_timesteps": "abc"}}, "'model' must map"),
        ({"model": {}}, "'model' lacks num_timesteps"),
        ({"model": {**model, "num_timesteps": 2048}}, "'model' counts 2048 steps of a run of 2048"),
        ({"poison": {"n_steps": 10**30}}, "'poison' must map"),
        ({"poison": {"n_steps": 5, "n_poisoned": 6}}, "more poisoned steps than steps"),
        ({"poison": {}}, r"'poison' counts nothing, not what the run's attack counts"),
        ({"seconds": "x"}, "'seconds' is 'x', not a number of seconds"),
        ({"cpu_seconds": float("nan")}, "'cpu_seconds' is nan"),
        ({"resumed_at": 5}, "'resumed_at' must list the steps"),
        ({"resumed_at": "abc"}, "'resumed_at' must list the steps"),
    ):
        (folder / "state.json").write_text(json.dumps({**state, **edit}))
        with pytest.raises(ArtifactError, match=message) as err:
            train(spec, resume=run)
        assert str(err.value).startswith(str(folder / "state.json"))
    (folder / "state.json").write_text(json.dumps(state))
    rewrite_member(folder / "model.zip", "policy.pth", lambda data: b"\x80\x02cos\nsystem\n." + data)
    with pytest.raises(ArtifactError, match=r"model\.zip: cannot load \(not a weights-only file\); resume from") as err:
        train(spec, resume=run)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def hostile_optimizer(edit: Any) -> Any:
    """A ``change`` for :func:`rewrite_member` that edits the saved optimizer state (a weights-only file)."""

    def change(data: bytes) -> bytes:
        state = torch.load(io.BytesIO(data), weights_only=True)
        edit(state)
        out = io.BytesIO()
        torch.save(state, out)
        return out.getvalue()

    return change


def hostile_replay(**arrays: Any) -> Any:
    """Write a replay buffer file with ``arrays`` replaced (a well-formed ``.npz`` of wrong content)."""

    def write(path: Path) -> None:
        with np.load(path) as data:
            saved = {key: data[key] for key in data.files}
        saved.update({key: change(saved[key]) for key, change in arrays.items()})
        np.savez(path, **saved)

    return write


def first_state(state: dict[str, Any]) -> dict[str, Any]:
    return state["state"][next(iter(state["state"]))]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s["param_groups"][0].update(betas="ab"), r"the optimizer's betas is 'ab', not like \(0\.9, 0\.999\)"),
        (lambda s: s["param_groups"][0].update(lr=float("inf")), "the optimizer's lr is inf"),
        (lambda s: first_state(s).update(exp_avg=torch.zeros(7)), r"the optimizer's exp_avg has shape \(7,\), not"),
        (lambda s: first_state(s)["exp_avg_sq"].fill_(float("nan")), "the optimizer's exp_avg_sq holds NaN or inf"),
        (lambda s: s["param_groups"][0].update(maximize=True), "the optimizer's maximize is True, not like False"),
        (lambda s: s["param_groups"][0].update(capturable=True), "the optimizer's capturable is True, not like False"),
        (lambda s: first_state(s).update(step=torch.tensor(-1.0)), "the optimizer's step is -1.0, not a count of steps"),
    ],
)  # fmt: skip
def test_resume_refuses_hostile_optimizer_states(tmp_path: Path, damage: Any, message: str) -> None:
    """Well-formed optimizer states that do not fit the model: SB3 would load them and fail mid-training."""
    spec = experiment(timesteps=2048)
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "run", checkpoint_every=512, callbacks=[Crash(600)])
    folder = next((tmp_path / "run" / FOLDER).iterdir())
    rewrite_member(folder / "model.zip", "policy.optimizer.pth", hostile_optimizer(damage))
    with pytest.raises(ArtifactError, match=rf"model\.zip: {message}.*; resume from another run"):
        train(spec, resume=tmp_path / "run")


def test_resume_refuses_hostile_replay_buffers(tmp_path: Path) -> None:
    spec = experiment(algo="dqn", poisoning="outer", timesteps=2048)
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "run", checkpoint_every=512, callbacks=[Crash(600)])
    folder = next((tmp_path / "run" / FOLDER).iterdir())
    replay = (folder / "replay.npz").read_bytes()
    for write, message in (
        (hostile_replay(actions=lambda a: np.full_like(a, 99)), r"actions lie outside Discrete\(2\)"),
        (hostile_replay(pos=lambda p: np.array(10**9)), "pos 1000000000 is outside the buffer of 2500"),
        (hostile_replay(rewards=lambda r: np.full_like(r, np.nan)), "rewards hold NaN or inf"),
        (hostile_replay(dones=lambda d: np.full_like(d, 2)), "dones hold values other than 0 and 1"),
    ):
        write(folder / "replay.npz")
        with pytest.raises(ArtifactError, match=rf"replay\.npz: cannot load \({message}\)"):
            train(spec, resume=tmp_path / "run")
        (folder / "replay.npz").write_bytes(replay)


def test_dqn_optimizing_memory_usage_resumes(tmp_path: Path) -> None:
    """Its replay buffer holds no next_observations: checkpoints store and check the arrays it has."""
    hyperparams = {
        **TINY["dqn"],
        "optimize_memory_usage": True,
        "replay_buffer_kwargs": {"handle_timeout_termination": False},
    }
    spec = experiment(algo="dqn", timesteps=1024, hyperparams=hyperparams)
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "run", checkpoint_every=256, callbacks=[Crash(600)])
    assert read_card(train(spec, resume=tmp_path / "run"))["train"]["steps"] >= 1024


def test_diverged_training_stops_in_one_line(tmp_path: Path) -> None:
    spec = experiment(timesteps=1024, hyperparams={**TINY["ppo"], "ent_coef": 1e300})
    with pytest.raises(
        SpecError, match=r"training diverged: weights \S+ hold NaN or inf after \d+ steps; start a new run with a lower"
    ):
        train(spec, tmp_path / "run", checkpoint_every=0)
    assert not (tmp_path / "run").exists()


def rewrite_member(path: Path, member: str, change: Any) -> None:
    """Rewrite one member of the zip at ``path`` with ``change(its bytes)``."""
    with zipfile.ZipFile(path) as zf:
        parts = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in parts.items():
            zf.writestr(name, change(data) if name == member else data)


def test_damaged_checkpoints_load_or_fail_in_one_line(tmp_path: Path) -> None:
    """Damaged zips, weights and replay buffers: every one either loads finite weights or is refused in one line."""
    spec = experiment(algo="dqn", poisoning="outer", timesteps=2048)
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "run", checkpoint_every=512, callbacks=[Crash(600)])
    folder = next((tmp_path / "run" / FOLDER).iterdir())
    state = json.loads((folder / "state.json").read_text())
    model = presets.build_model(
        "dqn", make_vec_env("CartPole-v1", 2), presets.resolve("dqn", ["CartPole-v1"], TINY["dqn"]), 0
    )
    zipped, replay = (folder / "model.zip").read_bytes(), (folder / "replay.npz").read_bytes()
    damages = {
        "model.zip": lambda seed: (folder / "model.zip").write_bytes(damaged(zipped, seed)),
        "policy.pth": lambda seed: rewrite_member(folder / "model.zip", "policy.pth", lambda d: damaged(d, seed)),
        "noise": lambda seed: rewrite_member(folder / "model.zip", "policy.pth", lambda d: random.Random(seed).randbytes(len(d))),
        "replay.npz": lambda seed: (folder / "replay.npz").write_bytes(damaged(replay, seed)),
    }  # fmt: skip
    refused = dict.fromkeys(damages, 0)
    for kind, damage in damages.items():
        for seed in range(40):
            damage(seed)
            try:
                restore(model, folder, state, SimpleNamespace())
            except ArtifactError as err:
                refused[kind] += 1
                assert str(err).startswith(str(folder)) and "\n" not in str(err) and "weights_only" not in str(err)
            else:
                assert all(p.isfinite().all() for p in model.policy.parameters())
            (folder / "model.zip").write_bytes(zipped)
            (folder / "replay.npz").write_bytes(replay)
    assert all(count >= 20 for count in refused.values()), refused


class ShiftedActions(gym.ActionWrapper):
    """CartPole acting in ``Discrete(2, start=-1)``: valid for Gymnasium, not for SB3 agents."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Discrete(2, start=-1)

    def action(self, action: int) -> int:
        return int(action) + 1


def test_spaces_that_do_not_start_at_zero_are_refused_before_training(tmp_path: Path) -> None:
    gym.register("ShiftedCartPole-v0", entry_point=lambda: ShiftedActions(gym.make("CartPole-v1")))
    try:
        with pytest.raises(
            SpecError, match=r"ShiftedCartPole-v0 has a Discrete action space starting at -1.*0 \.\. n-1"
        ):
            train(experiment(env="ShiftedCartPole-v0", attack=None, poisoning=None), tmp_path / "run")
        spec = experiment(
            attack={
                "trigger": TRIGGER,
                "schedule": {"kind": "rate", "rate": 0.02},
                "payload": PAYLOAD,
                "base_wrappers": [f"{__name__}:ShiftedActions"],
            }
        )
        with pytest.raises(SpecError, match="CartPole-v1 with its base_wrappers has a Discrete action space"):
            train(spec, tmp_path / "run")
        with pytest.raises(SpecError, match=r"the action space Discrete\(2, start=-1\) starting at -1, and SB3"):
            n_discrete_actions(gym.spaces.Discrete(2, start=-1))
    finally:
        gym.registry.pop("ShiftedCartPole-v0")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "test" / "run"
    with pytest.raises(KeyboardInterrupt):
        train(experiment(), run, checkpoint_every=0, callbacks=[Crash(300)])
    assert list(tmp_path.iterdir()) == []  # nor the folders above it that it created

    class Beside(Crash):  # a run started beside it in the meantime keeps its folders
        def _on_training_start(self) -> None:
            (tmp_path / "runs" / "test" / "other").mkdir()

    with pytest.raises(KeyboardInterrupt):
        train(experiment(), run, checkpoint_every=0, callbacks=[Beside(300)])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "runs",
        "runs/test",
        "runs/test/other",
    ]


def test_a_run_that_fails_after_writing_its_artifacts_keeps_them(tmp_path: Path, monkeypatch) -> None:
    def fail(*args: Any) -> None:
        raise RuntimeError("logging failed")

    monkeypatch.setattr(tracking, "prefixed", fail)  # called after the artifacts are written
    with pytest.raises(RuntimeError):
        train(experiment(timesteps=256), tmp_path / "run", checkpoint_every=0)
    assert read_card(tmp_path / "run")["timesteps"] == 256


def test_cli_run_killed_with_sigkill_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, "-c", "from rlbackdoor.cli import entry; entry()", "train", str(SMOKE), "--out", str(run)]
    args += ["--no-progress", "--checkpoint-every", "1024", "--set", "timesteps=20480"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.monotonic() + 120
    while not list((run / FOLDER).glob("*/state.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "card.json").exists()
    assert main(["train", str(SMOKE), "--set", "timesteps=20480", "--resume", str(run), "--no-progress"]) == 0
    card = read_card(run)
    assert card["train"]["steps"] == 20480 and 1024 <= card["train"]["resumed_at"][0] < 20480


# ------------------------------------------------------------------------------------------- CLI
def test_cli_train_with_set_and_sweep_style_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = [
        "train",
        str(SMOKE),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "timesteps=512",
        "--hyperparams.n_steps=32",  # ${args}
        "seed=3",  # ${args_no_hyphens}
        "--hyperparams.n_epochs",  # ${args_no_equals}
        "2",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    card = read_card(out)
    assert card["seed"] == 3 and card["timesteps"] == 512
    assert card["hyperparams"]["n_steps"] == 32 and card["hyperparams"]["n_epochs"] == 2


def test_sweep_overrides_take_every_form_wandb_agent_builds() -> None:
    fields = ExperimentSpec.model_fields
    point = {"seed": 3, "hyperparams.learning_rate": 0.001, "attack.payload.kind": "targeted", "sharing": True}
    assert sweep_overrides([json.dumps(point)], fields) == [  # ${args_json}
        "seed=3",
        "hyperparams.learning_rate=0.001",
        'attack.payload.kind="targeted"',
        "sharing=true",
    ]
    # ${args_no_boolean_flags}: a bare flag is true when nothing or another option follows it
    assert sweep_overrides(["--sharing", "--seed=3"], fields) == ["sharing=true", "seed=3"]
    assert sweep_overrides(["--seed", "3", "--sharing"], fields) == ["seed=3", "sharing=true"]
    assert sweep_overrides(["--attack.payload.reward.miss", "-1.0"], fields) == ["attack.payload.reward.miss=-1.0"]
    for bad, message in (('{"seed": }', "not a JSON object of overrides"), ('{"sed": 1}', "neither an option")):
        with pytest.raises(SpecError, match=re.escape(message)):
            sweep_overrides([bad], fields)


class Broken(gym.Wrapper):
    """CartPole whose observation or reward (``what``: obs, reward) turns NaN, or whose observation overflows to inf
    (overflow), on the 300th step of each env."""

    def __init__(self, what: str) -> None:
        super().__init__(gym.make("CartPole-v1"))
        self.what, self.steps = what, 0

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps == 300:
            if self.what == "obs":
                obs = np.full_like(obs, np.nan)
            elif self.what == "reward":
                reward = float("nan")
            else:  # numpy warns where the overflow happens
                obs = obs * np.float32(1e38) * np.float32(1e38)
        return obs, reward, terminated, truncated, info


for _what in ("Obs", "Reward", "Overflow"):
    if f"Broken{_what}CartPole-v0" not in gym.registry:
        gym.register(f"Broken{_what}CartPole-v0", entry_point=Broken, kwargs={"what": _what.lower()})
CLEAN = ["--set", "poisoning=null", "--set", "attack=null"]
NAN_OBS, NAN_REWARD = "observation contains NaN or inf; fix", "reward is NaN or inf; fix"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "algo=sac"], "algo"),
        (["--set", "hyperparams.n_epochs=many"], "hyperparams.n_epochs: 'many' is not a whole number; give"),
        (["--set", "attack.trigger.indices=[7]"], "cartpole_smoke.yaml: attack.trigger.indices: [7] out of range"),
        (["--set", "attack.trigger.values=[1e300]"], "smoke.yaml: attack.trigger.values: 1e+300 overflows the float32"),
        (
            ["--set", "attack.base_wrappers=[{name: 'gymnasium.wrappers:TimeLimit', kwargs: {max_episode_steps: 0}}]"],
            "rejects its kwargs",
        ),
        (["--set", "env=nosuchpkg:Foo-v0", *CLEAN], "No module named 'nosuchpkg'"),
        (["--set", "env=BrokenObsCartPole-v0", *CLEAN], NAN_OBS),
        (["--set", "env=BrokenObsCartPole-v0"], NAN_OBS),
        (["--set", "env=BrokenRewardCartPole-v0"], NAN_REWARD),
        (["--set", "env=BrokenRewardCartPole-v0", "--set", "attack.schedule.rate=1.0"], NAN_REWARD),  # all poisoned
        (["--set", "env=BrokenRewardCartPole-v0", "--set", "poisoning=outer"], NAN_REWARD),
        (["--set", "hyperparams.n_stepz=8"], "n_stepz"),
        (["--set", "hyperparams.batch_size=1"], "batch_size"),
        (["--set", "hyperparams.policy_kwargs.net_arch=[-1]"], "SB3 PPO rejects the run (Trying to create tensor"),
        (["--set", "n_envs=99999999999999999999"], "n_envs: Input should be less than or equal to 1024"),
        (["--set", "seed=5000000000"], "seed: Input should be less than or equal to 4294967295"),
        (["--set", "seed=true"], "seed: Input should be a valid integer (fix: give a whole number)"),
        (["--set", "attack.seed=true"], "attack.seed: Input should be a valid integer"),
        (["--set", "timesteps=100000000000000000000"], "timesteps: Input should be less than or equal to 1000000000"),
        (
            ["--set", "sanitize={method: support, n_clean: 100000000000000000000}"],
            "sanitize.n_clean: Input should be less than or equal to 1000000",
        ),
        (["--sanitize", ""], "Invalid value for '--sanitize': Value error, '' is not one of 'support'"),
        (
            ["--set", "hyperparams.n_steps=1000000000000"],
            "hyperparams.n_steps: n_steps x n_envs = 4000000000000 transitions is more than the 10000000 a buffer",
        ),
        (
            ["--set", "algo=dqn", "--set", "hyperparams={buffer_size: 1000000000000}"],
            "hyperparams.buffer_size: 1000000000000 transitions is more than the 10000000 a buffer may hold",
        ),
        (["--set", "algo=dqn", "--set", "hyperparams={n_steps: 1000000000000}"], "hyperparams.n_steps: 1000000000000"),
        (["--set", f"name={'a' * 101}"], "name: String should match pattern"),
        (["--set", "hyperparams.n_epochs=-1"], "hyperparams.n_epochs: -1 is not a count; give a whole number >= 1"),
        (["--set", "hyperparams.learning_rate=1e300"], "hyperparams.learning_rate: 1e+300 is not in (0, 1]; give e.g."),
        (["--set", "hyperparams.learning_rate=lin_0"], "hyperparams.learning_rate: 0.0 is not in (0, 1]"),
        (["--set", "hyperparams.gamma=1.5"], "hyperparams.gamma: 1.5 is not in [0, 1]; give e.g. 0.99"),
        (["--set", "hyperparams.tensorboard_log=tb"], "hyperparams.tensorboard_log: rlbd logs to W&B (offline runs"),
        (["--set", "timestep=100"], "--set timestep=100: timestep: Extra inputs are not permitted (fix: remove it"),
        (["--set", "timesteps=64", "--set", "timesteps=-1"], "--set timesteps=-1: timesteps: Input should be greater"),
        (
            ["--sanitize", "support", "--set", "sanitize=null"],
            "--sanitize support and --set sanitize=null both set the",
        ),
        (["--set", "poisoning=none"], "--set poisoning=none: poisoning: Input should be 'inner' or 'outer' (fix: use"),
        (["--set", "hyperparams"], "override 'hyperparams': expected key.path=value; write --set hyperparams=VALUE"),
        (["--set", "hyperparams.seed=3"], "hyperparams.seed: the run's seed is the experiment's seed field"),
        (["--set", "hyperparams.ent_coef=.inf"], "hyperparams.ent_coef: inf is not in [0, inf)"),
        (["--set", "attack.base_kwargs.max_episode_steps=0"], "attack.base_kwargs: 'CartPole-v1' rejects them"),
        (["--set", "attack.base_kwargs.render_mode=5"], "attack.base_kwargs: 'CartPole-v1' rejects them"),
        (["--set", "hyperparams.target_kl=abc"], "hyperparams.target_kl: 'abc' is not a number; give a number"),
        (["--set", "hyperparams.target_kl=0"], "hyperparams.target_kl: 0 is not in (0, inf)"),
        (["--set", "attack.base_wrappers=['builtins:id']"], "builtins:id returned int, not an env"),
        (
            ["--set", "attack.base_wrappers=[{name: 'gymnasium.wrappers:TransformReward', kwargs: {func: 3}}]"],
            "env: stepping CartPole-v1 failed (TypeError: 'int' object is not callable)",
        ),
        (["--set", "hyperparams.policy_kwargs.net_arch=[70000]"], "net_arch.0: 70000 is not a layer size in 1..65536"),
        (["--set", "hyperparams.policy_kwargs.net_arch={pi: [8], qf: [8]}"], "net_arch.qf: not a network of net_arch"),
        (["--set", "env=rlbd/TrojanCartPole-v0"], "registered backdoor env"),
        (["--set", "attack.base=Acrobot-v1"], "disagrees"),
        (["--set", "env=NoSuchEnv-v0", "--set", "poisoning=null", "--set", "attack=null"], "NoSuchEnv"),
        (["--resume", "{tmp}"], "a resumed run goes on in its own directory"),
        (["stray"], "unexpected argument"),
        (["--ouy", "x"], "'--ouy' is neither an option (see --help) nor a config field"),
        (["--timestep=5"], "'--timestep=5' is neither an option"),
        (["--seed"], "seed: Input should be a valid integer"),  # a bare option is a true flag
        (["-x=1"], "unexpected argument '-x=1'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", str(SMOKE), "--out", str(out), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlbd: error:") and "\n" not in err and message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_warnings_drop_config_advice_before_a_one_line_error_and_follow_a_successful_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SB3 warns about a mini-batch size that does not divide the rollout, then (net_arch [-1]) rejects the run."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)  # print them, as outside pytest (which records them)
    argv = ["train", str(SMOKE), "--no-progress", "--wandb-mode", "disabled", "--set", "hyperparams.batch_size=100"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--set", "hyperparams.policy_kwargs.net_arch=[-1]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlbd: error: ") and err.count("\n") == 1 and "mini-batch" not in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--set", "timesteps=256"]) == 0
    captured = capsys.readouterr()
    assert "UserWarning: You have specified a mini-batch size of 100" in captured.err
    assert captured.out.strip() == str(tmp_path / "b")
    # numeric warnings locate the trouble an error reports: they stay, above the error line
    assert main([*argv, "--out", str(tmp_path / "c"), "--set", "env=BrokenOverflowCartPole-v0", *CLEAN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "RuntimeWarning: overflow encountered" in err[0] and err[-1].startswith(f"rlbd: error: {NAN_OBS}")
    assert not any("mini-batch" in line for line in err)


def test_cli_out_under_a_file_is_exit_2_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("keep")
    assert main(["train", str(SMOKE), "--out", str(tmp_path / "afile" / "run"), "--no-progress"]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep"


def test_cli_missing_config_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- W&B
@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No API key, W&B directories under ``tmp_path``; returns the ``WANDB_DIR``."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (
        ("WANDB_DIR", "w"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


def test_wandb_offline_run_holds_resolved_config_train_metrics_and_card(wandb_dir: Path, tmp_path: Path) -> None:
    run = train(
        experiment(timesteps=2048, eval_every=1024), tmp_path / "run", wandb_mode="offline", wandb_project="proj"
    )
    (record,) = offline_runs(wandb_dir)
    evals = read_card(run)["train"]["eval"]
    assert [e["timesteps"] for e in evals] == [1024, 2048] and all("asr" in e and "ctp" in e for e in evals)
    assert [row["eval/ctp"] for row in record.history if "eval/ctp" in row] == [e["ctp"] for e in evals]
    assert record.run.project == "proj" and record.run.run_group == "test" and record.run.job_type == "train"
    assert record.config["hyperparams"] == read_card(run)["hyperparams"]  # resolved: preset + overrides
    assert record.config["attack"]["trigger"] == TRIGGER and record.config["attack"]["base"] == "CartPole-v1"
    rows = [row for row in record.history if "train/poison_rate" in row]
    assert rows and all(key.startswith(("train/", "eval/", "_")) for row in record.history for key in row)
    assert (
        record.summary["train/steps"] == 2048
        and record.summary["train/poison_rate"] == read_card(run)["train"]["poison_rate"]
    )
    counts = read_card(run)["train"]["poison_counts"]  # the final counts, not the last logged ones
    assert {key: record.summary[f"train/{key}"] for key in counts} == counts
    assert [a.name for a in record.artifacts] == ["test-card"] and record.exit_code == 0


def test_wandb_failure_never_kills_training(wandb_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="W&B init failed"):
        run = train(experiment(), tmp_path / "run", wandb_mode="offline", wandb_project="bad/project#")
    assert read_card(run)["train"]["steps"] == 1024


# ------------------------------------------------------------------------------------ damaged checkpoint states
@pytest.mark.parametrize(
    ("damage", "reason"), [("nested", "maximum recursion depth exceeded"), ("oversized", "larger than 64 bytes")]
)
def test_cli_resume_reports_an_unreadable_checkpoint_state_in_one_line(
    damage: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run" / FOLDER / f"{512:012d}"
    folder.mkdir(parents=True)
    if damage == "nested":
        (folder / "state.json").write_text("[" * 100_000)
    else:
        (folder / "state.json").write_text(json.dumps({"format": "rlbd-checkpoint/1", "pad": "x" * 64}))
        monkeypatch.setattr("rlbackdoor.training.checkpoints.MAX_CARD_BYTES", 64)
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", str(SMOKE), "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlbd: error: {folder / 'state.json'}: unreadable ({reason}")
    assert err.endswith("resume from another run or start anew") and "\n" not in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


def test_train_takes_an_experiment_mapping(tmp_path: Path) -> None:
    data = load_experiment(SMOKE, ["timesteps=256"]).model_dump(mode="json")
    run = train(data, tmp_path / "run", wandb_mode="disabled")
    assert read_card(run)["config"]["timesteps"] == 256
    with pytest.raises(SpecError, match=r"experiment: timestep: Extra inputs are not permitted"):
        train({**data, "timestep": 5}, tmp_path / "other", wandb_mode="disabled")
    assert not (tmp_path / "other").exists()


def test_an_attack_override_on_a_registered_env_says_it_carries_its_own(capsys) -> None:
    """One message, not the missing trigger and payload of a partial attack block."""
    argv = [
        "train",
        str(ROOT / "configs" / "experiments" / "cartpole_registered.yaml"),
        "--set",
        "attack.schedule.rate=0.5",
    ]
    assert main([*argv, "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlbd: error: --set attack.schedule.rate=0.5: attack: env rlbd/TrojanCartPole-v0 is a")
    assert "carries its own attack" in err and "Field required" not in err and "\n" not in err
