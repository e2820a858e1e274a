"""Checkpoints of a running training: ``checkpoints/<steps>/`` with the SB3 zip, the DQN replay buffer and ``state.json``.

A checkpoint is taken at the start of a rollout, after the update on the previous one, so its
weights have learnt from exactly the steps it counts. ``state.json`` is written last: a checkpoint
without it is incomplete and ignored. Resuming rebuilds the model from the config and loads the
weights and optimizer with SB3's ``set_parameters`` (``torch.load(weights_only=True)``) and the
replay buffer from ``.npz`` without pickles, then trains the remaining steps.
"""

from __future__ import annotations

import io
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from rlbackdoor.errors import ArtifactError, detail
from rlbackdoor.jsonfile import read_json
from rlbackdoor.training.artifacts import CARD, atomic_write, non_finite, save_model, write_json
from rlbackdoor.training.card_schema import MAX_CARD_BYTES

FOLDER, STATE, MODEL, REPLAY = "checkpoints", "state.json", "model.zip", "replay.npz"
FORMAT = "rlbd-checkpoint/1"
COUNTS = ("n_steps", "n_poisoned", "n_triggered", "n_hits")
_REPLAY_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
_MODEL_COUNTERS = ("num_timesteps", "_n_updates", "_episode_num", "_n_calls")
MAX_COUNT = 2**53
"""The largest counter a checkpoint may hold (exact as a float; past it the state is damaged)."""


def counts_of(counter: object | None) -> dict[str, int]:
    """The poisoning counters an attack or outer-loop poisoner keeps (``n_steps``, ``n_poisoned``, ...)."""
    return {k: int(getattr(counter, k)) for k in COUNTS if hasattr(counter, k)}


