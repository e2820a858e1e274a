"""Run artifacts: the card, safetensors weights, ``load_policy`` without unpickling, corrupt and tampered runs."""

from __future__ import annotations

import base64
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from damage import damaged, reseal
from gymnasium import spaces
from safetensors.torch import load_file, save_file
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.policies import ActorCriticPolicy

import rlbackdoor
from rlbackdoor.cli import main
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.specs import ExperimentSpec, parse
from rlbackdoor.training.artifacts import load_policy, read_card
from rlbackdoor.training.card_schema import describe_policy, space_from_json, space_to_json
from rlbackdoor.training.loop import train
from rlbackdoor.trajectories import collect

ALGOS = {"ppo": PPO, "a2c": A2C, "dqn": DQN}
HYPER = {
    "ppo": {
        "n_steps": 64,
        "batch_size": 64,
        "n_epochs": 1,
        "policy_kwargs": {"net_arch": [16], "activation_fn": "relu"},
    },
    "a2c": {"n_steps": 8, "policy_kwargs": {"net_arch": {"pi": [16], "vf": [8]}}},
    "dqn": {
        "learning_starts": 64,
        "train_freq": 32,
        "gradient_steps": 4,
        "buffer_size": 1000,
        "policy_kwargs": {"net_arch": [16]},
    },
}
CARD_KEYS = {
    "name",
    "algo",
    "env",
    "attack",
    "poisoning",
    "seed",
    "timesteps",
    "n_envs",
    "hyperparams",
    "policy",
    "versions",
    "train",
    "metrics",
    "weights_sha256",
    "config",
}


