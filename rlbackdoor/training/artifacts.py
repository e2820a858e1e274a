"""Run artifacts: ``model.zip`` (SB3), ``policy.safetensors`` (weights only) and ``card.json``, written atomically.

:func:`load_policy` rebuilds the policy from the card (policy class from an allow-list, spaces and
``policy_kwargs`` from JSON) and loads the safetensors weights with ``strict=True``: nothing is
unpickled, so a tampered ``model.zip`` cannot run code during analysis.
"""

from __future__ import annotations

import io
import json
import os
import platform
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.dqn.policies import CnnPolicy, DQNPolicy, MultiInputPolicy

from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.training.presets import CLASS_KEYS, CLASSES, class_name

CARD, WEIGHTS, MODEL = "card.json", "policy.safetensors", "model.zip"
RETRAIN = "retrain or re-export the run"

POLICIES: dict[str, type[BasePolicy]] = {
    "ActorCriticPolicy": ActorCriticPolicy,
    "ActorCriticCnnPolicy": ActorCriticCnnPolicy,
    "MultiInputActorCriticPolicy": MultiInputActorCriticPolicy,
    "DQNPolicy": DQNPolicy,
    "DQNCnnPolicy": CnnPolicy,
    "DQNMultiInputPolicy": MultiInputPolicy,
}
"""Policy classes :func:`load_policy` may rebuild, by the name the card records."""

_SKIPPED_KWARGS = ("observation_space", "action_space", "lr_schedule")
PACKAGES = ("rlbackdoor", "stable-baselines3", "gymnasium", "torch", "numpy", "minigrid", "pettingzoo")


