"""Trajectory datasets: flat arrays of transitions with the attack's ground-truth flags, saved as ``.npz``.

One file holds ``observations``, ``actions``, ``rewards``, ``dones`` (episode ends), ``poisoned`` and
``triggered`` (from ``info["rlbd"]``; all false where unknown) and, as metadata, the ``env`` id and
the observation shape. Files are written atomically and read without unpickling.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlbackdoor.errors import ArtifactError, detail
from rlbackdoor.evaluation.rollouts import check_policy_fits
from rlbackdoor.jsonfile import loads
from rlbackdoor.training.artifacts import atomic_write

FIELDS = ("observations", "actions", "rewards", "dones", "poisoned", "triggered")
SCALARS = ("rewards", "dones", "poisoned", "triggered")
"""The fields holding one number per transition (1-D arrays); observations and actions hold one array each."""


@dataclass
class Trajectories:
    """Transitions ``(o_t, a_t, r_t, done_t)`` of one env, with ``triggered_t`` (o_t carries the trigger)
    and ``poisoned_t`` (r_t / a_t are the attacker's)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    poisoned: np.ndarray
    triggered: np.ndarray
    env: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rewards)

    def select(self, keep: np.ndarray) -> Trajectories:
        """The transitions where ``keep`` is true (episode ends are kept where a dropped step ended one)."""
        dones = self.dones.copy()
        ends = np.flatnonzero(dones & ~keep)
        for i in ends:
            kept_before = np.flatnonzero(keep[:i])
            if kept_before.size:
                dones[kept_before[-1]] = True
        return Trajectories(
            *(np.asarray(getattr(self, f) if f != "dones" else dones)[keep] for f in FIELDS), self.env, self.meta
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (``.npz``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f: np.asarray(getattr(self, f)) for f in FIELDS}
        meta = json.dumps({"env": self.env, **self.meta})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, meta=np.array(meta), **arrays)
        atomic_write(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        """Read a file written by :meth:`save` (no pickles are loaded)."""
        if not Path(path).exists():
            raise ArtifactError(f"{path}: no such file; check the path")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("one .npy array, not an .npz archive")
            with data:
                arrays = {f: data[f] for f in FIELDS}
                meta = loads(str(data["meta"]))
        except Exception as err:  # a damaged zip raises anything, from zlib.error to NotImplementedError
            # numpy reads what is not an .npz as a pickle, and suggests unpickling it: never
            reason = "not an .npz archive of arrays" if "allow_pickle" in str(err) else detail(err)
            raise ArtifactError(f"{path}: not a trajectory file ({reason}); write it with Trajectories.save") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("env", ""), str)):
            raise ArtifactError(f"{path}: meta is not a JSON object with a string env; write it with Trajectories.save")
        _check_arrays(path, arrays)
        for f in ("dones", "poisoned", "triggered"):
            arrays[f] = arrays[f].astype(bool)
        return cls(**arrays, env=meta.pop("env", ""), meta=meta)


def _check_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """At least one transition, one entry per transition in every field (one number in :data:`SCALARS`), numbers
    where numbers belong, no NaN or inf."""
    n = len(arrays["rewards"]) if arrays["rewards"].ndim else -1
    short = [f for f in FIELDS if arrays[f].ndim == 0 or len(arrays[f]) != n]
    if short:
        sizes = ", ".join(f"{f} {arrays[f].shape}" for f in FIELDS)
        raise ArtifactError(f"{path}: fields differ in length ({sizes}); give every field one entry per transition")
    if n == 0:
        raise ArtifactError(f"{path}: holds no transitions; collect some steps before saving")
    for f in SCALARS:
        if arrays[f].ndim != 1:
            raise ArtifactError(
                f"{path}: {f} has shape {arrays[f].shape}; store one number per transition (a 1-D array)"
            )
    for f in FIELDS:
        if arrays[f].dtype.kind not in "biuf":
            raise ArtifactError(f"{path}: {f} has dtype {arrays[f].dtype}; store numbers (booleans for flags)")
    for f in ("observations", "actions", "rewards"):
        if arrays[f].dtype.kind == "f" and not np.isfinite(arrays[f]).all():
            i = int(np.flatnonzero(~np.isfinite(arrays[f]).reshape(n, -1).all(axis=1))[0])
            raise ArtifactError(f"{path}: {f} of transition {i} hold NaN or inf; drop or repair those transitions")


def collect(env: gym.Env, policy: Any, steps: int, seed: int, env_id: str = "") -> Trajectories:
    """Roll ``policy`` (SB3-style ``predict``, sampling its actions; ``None`` for uniform random actions) in ``env``
    for ``steps`` steps. ``seed`` seeds the env, the action space and, for the call, torch (SB3 samples with it)."""
    if policy is not None:
        check_policy_fits(policy, env)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _collect(env, policy, steps, seed, env_id)


def _collect(env: gym.Env, policy: Any, steps: int, seed: int, env_id: str) -> Trajectories:
    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    triggered_now = bool(info.get("rlbd", {}).get("triggered", False))
    rows: dict[str, list[Any]] = {f: [] for f in FIELDS}
    for _ in range(steps):
        if policy is None:
            action = env.action_space.sample()
        else:
            action, _ = policy.predict(obs, deterministic=False)
        next_obs, reward, terminated, truncated, info = env.step(action)
        flags = info.get("rlbd", {})
        for f, v in zip(
            FIELDS,
            (obs, action, reward, terminated or truncated, flags.get("poisoned", False), triggered_now),
            strict=True,
        ):
            rows[f].append(v)
        triggered_now = bool(flags.get("triggered", False))
        obs = next_obs
        if terminated or truncated:
            obs, info = env.reset()
            triggered_now = bool(info.get("rlbd", {}).get("triggered", False))
    arrays = {f: np.asarray(v) for f, v in rows.items()}
    arrays["rewards"] = arrays["rewards"].astype(np.float64)
    for f in ("dones", "poisoned", "triggered"):
        arrays[f] = arrays[f].astype(bool)
    return Trajectories(**arrays, env=env_id)
