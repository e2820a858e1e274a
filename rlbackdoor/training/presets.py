"""SB3 hyperparameter presets (``agents/<algo>.yaml``, rl-zoo3 style) and building the SB3 model from them.

A preset file maps env ids to hyperparameters, with a ``default`` entry under every env. The env key
is the run's registered ``rlbd/`` id when the file has it, else the base Gymnasium id. Values stay
JSON in the card; :func:`to_sb3` turns the two non-JSON forms into objects: ``lin_<x>`` strings into
linear schedules from ``x`` to 0, and class names in ``policy_kwargs`` (see :data:`CLASSES`).
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any

import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
from stable_baselines3.common.torch_layers import CombinedExtractor, FlattenExtractor, NatureCNN
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv

from rlbackdoor.errors import SpecError, detail
from rlbackdoor.registry import data_dir
from rlbackdoor.specs import read_yaml

ALGOS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "dqn": DQN}

CLASSES: dict[str, type] = {
    "relu": torch.nn.ReLU,
    "tanh": torch.nn.Tanh,
    "elu": torch.nn.ELU,
    "leaky_relu": torch.nn.LeakyReLU,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    "sigmoid": torch.nn.Sigmoid,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
    "rmsprop_tf_like": RMSpropTFLike,
    "flatten": FlattenExtractor,
    "nature_cnn": NatureCNN,
    "combined": CombinedExtractor,
}
"""The classes ``policy_kwargs`` may name (and the card records): a closed list, so loading never imports by name."""

CLASS_KEYS = ("activation_fn", "optimizer_class", "features_extractor_class")


def preset(algo: str, env_ids: list[str]) -> dict[str, Any]:
    """The preset of ``algo`` for the first of ``env_ids`` the preset file lists, over its ``default`` entry.

    :param algo: ``ppo``, ``a2c`` or ``dqn``.
    :param env_ids: candidate keys, most specific first (registered id, then base id).
    """
    path = data_dir("agents") / f"{algo}.yaml"
    table = read_yaml(path)
    entry = next((table[env_id] for env_id in env_ids if env_id in table), None)
    return merge(table.get("default") or {}, entry or {})


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top, mappings merged key by key; a ``null`` override removes the key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve(algo: str, env_ids: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's hyperparameters (JSON values): the preset with the experiment's ``hyperparams`` merged on top.

    Mappings (``policy_kwargs``) merge key by key; a ``null`` override removes a preset key (SB3's default applies).
    """
    return merge(preset(algo, env_ids), overrides)


def class_name(cls: type) -> str:
    """The short name :data:`CLASSES` gives ``cls``; classes outside the list raise :class:`SpecError`."""
    for name, known in CLASSES.items():
        if known is cls:
            return name
    raise SpecError(
        f"policy class {cls.__module__}.{cls.__qualname__} is not in the allow-list; use one of {', '.join(CLASSES)}"
    )