# --------------------------------------------------------------------------------------- atomic writes
def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def save_model(model: BaseAlgorithm, path: Path) -> None:
    """Atomically write the SB3 zip of ``model`` (``model.save``, to memory first)."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------- spaces
def _finite_or_name(values: np.ndarray) -> list[Any]:
    """Bounds as JSON: non-finite entries as the strings ``inf``, ``-inf``, ``nan`` (numpy parses them back)."""
    return [v if np.isfinite(v) else str(v) for v in values.astype(np.float64).reshape(-1).tolist()]


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """A JSON description of a Box, Discrete, MultiDiscrete, MultiBinary or Dict space."""
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "low": _finite_or_name(space.low),
            "high": _finite_or_name(space.high),
            "shape": list(space.shape),
            "dtype": str(space.dtype),
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist()}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(v) for k, v in space.spaces.items()}}
    raise SpecError(
        f"cannot record a {type(space).__name__} space in the card; use Box, Discrete, MultiDiscrete or Dict"
    )


def space_from_json(data: dict[str, Any]) -> spaces.Space:
    """The space :func:`space_to_json` described; anything else raises :class:`ArtifactError`."""
    try:
        kind = data["type"]
        if kind == "Box":
            dtype = np.dtype(data["dtype"])
            shape = tuple(data["shape"])
            low = np.asarray(data["low"], dtype=dtype).reshape(shape)
            high = np.asarray(data["high"], dtype=dtype).reshape(shape)
            return spaces.Box(low, high, shape=shape, dtype=dtype)
        if kind == "Discrete":
            return spaces.Discrete(int(data["n"]), start=int(data["start"]))
        if kind == "MultiDiscrete":
            return spaces.MultiDiscrete(data["nvec"], start=data["start"])
        if kind == "MultiBinary":
            return spaces.MultiBinary(data["n"])
        if kind == "Dict":
            return spaces.Dict({k: space_from_json(v) for k, v in data["spaces"].items()})
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"card.json: policy space is malformed ({err}); {RETRAIN}") from None
    raise ArtifactError(f"card.json: unknown policy space type {kind!r}; {RETRAIN}")


# --------------------------------------------------------------------------------------------- policy
def _policy_name(policy: BasePolicy) -> str:
    for name, cls in POLICIES.items():
        if type(policy) is cls:
            return name
    raise SpecError(
        f"policy {type(policy).__name__} cannot be rebuilt without unpickling; use MlpPolicy, CnnPolicy or MultiInputPolicy"
    )


def _kwarg_to_json(key: str, value: Any) -> Any:
    if key in CLASS_KEYS:
        return class_name(value)
    if isinstance(value, dict):
        return {k: _kwarg_to_json(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_kwarg_to_json("", v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"policy_kwargs: {key}={value!r} cannot be recorded as JSON; use plain numbers, lists and names")


def describe_policy(policy: BasePolicy) -> dict[str, Any]:
    """What :func:`rebuild_policy` needs: class name, spaces and JSON constructor kwargs.

    Raises :class:`SpecError` when the policy could not be rebuilt safely (checked before training).
    """
    params = policy._get_constructor_parameters()
    kwargs = {k: _kwarg_to_json(k, v) for k, v in params.items() if k not in _SKIPPED_KWARGS}
    if isinstance(policy, ActorCriticPolicy):
        kwargs["share_features_extractor"] = policy.share_features_extractor
    return {
        "class": _policy_name(policy),
        "observation_space": space_to_json(policy.observation_space),
        "action_space": space_to_json(policy.action_space),
        "kwargs": kwargs,
    }


def rebuild_policy(description: dict[str, Any]) -> BasePolicy:
    """A fresh policy (random weights) from :func:`describe_policy`'s output; bad cards raise :class:`ArtifactError`."""
    try:
        cls = POLICIES[description["class"]]
        kwargs = {k: CLASSES[v] if k in CLASS_KEYS else v for k, v in dict(description.get("kwargs") or {}).items()}
        observation_space = space_from_json(description["observation_space"])
        action_space = space_from_json(description["action_space"])
    except (KeyError, TypeError) as err:
        raise ArtifactError(
            f"card.json: policy entry is incomplete or names an unknown class ({err}); {RETRAIN}"
        ) from None
    try:
        return cls(observation_space, action_space, lambda _: 0.0, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ArtifactError(f"card.json: cannot rebuild the {cls.__name__} ({err}); {RETRAIN}") from None


def save_weights(policy: BasePolicy, path: Path) -> None:
    """Atomically write the policy's state dict as safetensors (tensors copied: shared modules are fine)."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in policy.state_dict().items()}
    atomic_write(path, save(state))


# ----------------------------------------------------------------------------------------------- card
def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a run depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def read_card(run_dir: str | Path) -> dict[str, Any]:
    """The ``card.json`` of a finished run; a missing or unreadable card raises :class:`ArtifactError`."""
    path = Path(run_dir) / CARD
    if not path.is_file():
        raise ArtifactError(f"{run_dir}: no {CARD}; pass the directory of a finished run (rlbd train writes it last)")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err}); {RETRAIN}") from None
    if not isinstance(card, dict):
        raise ArtifactError(f"{path}: expected a JSON object; {RETRAIN}")
    return card


def write_artifacts(model: BaseAlgorithm, run_dir: Path, card: dict[str, Any]) -> None:
    """Write ``policy.safetensors``, ``model.zip`` and, last, ``card.json`` (its presence marks a finished run)."""
    save_weights(model.policy, run_dir / WEIGHTS)
    save_model(model, run_dir / MODEL)
    write_json(run_dir / CARD, card)


def load_policy(run_dir: str | Path) -> tuple[BasePolicy, dict[str, Any]]:
    """Rebuild a run's policy from ``card.json`` and ``policy.safetensors``, never unpickling anything.

    :param run_dir: a finished run directory.
    :return: the policy in eval mode on CPU, and the card.
    """
    card = read_card(run_dir)
    check_card_code(Path(run_dir) / CARD, card)
    if not isinstance(card.get("policy"), dict):
        raise ArtifactError(f"{run_dir}/{CARD}: no 'policy' entry to rebuild from; {RETRAIN}")
    policy = rebuild_policy(card["policy"])
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {RETRAIN}")
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: corrupt safetensors file ({err}); {RETRAIN}") from None
    broken = [name for name, tensor in state.items() if not tensor.isfinite().all()]
    if broken:
        raise ArtifactError(f"{path}: weights {broken[0]} hold NaN or inf; {RETRAIN}")
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ArtifactError(
            f"{path}: weights do not fit the policy in the card ({first[-1].strip()}); {RETRAIN}"
        ) from None
    policy.set_training_mode(False)
    return policy, card


TRUSTED_MODULES = ("gymnasium", "minigrid", "pettingzoo", "mpe2", "rlbackdoor")
"""Packages whose modules a card may name (``module:Id`` env ids, ``module:Class`` base wrappers): analysis
imports nothing else, since a hostile card could name any callable."""


def check_card_code(path: Path, card: dict[str, Any]) -> None:
    """Refuse a card whose env ids or base wrappers would import a module outside :data:`TRUSTED_MODULES`."""
    attack = card.get("attack") if isinstance(card.get("attack"), dict) else {}
    wrappers = attack.get("base_wrappers") or []
    names = [("env", card.get("env")), ("attack.base", attack.get("base"))]
    names += [
        (f"attack.base_wrappers.{i}", w.get("name") if isinstance(w, dict) else w) for i, w in enumerate(wrappers)
    ]
    for field, name in names:
        if name is None:
            continue
        module = str(name).partition(":")[0] if ":" in str(name) else ""
        if module and module.split(".")[0] not in TRUSTED_MODULES:
            raise ArtifactError(
                f"{path}: {field} '{name}' would import module '{module}', which loading a run for analysis never does "
                f"(trusted: {', '.join(TRUSTED_MODULES)}); rebuild the env yourself if you trust this run"
            )