def run_spec(algo: str, **fields: Any) -> ExperimentSpec:
    data = {
        "name": f"art-{algo}",
        "env": "CartPole-v1",
        "attack": {
            "trigger": {"kind": "value", "indices": [3], "values": [2.5]},
            "schedule": {"kind": "rate", "rate": 0.05},
            "payload": {"kind": "targeted", "target_action": 0},
        },
        "poisoning": "inner",
        "algo": algo,
        "timesteps": 256,
        "n_envs": 2,
        "hyperparams": HYPER[algo],
        **fields,
    }
    return parse(ExperimentSpec, data, "test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny finished run per algorithm."""
    root = tmp_path_factory.mktemp("runs")
    return {algo: train(run_spec(algo), root / algo, wandb_mode="disabled") for algo in ALGOS}


def strict_json(path: Path) -> Any:
    """Parse JSON, refusing the non-standard NaN / Infinity constants."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_load_policy_matches_the_trained_model(algo: str, runs: dict[str, Path]) -> None:
    run = runs[algo]
    policy, card = rlbackdoor.load_policy(run)
    model = ALGOS[algo].load(run / "model.zip", device="cpu")  # our own file: the reference, unpickled on purpose
    obs = np.random.default_rng(1).normal(scale=[1.0, 1.0, 0.1, 1.0], size=(256, 4)).astype(np.float32)
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    for key, value in model.policy.state_dict().items():
        assert torch.equal(policy.state_dict()[key], value)
    assert not policy.training and card == read_card(run)
    assert set(card) >= CARD_KEYS and card["algo"] == algo and card["env"] == "CartPole-v1"
    assert strict_json(run / "card.json")["policy"]["observation_space"]["high"][1] == "inf"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_load_policy_rebuilds_image_policies_from_the_card(tmp_path: Path) -> None:
    spec = run_spec("ppo", env="rlbd/TrojanLavaGap-v0", attack=None, poisoning="outer", timesteps=128)
    run = train(spec, tmp_path / "lava", wandb_mode="disabled")
    policy, card = load_policy(run)
    assert card["policy"]["observation_space"]["shape"] == [3, 7, 7]  # SB3 trained on transposed images
    assert card["policy"]["kwargs"]["normalize_images"] is False
    model = PPO.load(run / "model.zip", device="cpu")
    obs = np.random.default_rng(0).integers(0, 11, size=(32, 7, 7, 3), dtype=np.uint8)  # as the env gives them
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


class Planted:
    """Unpickling this object writes a marker file: what a malicious model.zip would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",)


def test_load_policy_never_unpickles_a_tampered_model_zip(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("card.json", "policy.safetensors"):
        (run / name).write_bytes((runs["ppo"] / name).read_bytes())
    marker = tmp_path / "marker"
    with zipfile.ZipFile(runs["ppo"] / "model.zip") as src, zipfile.ZipFile(run / "model.zip", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "data":
                entries = json.loads(data)
                payload = base64.b64encode(pickle.dumps(Planted(marker))).decode()
                entries["policy_class"] = {":type:": "<class 'type'>", ":serialized:": payload}
                data = json.dumps(entries).encode()
            dst.writestr(item, data)
    policy, _ = load_policy(run)
    assert policy.predict(np.zeros((1, 4), dtype=np.float32))[0].shape == (1,)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - SB3's own loader chokes after running the payload
        PPO.load(run / "model.zip", device="cpu")
    assert marker.read_text() == "pwned"  # the plant is live: unpickling model.zip runs it


@pytest.fixture
def copy_run(runs: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "copy"
    run.mkdir()
    for path in runs["ppo"].iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    return run


def edit_card(run: Path, edit: Any) -> None:
    card = json.loads((run / "card.json").read_text())
    edit(card)
    (run / "card.json").write_text(json.dumps(card))


def nan_weights(run: Path) -> None:
    state = load_file(run / "policy.safetensors")
    state["action_net.bias"][0] = float("nan")
    save_file(state, run / "policy.safetensors")
    reseal(run)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "policy.safetensors").write_bytes(b"\x00" * 40), "corrupt"),
        (nan_weights, "weights action_net.bias hold NaN or inf"),
        (
            lambda run: (run / "policy.safetensors").write_bytes((run / "policy.safetensors").read_bytes()[:-100]),
            "corrupt",
        ),
        (lambda run: (run / "policy.safetensors").unlink(), "missing"),
        (lambda run: (run / "card.json").unlink(), "no card.json"),
        (lambda run: (run / "card.json").write_text("{not json"), "unreadable"),
        (lambda run: edit_card(run, lambda c: c["policy"]["kwargs"].update(net_arch=[32])), "do not fit"),
        (lambda run: edit_card(run, lambda c: c["policy"].update({"class": "builtins.eval"})), "unknown class"),
        (
            lambda run: edit_card(run, lambda c: c["policy"]["kwargs"].update(activation_fn="os.system")),
            "unknown class",
        ),
        (
            lambda run: edit_card(run, lambda c: c["policy"]["observation_space"].update(type="Graph")),
            "policy.observation_space.type: unknown space type 'Graph'",
        ),
        (lambda run: edit_card(run, lambda c: c.pop("policy")), "card.json: policy: missing"),
    ],
)
def test_damaged_runs_raise_one_line_artifact_errors(copy_run: Path, damage: Any, message: str) -> None:
    damage(copy_run)
    with pytest.raises(ArtifactError, match=message) as info:
        load_policy(copy_run)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["policy.safetensors", "card.json"])
def test_randomly_damaged_runs_load_or_fail_in_one_line(copy_run: Path, name: str) -> None:
    good, refused = (copy_run / name).read_bytes(), 0
    for seed in range(100):
        data = damaged(good, seed)
        (copy_run / name).write_bytes(data)
        try:
            policy, _ = load_policy(copy_run)
        except ArtifactError as err:
            refused += 1
            assert "\n" not in str(err)
        else:
            assert all(p.isfinite().all() for p in policy.parameters())
            assert name == "card.json" or data == good  # the card's weights_sha256 catches any change of the weights
    assert refused >= 50


