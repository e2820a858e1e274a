"""Registered ``rlbd/`` ids: Gymnasium and SB3 env checks, ``gymnasium.make`` by module prefix, the factory id, the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rlbackdoor
from rlbackdoor import BackdoorWrapper, SpecError, get_env_spec
from rlbackdoor.registry import FACTORY_ID, data_dir
from rlbackdoor.specs import EnvSpec, load

ROOT = Path(__file__).resolve().parents[1]
IDS = sorted(rlbackdoor.env_specs())
REGISTERED = sorted(k for k in gym.registry if k.startswith("rlbd/") and k != FACTORY_ID)  # with multi-agent adapters


def test_every_yaml_in_envs_is_registered_under_its_versioned_id() -> None:
    files = sorted(data_dir("envs").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        spec = load(EnvSpec, path)
        assert spec.id.startswith("rlbd/") and spec.id.rsplit("-v", 1)[1].isdigit()
        assert gym.spec(spec.id).kwargs["spec"] == spec.model_dump(mode="json")
        assert get_env_spec(f"rlbackdoor:{spec.id}") == spec
    assert FACTORY_ID in gym.registry
    assert set(IDS) <= set(REGISTERED)


@pytest.mark.parametrize("env_id", REGISTERED)
def test_registered_env_passes_the_gymnasium_and_sb3_checkers(env_id: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about wrapped envs, unbounded boxes, small images: not failures
        gym_check_env(gym.make(env_id), skip_render_check=True)
        sb3_check_env(gym.make(env_id), warn=False)


@pytest.mark.parametrize("env_id", IDS)
def test_registered_env_reports_the_attack_in_info(env_id: str) -> None:
    env = gym.make(env_id)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert set(info["rlbd"]) >= {"poisoned", "triggered", "n_steps", "n_poisoned"}
    env.action_space.seed(0)
    for _ in range(20):
        obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert set(info["rlbd"]) >= {"poisoned", "triggered", "hit", "target", "clean_reward", "n_hits"}
        if terminated or truncated:
            env.reset()


def test_make_by_module_prefix_in_a_fresh_interpreter(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import gymnasium as gym
        assert "rlbackdoor" not in sys.modules
        env = gym.make("rlbackdoor:rlbd/TrojanCartPole-v0")
        obs, info = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(0)
        print(json.dumps({"type": type(env.unwrapped).__name__, "rlbd": info["rlbd"]}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["type"] == "CartPoleEnv"
    assert result["rlbd"]["n_steps"] == 1 and result["rlbd"]["target"] == 0


def test_factory_id_builds_any_attack() -> None:
    env = gym.make(
        FACTORY_ID,
        env_id="Acrobot-v1",
        trigger={"kind": "additive", "indices": [4], "values": [1.0]},
        schedule={"kind": "rate", "rate": 1.0},
        payload={"kind": "untargeted", "mode": "fail_fast", "scale": 5.0},
        seed=3,
    )
    backdoor = env.get_wrapper_attr("attack")
    assert backdoor.spec.base == "Acrobot-v1" and backdoor.spec.seed == 3
    obs, info = env.reset(seed=0)
    assert info["rlbd"]["triggered"]
    _, reward, _, _, info = env.step(0)
    assert info["rlbd"]["poisoned"] and reward == -5.0 and info["rlbd"]["clean_reward"] == -1.0
    clean = gym.make("Acrobot-v1").reset(seed=0)[0]
    np.testing.assert_allclose(obs[4], min(clean[4] + 1.0, 4 * np.pi), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"rlbd/Backdoor-v0 needs env_id=<a Gymnasium id>"),
        ({"env_id": "NoSuchEnv-v9"}, r"base: cannot make 'NoSuchEnv-v9'.*use a registered Gymnasium id"),
        ({"env_id": "CartPole-v1", "schedule": {"kind": "rate", "rate": 2}}, r"rlbd/Backdoor-v0: schedule\.rate"),
        ({"env_id": "CartPole-v1", "colour": "red"}, r"rlbd/Backdoor-v0: colour: Extra inputs"),
        ({"env_id": "CartPole-v1", "base": "Acrobot-v1"}, r"env_id names the base env; drop base="),
        ({"env_id": "nosuchpkg:Foo-v0"}, r"base: cannot make 'nosuchpkg:Foo-v0' \(No module named 'nosuchpkg'"),
    ],
    ids=["no-env-id", "unknown-env-id", "bad-rate", "extra-field", "base-and-env-id", "missing-module"],
)
def test_factory_id_rejects_bad_kwargs(kwargs: dict, message: str) -> None:
    attack = {
        "trigger": {"kind": "value", "indices": [0], "values": [0.0]},
        "schedule": {"kind": "rate", "rate": 0.1},
        "payload": {"kind": "untargeted"},
    }
    with pytest.raises(SpecError, match=message):
        gym.make(FACTORY_ID, **{**attack, **kwargs})


def test_registered_ids_refuse_other_kwargs() -> None:
    with pytest.raises(SpecError, match=r"unknown keyword arguments \['foo'\]; registered ids take render_mode only"):
        gym.make("rlbackdoor:rlbd/TrojanCartPole-v0", foo=1)
    with pytest.raises(SpecError, match=r"spec: expected an attack spec mapping, got str"):
        gym.make("rlbackdoor:rlbd/TrojanCartPole-v0", spec="nope")
    spec = get_env_spec("rlbd/TrojanCartPole-v0").model_dump(mode="json")  # id and description are not attack fields
    assert isinstance(rlbackdoor.make_env(spec), BackdoorWrapper)
    with pytest.raises(SpecError, match=r"spec: seeed: Extra inputs are not permitted \(fix: remove it or fix its"):
        rlbackdoor.make_env({**spec, "seeed": 5})  # was dropped: the env ran with seed 0


def test_unknown_ids_raise_spec_errors_listing_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"unknown backdoor env id 'rlbd/Nope-v0'; registered ids: .*TrojanCartPole-v0"):
        get_env_spec("rlbd/Nope-v0")
    with pytest.raises(SpecError, match="unknown backdoor env id 'CartPole-v1'"):
        get_env_spec("CartPole-v1")


def test_registered_env_is_a_backdoor_wrapper_over_the_clean_base() -> None:
    env = gym.make("rlbd/TrojanLavaGap-v0")
    wrapper = env.get_wrapper_attr("attack")
    assert isinstance(env, BackdoorWrapper)  # the base inside it carries gymnasium.make's checker and order enforcing
    assert wrapper.obs_trigger is not None and env.observation_space.shape == (7, 7, 3)


@pytest.mark.slow
def test_wheel_ships_the_envs_and_works_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it alone in a new venv; dependencies come from this venv's site-packages."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = dist.glob("rlbackdoor-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    shipped = {f"rlbackdoor/envs/{p.name}" for p in (ROOT / "envs").glob("*.yaml")}
    assert shipped and shipped <= names
    assert any(n.startswith("rlbackdoor/agents/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, timeout=300)
    # dependencies from this venv's site-packages: PYTHONPATH entries do not run .pth files, so the
    # editable install of the checkout stays out; the cwd is a temp dir, so the checkout is not on sys.path
    site_packages = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": site_packages, "PYTHONNOUSERSITE": "1"}
    code = textwrap.dedent(
        """
        import json
        import gymnasium as gym
        env = gym.make("rlbackdoor:rlbd/TrojanLavaGap-v0")
        obs, info = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(2)
        import rlbackdoor
        from rlbackdoor.registry import data_dir
        print(json.dumps({"file": rlbackdoor.__file__, "envs": str(data_dir("envs")), "shape": obs.shape, "rlbd": info["rlbd"]}))
        """
    )
    out = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(venv)
    assert Path(result["envs"]).is_relative_to(venv)
    assert result["shape"] == [7, 7, 3] and result["rlbd"]["n_steps"] == 1
    listed = subprocess.run(
        [venv / "bin" / "rlbd", "envs", "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0, listed.stderr
    assert "rlbd/TrojanLavaGap-v0" in listed.stdout