def save_checkpoint(model: BaseAlgorithm, run_dir: Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint of ``model`` with ``state`` (config, counters, seconds); drop older checkpoints."""
    root = run_dir / FOLDER
    folder = root / f"{model.num_timesteps:012d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / MODEL)
    if isinstance(model, OffPolicyAlgorithm):
        rb = model.replay_buffer
        buffer = io.BytesIO()
        np.savez(buffer, pos=rb.pos, full=rb.full, **{k: getattr(rb, k) for k in _replay_arrays(rb)})
        atomic_write(folder / REPLAY, buffer.getvalue())
    counters = {k: int(getattr(model, k)) for k in _MODEL_COUNTERS if hasattr(model, k)}
    write_json(folder / STATE, {"format": FORMAT, **state, "model": counters})
    for old in root.iterdir():
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint of an unfinished run started from ``config``.

    Raises :class:`ArtifactError` for a finished run, a directory without checkpoints, or a run of another config.
    """
    if (run_dir / CARD).exists():
        raise ArtifactError(f"{run_dir}: the run already finished ({CARD} exists); start a new run with --out")
    root = run_dir / FOLDER
    found = sorted(p for p in root.glob("*") if (p / STATE).is_file()) if root.is_dir() else []
    if not found:
        raise ArtifactError(f"{run_dir}: no checkpoint to resume; pass the run directory of an interrupted rlbd train")
    folder = found[-1]
    try:
        state = read_json(folder / STATE, MAX_CARD_BYTES)  # a state holds a run's config, as its card does
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{folder / STATE}: unreadable ({err}); resume from another run or start anew") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ArtifactError(f"{folder / STATE}: not an rlbd checkpoint; pass a run directory rlbd train wrote")
    if state.get("config") != config:
        fields = _differing(config, state.get("config"))
        shown = ", ".join(fields[:3]) + (f" and {len(fields) - 3} more" if len(fields) > 3 else "")
        raise ArtifactError(
            f"{run_dir}: the run was started from a different config ({shown} differ); resume with its own config "
            "and overrides"
        )
    problem = _state_problem(state, config["timesteps"])
    if problem:
        raise ArtifactError(f"{folder / STATE}: {problem}; resume from another run or start anew")
    return folder, state


def _differing(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """The dotted paths of the fields where two JSON values differ (``config`` when they differ as a whole)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = dict.fromkeys([*ours, *theirs])
        return [p for key in keys for p in _differing(ours.get(key), theirs.get(key), f"{path}{key}.")]
    return [] if ours == theirs else [path.rstrip(".") or "config"]


def _state_problem(state: dict[str, Any], timesteps: int) -> str | None:
    """What is wrong with a checkpoint's counters, clock and resume history, if anything."""
    for key, names in (("model", _MODEL_COUNTERS), ("poison", COUNTS)):
        values = state.get(key, {})
        if not isinstance(values, dict) or not all(
            k in names and type(v) is int and 0 <= v <= MAX_COUNT for k, v in values.items()
        ):
            return f"'{key}' must map {', '.join(names)} to counts"
    done = state.get("model", {}).get("num_timesteps")
    if done is None:
        return "'model' lacks num_timesteps"
    if done >= timesteps:
        return f"'model' counts {done} steps of a run of {timesteps}"
    poison = {k: state.get("poison", {}).get(k, 0) for k in COUNTS}
    if not poison["n_hits"] <= poison["n_poisoned"] <= poison["n_steps"]:
        return "'poison' counts more hits than poisoned steps or more poisoned steps than steps"
    for key in ("seconds", "cpu_seconds"):
        value = state.get(key, 0.0)
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            return f"'{key}' is {value!r}, not a number of seconds"
    resumed = state.get("resumed_at", [])
    if not isinstance(resumed, list) or not all(type(step) is int and 0 < step <= done for step in resumed):
        return f"'resumed_at' must list the steps (up to {done}) the run was resumed at"
    return None


def restore(model: BaseAlgorithm, folder: Path, state: dict[str, Any], counter: object | None) -> None:
    """Load a checkpoint into a freshly built ``model`` and poisoning ``counter`` (no unpickling)."""
    optimizer = model.policy.optimizer
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        model.set_parameters(str(folder / MODEL), exact_match=True, device="cpu")
    except Exception as err:  # damaged bytes make the zip reader and the weights-only unpickler raise anything
        # torch's unpickling message spans lines and suggests loading unsafely: never pass it on
        reason = "not a weights-only file" if isinstance(err, pickle.UnpicklingError) else detail(err)
        raise ArtifactError(
            f"{folder / MODEL}: cannot load ({reason}); resume from another run or start anew"
        ) from None
    broken = non_finite(model.policy.state_dict())
    problem = f"weights {broken} hold NaN or inf" if broken else _optimizer_problem(optimizer, built)
    if problem:
        raise ArtifactError(f"{folder / MODEL}: {problem}; resume from another run or start anew")
    poison = state.get("poison", {})
    if set(poison) != set(counts_of(counter)):
        raise ArtifactError(
            f"{folder / STATE}: 'poison' counts {sorted(poison) or 'nothing'}, not what the run's attack counts; "
            "resume from another run or start anew"
        )
    for key, value in state["model"].items():
        setattr(model, key, value)
    for key, value in poison.items():
        setattr(counter, key, value)
    if isinstance(model, OffPolicyAlgorithm):
        rb = model.replay_buffer
        try:
            with np.load(folder / REPLAY, allow_pickle=False) as data:
                for key in _replay_arrays(rb):
                    if data[key].shape != getattr(rb, key).shape:
                        raise ValueError(f"{key} has shape {data[key].shape}, expected {getattr(rb, key).shape}")
                    getattr(rb, key)[...] = data[key]
                rb.pos, rb.full = int(data["pos"]), bool(data["full"])
        except Exception as err:  # a damaged zip raises anything, from BadZipFile to NotImplementedError
            problem = detail(err)
        else:
            problem = _replay_problem(rb)
        if problem:
            raise ArtifactError(f"{folder / REPLAY}: cannot load ({problem}); resume from another run or start anew")


def _same_kind(loaded: Any, built: Any) -> bool:
    """Whether an optimizer setting read from a checkpoint may stand for the freshly built optimizer's: any finite
    number for a number (learning rates follow schedules), the same value for a flag, a name or ``None``."""
    if isinstance(built, tuple | list):
        return isinstance(loaded, tuple | list) and len(loaded) == len(built) and all(map(_same_kind, loaded, built))
    if isinstance(built, int | float) and not isinstance(built, bool):
        return type(loaded) in (int, float) and math.isfinite(loaded)
    return type(loaded) is type(built) and loaded == built


def _optimizer_problem(optimizer: torch.optim.Optimizer, built: list[dict[str, Any]]) -> str | None:
    """What is wrong with a loaded optimizer, if anything: settings unlike ``built`` (the fresh optimizer's), or a
    state that does not fit its parameter, holds NaN or counts steps below 0 (all fail only mid-training)."""
    for group, fresh in zip(optimizer.param_groups, built, strict=True):
        for key, value in fresh.items():
            if not _same_kind(group.get(key), value):
                return f"the optimizer's {key} is {group.get(key)!r}, not like {value!r}"
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.shape not in (param.shape, torch.Size()):
                    return f"the optimizer's {name} has shape {tuple(value.shape)}, not {tuple(param.shape)}"
                if not value.isfinite().all():
                    return f"the optimizer's {name} holds NaN or inf"
                if value.dim() == 0 and not (value >= 0 and value == value.round()):  # a scalar state counts steps
                    return f"the optimizer's {name} is {value.item()!r}, not a count of steps"
    return None


def _replay_arrays(rb: ReplayBuffer) -> list[str]:
    """The arrays a replay buffer holds (it has no ``next_observations`` when it optimizes memory usage)."""
    return [key for key in _REPLAY_ARRAYS if hasattr(rb, key)]


def _replay_problem(rb: ReplayBuffer) -> str | None:
    """What is wrong with a loaded replay buffer that training would fail on, if anything: a position outside it,
    actions outside the action space (Discrete from 0, as training requires), non-finite rewards or observations,
    done flags other than 0 and 1."""
    if not 0 <= rb.pos < rb.buffer_size:
        return f"pos {rb.pos} is outside the buffer of {rb.buffer_size}"
    space = rb.action_space
    if isinstance(space, spaces.Discrete) and not np.isin(rb.actions, np.arange(space.n)).all():
        return f"actions lie outside {space}"
    for key in ("observations", "next_observations", "rewards"):
        values = getattr(rb, key, None)
        if values is not None and values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"{key} hold NaN or inf"
    for key in ("dones", "timeouts"):
        if not np.isin(getattr(rb, key), (0, 1)).all():
            return f"{key} hold values other than 0 and 1"
    return None


class Checkpointer(BaseCallback):
    """Takes a checkpoint every ``every`` steps, at the start of a rollout (after the previous update).

    :param run_dir: the run directory.
    :param every: steps between checkpoints (0: never).
    :param state: returns the run's state to record (config, poisoning counters, seconds).
    """

    def __init__(self, run_dir: Path, every: int, state: Any) -> None:
        super().__init__()
        self.run_dir, self.every, self.state = run_dir, every, state
        self._next = 0
        self.saved: int | None = None
        """The step of the last checkpoint this callback took."""

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every if self.every else 0

    def _on_rollout_start(self) -> None:
        if self.every and self.num_timesteps >= self._next:
            save_checkpoint(self.model, self.run_dir, self.state())
            self.saved = self.num_timesteps
            self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        return True