def _to_class(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if value not in CLASSES:
            raise SpecError(f"hyperparams: policy_kwargs.{key} '{value}' is unknown; use one of {', '.join(CLASSES)}")
        return CLASSES[value]
    return value


def _schedule(key: str, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("lin_"):
        try:
            start = float(value.removeprefix("lin_"))
        except ValueError:
            raise SpecError(f"hyperparams: {key} '{value}' is not lin_<number>; write e.g. lin_0.001") from None
        _check_range(key, start)
        return LinearSchedule(start, 0.0, 1.0)
    return value


def to_sb3(hyperparams: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The SB3 policy name and constructor kwargs a hyperparameter mapping describes."""
    kwargs = {key: _schedule(key, value) for key, value in hyperparams.items() if key != "policy"}
    policy_kwargs = kwargs.get("policy_kwargs")
    if policy_kwargs is not None:
        if not isinstance(policy_kwargs, dict):
            raise SpecError("hyperparams: policy_kwargs must be a mapping; write policy_kwargs: {net_arch: [64, 64]}")
        kwargs["policy_kwargs"] = {k: _to_class(k, v) if k in CLASS_KEYS else v for k, v in policy_kwargs.items()}
    return str(hyperparams.get("policy", "MlpPolicy")), kwargs


def build_model(algo: str, env: VecEnv, hyperparams: dict[str, Any], seed: int) -> BaseAlgorithm:
    """The SB3 model for ``env``; hyperparameters SB3 rejects raise :class:`SpecError`.

    :param algo: ``ppo``, ``a2c`` or ``dqn``.
    :param env: the training env.
    :param hyperparams: resolved hyperparameters (see :func:`resolve`).
    :param seed: seeds torch, numpy, the action space and the envs.
    """
    policy, kwargs = to_sb3(hyperparams)
    _check_types(algo, kwargs)
    _check_buffer(algo, kwargs, env.num_envs)
    try:
        return ALGOS[algo](policy, env, seed=seed, device="cpu", verbose=0, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as err:  # torch: e.g. a negative layer size
        raise SpecError(
            f"hyperparams: SB3 {algo.upper()} rejects the run ({detail(err)}); fix that hyperparameter or pick another "
            "algo"
        ) from None
    except MemoryError:  # a buffer under MAX_BUFFER of large observations
        raise SpecError(
            f"hyperparams: SB3 {algo.upper()} cannot allocate its buffer in memory; lower "
            f"{'n_steps or n_envs' if issubclass(ALGOS[algo], OnPolicyAlgorithm) else 'buffer_size'}"
        ) from None


def check_hyperparameter(algos: list[str], key: str, value: Any) -> None:
    """One hyperparameter on its own, as :func:`build_model` checks it: one of ``algos`` takes ``key``, and a value of
    the kind and range it takes (a sweep's parameter, before any run; combinations are the runs' own to check).

    :raises SpecError: no algo of ``algos`` takes ``key`` (e.g. a misspelt name), or none takes ``value``.
    """
    takers = [algo for algo in algos if key == "policy" or key in inspect.signature(ALGOS[algo].__init__).parameters]
    if not takers:
        names = " or ".join(algo.upper() for algo in algos)
        raise SpecError(f"hyperparams.{key}: no such hyperparameter of SB3 {names}; fix its spelling")
    _, kwargs = to_sb3({key: value})
    refusals = []
    for algo in takers:
        try:
            _check_types(algo, kwargs)
        except SpecError as err:
            refusals.append(err)
        else:
            return
    raise refusals[0]


def _check_buffer(algo: str, kwargs: dict[str, Any], n_envs: int) -> None:
    """Refuse a buffer of more than :data:`MAX_BUFFER` transitions before SB3 allocates it: PPO's and A2C's rollout
    buffer (``n_steps`` x ``n_envs``); DQN's replay buffer (``buffer_size``), its batches (``batch_size``) and its
    n-step returns (``n_steps``)."""
    cls = ALGOS[algo]
    parameters = inspect.signature(cls.__init__).parameters
    if issubclass(cls, OnPolicyAlgorithm):
        size = kwargs.get("n_steps", parameters["n_steps"].default) * n_envs
        checks = [("n_steps", size, f"n_steps x n_envs = {size}", "lower n_steps or n_envs")]
    else:
        sizes = {key: kwargs.get(key, parameters[key].default) for key in ("buffer_size", "batch_size", "n_steps")}
        checks = [(key, size, str(size), f"lower {key}") for key, size in sizes.items()]
    for key, size, what, fix in checks:
        if size > MAX_BUFFER:
            raise SpecError(
                f"hyperparams.{key}: {what} transitions is more than the {MAX_BUFFER} a buffer may hold in memory; {fix}"
            )


def _check_types(algo: str, kwargs: dict[str, Any]) -> None:
    """None of the :data:`OWNED` arguments; whole numbers, numbers and flags where SB3 annotates ``int``, ``float``
    and ``bool``, or one of them ``| None`` (then ``null`` too); SB3 itself would fail only mid-training."""
    kinds = {int: (int,), float: (int, float), bool: (bool,)}
    names = {int: "a whole number", float: "a number", bool: "true or false"}
    parameters = inspect.signature(ALGOS[algo].__init__).parameters
    for key, value in kwargs.items():
        if key in OWNED:
            raise SpecError(f"hyperparams.{key}: {OWNED[key]}; remove it from hyperparams")
        annotation = parameters[key].annotation if key in parameters else None
        optional = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(optional) == 1 and len(typing.get_args(annotation)) == 2:  # ``X | None``
            if value is None:
                continue
            annotation = optional[0]
        if annotation in kinds and (
            not isinstance(value, kinds[annotation]) or (annotation is not bool and isinstance(value, bool))
        ):
            raise SpecError(f"hyperparams.{key}: {value!r} is not {names[annotation]}; give {names[annotation]}")
        if key in COUNTS and isinstance(value, int) and value < 1:
            raise SpecError(f"hyperparams.{key}: {value} is not a count; give a whole number >= 1")
        if isinstance(value, int | float) and not isinstance(value, bool):
            _check_range(key, value)


def _check_range(key: str, value: float) -> None:
    """Refuse a non-finite number, or one outside the :data:`RANGES` of ``key`` (SB3 takes it and diverges)."""
    low, high, closed, example = RANGES.get(key, (-math.inf, math.inf, True, "a finite number"))
    if math.isfinite(value) and (low <= value if closed else low < value) and value <= high:
        return
    bounds = f"in {'[' if closed else '('}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
    raise SpecError(f"hyperparams.{key}: {value!r} is not {bounds if key in RANGES else 'finite'}; give {example}")


OWNED = {
    "env": "rlbd builds the env from the experiment's env and attack",
    "seed": "the run's seed is the experiment's seed field (or --set seed=N)",
    "device": "rlbd trains on the CPU",
    "verbose": "rlbd prints its own progress",
    "tensorboard_log": "rlbd logs to W&B (offline runs upload with wandb sync), not to TensorBoard",
    "_init_setup_model": "rlbd builds the model itself",
}
"""SB3 constructor arguments the run sets itself, with why: refused as hyperparameters."""

MAX_BUFFER = 10**7
"""The most transitions a rollout buffer (``n_steps`` x ``n_envs``), a replay buffer (``buffer_size``), a batch drawn
from it or an n-step return may hold: an order of magnitude above the largest rl-zoo3 presets."""

RANGES: dict[str, tuple[float, float, bool, str]] = {
    "learning_rate": (0.0, 1.0, False, "e.g. 3e-4"),
    "gamma": (0.0, 1.0, True, "e.g. 0.99"),
    "gae_lambda": (0.0, 1.0, True, "e.g. 0.95"),
    "tau": (0.0, 1.0, False, "e.g. 1.0"),
    "exploration_fraction": (0.0, 1.0, True, "e.g. 0.1"),
    "exploration_initial_eps": (0.0, 1.0, True, "e.g. 1.0"),
    "exploration_final_eps": (0.0, 1.0, True, "e.g. 0.05"),
    "clip_range": (0.0, math.inf, False, "e.g. 0.2"),
    "max_grad_norm": (0.0, math.inf, False, "e.g. 0.5"),
    "ent_coef": (0.0, math.inf, True, "e.g. 0.0"),
    "vf_coef": (0.0, math.inf, True, "e.g. 0.5"),
    "target_kl": (0.0, math.inf, False, "e.g. 0.02, or null"),
    "clip_range_vf": (0.0, math.inf, False, "e.g. 0.2, or null"),
}
"""Each hyperparameter's (low, high, whether low is allowed, an example): what SB3 accepts and then diverges or fails
on mid-training outside it (a learning rate of 1e300 overflows Adam's float32 step). Any other number must be finite."""

COUNTS = ("n_steps", "n_epochs", "batch_size", "buffer_size", "target_update_interval")
"""Hyperparameters that count steps, epochs or samples: SB3 takes any integer and fails mid-training below 1."""
