"""Run artifacts: ``model.zip`` (SB3), ``policy.safetensors`` (weights only) and ``card.json``, written atomically.

:func:`load_policy` rebuilds the policy from the card (:mod:`rlbackdoor.training.card_schema`: policy class from
an allow-list, spaces and ``policy_kwargs`` from checked JSON) and loads the safetensors weights with
``strict=True`` once their names, shapes and dtypes fit: nothing is unpickled, so a tampered ``model.zip`` cannot
run code during analysis, and a malformed or hostile run fails with one :class:`ArtifactError` line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import reprlib
import uuid
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import (
    BasePolicy,
)

from rlbackdoor.errors import ArtifactError
from rlbackdoor.jsonfile import TooLargeError, read_bytes, read_json
from rlbackdoor.training.card_schema import (
    CARD,
    MAX_CARD_BYTES,
    MAX_WEIGHTS,
    RETRAIN,
    card_entry,
    expect,
    rebuild_policy,
)

WEIGHTS, MODEL = "policy.safetensors", "model.zip"
MAX_WEIGHTS_BYTES = 8 * MAX_WEIGHTS + 2**20
"""The largest ``policy.safetensors`` read: float64 weights at the card's cap, and a header."""
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


def save_weights(policy: BasePolicy, path: Path) -> str:
    """Atomically write the policy's state dict as safetensors (tensors copied: shared modules are fine).

    :return: the SHA-256 of the file, which the card records.
    """
    state = {k: v.detach().cpu().clone().contiguous() for k, v in policy.state_dict().items()}
    data = save(state)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


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
    """The ``card.json`` of a finished run; a missing, unreadable or oversized (:data:`MAX_CARD_BYTES`) card raises
    :class:`ArtifactError`."""
    path = Path(run_dir) / CARD
    if path.exists() and not path.is_file():
        raise ArtifactError(f"{path}: not a regular file; {RETRAIN}")
    if not path.is_file():
        from rlbackdoor.zoo import MANIFEST

        if (Path(run_dir) / MANIFEST).is_file():
            raise ArtifactError(
                f"{run_dir}: a zoo, not a run; pass one of its agents ({Path(run_dir) / 'agents'}/<name>), "
                "or run rlbd detect on the zoo"
            )
        raise ArtifactError(f"{run_dir}: no {CARD}; pass the directory of a finished run (rlbd train writes it last)")
    try:
        card = read_json(path, MAX_CARD_BYTES)
    except TooLargeError:
        raise ArtifactError(
            f"{path}: larger than the {MAX_CARD_BYTES // 2**20} MiB a card may hold; {RETRAIN}"
        ) from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err}); {RETRAIN}") from None
    if not isinstance(card, dict):
        raise ArtifactError(f"{path}: expected a JSON object; {RETRAIN}")
    return card


def write_artifacts(model: BaseAlgorithm, run_dir: Path, card: dict[str, Any]) -> None:
    """Write ``policy.safetensors``, ``model.zip`` and, last, ``card.json`` (its presence marks a finished run), which
    records the weights' SHA-256 as ``weights_sha256``."""
    digest = save_weights(model.policy, run_dir / WEIGHTS)
    save_model(model, run_dir / MODEL)
    write_json(run_dir / CARD, {**card, "weights_sha256": digest})


def load_policy(run_dir: str | Path) -> tuple[BasePolicy, dict[str, Any]]:
    """Rebuild a run's policy from ``card.json`` and ``policy.safetensors``, never unpickling anything.

    :param run_dir: a finished run directory.
    :return: the policy in eval mode on CPU, and the card.
    """
    card = read_card(run_dir)
    check_card_code(Path(run_dir) / CARD, card)
    policy = rebuild_policy(card_entry(Path(run_dir) / CARD, card, "policy", dict), Path(run_dir) / CARD)
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {RETRAIN}")
    digest = expect(f"{Path(run_dir) / CARD}: weights_sha256", card.get("weights_sha256"), str, type(None))
    try:
        data = read_bytes(path, MAX_WEIGHTS_BYTES)
        state = load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: corrupt safetensors file ({err}); {RETRAIN}") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactError(f"{path}: its SHA-256 differs from the weights_sha256 in {CARD} (damaged); {RETRAIN}")
    misfit = _misfit(state, policy.state_dict())
    if misfit:
        raise ArtifactError(f"{path}: weights do not fit the policy in {CARD} ({misfit}); {RETRAIN}")
    broken = non_finite(state)
    if broken:
        raise ArtifactError(f"{path}: weights {broken} hold NaN or inf; {RETRAIN}")
    policy.load_state_dict(state, strict=True)
    policy.set_training_mode(False)
    return policy, card


def non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor in ``state`` that holds NaN or inf, if any."""
    return next((name for name, tensor in state.items() if not tensor.isfinite().all()), None)


def _misfit(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """How the tensors of a weights file differ from the policy's (names, shapes, dtypes), or ``None``."""
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        first = f"no tensor {missing[0]}" if missing else f"unexpected tensor {reprlib.repr(extra[0])}"
        return f"{first}; {len(missing)} missing, {len(extra)} unexpected"
    for name, tensor in expected.items():
        got = state[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            return f"{name} is {list(got.shape)} {got.dtype}, the policy needs {list(tensor.shape)} {tensor.dtype}"
    return None


TRUSTED_MODULES = ("gymnasium", "minigrid", "pettingzoo", "mpe2", "rlbackdoor")
"""Packages whose modules a card may name (``module:Id`` env ids, ``module:Class`` base wrappers): analysis
imports nothing else, since a hostile card could name any callable."""


def check_card_code(path: Path, card: dict[str, Any]) -> None:
    """Refuse a card whose env ids or base wrappers would import a module outside :data:`TRUSTED_MODULES`."""
    config = card.get("config") if isinstance(card.get("config"), dict) else {}
    names = [("env", card.get("env"))]
    for where, attack in (("attack", card.get("attack")), ("config.attack", config.get("attack"))):
        if not isinstance(attack, dict):
            continue
        wrappers = expect(f"{path}: {where}.base_wrappers", attack.get("base_wrappers") or [], list)
        names.append((f"{where}.base", attack.get("base")))
        names += [
            (f"{where}.base_wrappers.{i}", w.get("name") if isinstance(w, dict) else w) for i, w in enumerate(wrappers)
        ]
    for field, name in names:
        if name is None:
            continue
        module = str(name).partition(":")[0] if ":" in str(name) else ""
        if module and module.split(".")[0] not in TRUSTED_MODULES:
            raise ArtifactError(
                f"{path}: {field} {reprlib.repr(name)} would import module {reprlib.repr(module)}, which loading a run for analysis never does "
                f"(trusted: {', '.join(TRUSTED_MODULES)}); rebuild the env yourself if you trust this run"
            )
