"""Checkpoints of a running training: ``checkpoints/<steps>/`` with the SB3 zip, the DQN replay buffer and ``state.json``.

A checkpoint is taken at the start of a rollout, after the update on the previous one, so its
weights have learnt from exactly the steps it counts. ``state.json`` is written last: a checkpoint
without it is incomplete and ignored. Resuming rebuilds the model from the config and loads the
weights and optimizer with SB3's ``set_parameters`` (``torch.load(weights_only=True)``) and the
replay buffer from ``.npz`` without pickles, then trains the remaining steps.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
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
        np.savez(buffer, pos=rb.pos, full=rb.full, **{k: getattr(rb, k) for k in _REPLAY_ARRAYS})
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
        raise ArtifactError(
            f"{run_dir}: the run was started from a different config; resume with its own config and overrides"
        )
    for key, names in (("model", _MODEL_COUNTERS), ("poison", COUNTS)):
        values = state.get(key, {})
        if not isinstance(values, dict) or not all(k in names and type(v) is int and v >= 0 for k, v in values.items()):
            raise ArtifactError(
                f"{folder / STATE}: '{key}' must map {', '.join(names)} to counts; resume from another run"
            )
    if "num_timesteps" not in state.get("model", {}):
        raise ArtifactError(f"{folder / STATE}: 'model' lacks num_timesteps; resume from another run")
    return folder, state


def restore(model: BaseAlgorithm, folder: Path, state: dict[str, Any], counter: object | None) -> None:
    """Load a checkpoint into a freshly built ``model`` and poisoning ``counter`` (no unpickling)."""
    try:
        model.set_parameters(str(folder / MODEL), exact_match=True, device="cpu")
    except Exception as err:  # damaged bytes make the zip reader and the weights-only unpickler raise anything
        # torch's unpickling message spans lines and suggests loading unsafely: never pass it on
        reason = "not a weights-only file" if isinstance(err, pickle.UnpicklingError) else detail(err)
        raise ArtifactError(
            f"{folder / MODEL}: cannot load ({reason}); resume from another run or start anew"
        ) from None
    broken = non_finite(model.policy.state_dict())
    if broken:
        raise ArtifactError(
            f"{folder / MODEL}: weights {broken} hold NaN or inf; resume from another run or start anew"
        )
    for key, value in state["model"].items():
        setattr(model, key, value)
    for key, value in state.get("poison", {}).items():
        setattr(counter, key, value)
    if isinstance(model, OffPolicyAlgorithm):
        rb = model.replay_buffer
        try:
            with np.load(folder / REPLAY, allow_pickle=False) as data:
                for key in _REPLAY_ARRAYS:
                    if data[key].shape != getattr(rb, key).shape:
                        raise ValueError(f"{key} has shape {data[key].shape}, expected {getattr(rb, key).shape}")
                    getattr(rb, key)[...] = data[key]
                rb.pos, rb.full = int(data["pos"]), bool(data["full"])
        except Exception as err:  # a damaged zip raises anything, from BadZipFile to NotImplementedError
            raise ArtifactError(
                f"{folder / REPLAY}: cannot load ({detail(err)}); resume from another run or start anew"
            ) from None


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

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every if self.every else 0

    def _on_rollout_start(self) -> None:
        if self.every and self.num_timesteps >= self._next:
            save_checkpoint(self.model, self.run_dir, self.state())
            self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        return True