def test_weights_changed_after_training_are_refused(copy_run: Path) -> None:
    data = bytearray((copy_run / "policy.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last weight: still a valid file of finite weights
    (copy_run / "policy.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError, match=r"policy\.safetensors: its SHA-256 differs from the weights_sha256 in card"
    ):
        load_policy(copy_run)
    edit_card(copy_run, lambda c: c.update(weights_sha256=5))
    with pytest.raises(ArtifactError, match=r"card\.json: weights_sha256"):
        load_policy(copy_run)
    edit_card(copy_run, lambda c: c.pop("weights_sha256"))  # a run written before cards recorded it
    load_policy(copy_run)


def test_a_card_naming_code_outside_the_trusted_packages_runs_nothing(copy_run: Path, tmp_path: Path, capsys) -> None:
    """``pydoc:pipepager`` would run a shell command when the env is rebuilt; ``this:`` would import a module."""
    marker = tmp_path / "pwned"
    hostile = {"name": "pydoc:pipepager", "kwargs": {"cmd": f"touch {marker}"}}
    edit_card(copy_run, lambda c: c["attack"].update(base_wrappers=[hostile]))
    steps = collect(gym.make("CartPole-v1"), None, 20, seed=0).save(tmp_path / "steps.npz")
    inputs = ["detect", str(copy_run), "-d", "bands", "--inputs", str(steps)]
    for argv in (
        ["eval", str(copy_run)],
        ["detect", str(copy_run), "-d", "probe"],
        inputs,
        ["sanitize", str(copy_run)],
    ):
        assert main([*argv, "--wandb-mode", "disabled"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            len(err.splitlines()) == 1 and "attack.base_wrappers.0 'pydoc:pipepager' would import module 'pydoc'" in err
        )
    edit_card(copy_run, lambda c: c.update(attack=None) or c["config"].update(attack={"base_wrappers": [hostile]}))
    with pytest.raises(ArtifactError, match=r"config\.attack\.base_wrappers\.0 'pydoc:pipepager' would import module"):
        load_policy(copy_run)
    edit_card(copy_run, lambda c: c.update(env="this:Foo-v0"))
    with pytest.raises(ArtifactError, match="env 'this:Foo-v0' would import module 'this'"):
        load_policy(copy_run)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "sanitize"])
@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("x", r"train: 'x' is not a mapping or null"),
        (5, r"train: 5 is not a mapping or null"),
        ([1], r"train: \[1\] is not a mapping or null"),
        (True, r"train: True is not a mapping or null"),
        (float("nan"), r"train: nan is not a mapping or null"),
        ({"poison_rate": "x"}, r"train\.poison_rate: 'x' is not an integer or a number or null"),
        ({"poison_rate": 2}, r"train\.poison_rate: 2 is not a rate in 0\.\.1"),
        ({"poison_rate": float("nan")}, r"train\.poison_rate: nan is not a rate in 0\.\.1"),
    ],
)
def test_a_malformed_train_entry_is_one_line_naming_card_and_field(
    copy_run: Path, capsys: pytest.CaptureFixture[str], command: str, train: Any, message: str
) -> None:
    edit_card(copy_run, lambda c: c.update(train=train))
    assert main([command, str(copy_run), "--episodes", "1", "--seeds", "1", "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert re.fullmatch(rf"rlbd: error: {re.escape(str(copy_run / 'card.json'))}: {message}; retrain .*", err)


@pytest.mark.parametrize(
    "space",
    [
        spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32),
        spaces.Box(0, 255, shape=(3, 7, 7), dtype=np.uint8),
        spaces.Box(np.array([-1.0, 0.0]), np.array([1.0, 2.0]), dtype=np.float64),
        spaces.Box(-1.0, 1.0, shape=(), dtype=np.float32),
        spaces.Box(np.iinfo(np.int64).min, np.iinfo(np.int64).max, shape=(2,), dtype=np.int64),
        spaces.Box(0, np.iinfo(np.uint64).max, shape=(2,), dtype=np.uint64),
        spaces.Box(np.zeros(2, dtype=bool), np.ones(2, dtype=bool), dtype=bool),
        spaces.Discrete(5, start=-2),
        spaces.Discrete(100_000),
        spaces.MultiDiscrete([3, 4], start=[1, 0]),
        spaces.MultiBinary(6),
        spaces.MultiBinary([2, 3]),
        spaces.Dict({"a": spaces.Discrete(2), "b": spaces.Box(-1, 1, shape=(2,))}),
    ],
)
def test_spaces_round_trip_through_strict_json(space: spaces.Space, tmp_path: Path) -> None:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space_to_json(space), allow_nan=False))
    assert space_from_json(strict_json(path)) == space


def test_policies_outside_the_allow_list_are_refused_before_training() -> None:
    space = spaces.Box(-1, 1, shape=(2,))
    policy = ActorCriticPolicy(space, spaces.Discrete(2), lambda _: 0.0, activation_fn=torch.nn.Hardswish)
    with pytest.raises(SpecError, match="allow-list"):
        describe_policy(policy)
