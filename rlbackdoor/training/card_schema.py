"""The checked schema of a run's ``card.json``: JSON descriptions of spaces and SB3 policies (written at the end of
training) and their readers.

Every field a reader takes is checked (JSON types, closed lists of class names, sizes within
:data:`MAX_UNITS`, :data:`MAX_LAYERS` and :data:`MAX_WEIGHTS`) before anything is built: a malformed or hostile
card fails with one :class:`CardError` line naming the file, the field and the fix, and no name in it is ever
imported.
"""

from __future__ import annotations

import inspect
import math
import reprlib
import textwrap
from collections.abc import Callable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor
from stable_baselines3.dqn.policies import CnnPolicy, DQNPolicy, MultiInputPolicy

from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.training.presets import CLASS_KEYS, CLASSES, class_name

CARD = "card.json"
RETRAIN = "retrain the run or restore an undamaged copy"

POLICIES: dict[str, type[BasePolicy]] = {
    "ActorCriticPolicy": ActorCriticPolicy,
    "ActorCriticCnnPolicy": ActorCriticCnnPolicy,
    "MultiInputActorCriticPolicy": MultiInputActorCriticPolicy,
    "DQNPolicy": DQNPolicy,
    "DQNCnnPolicy": CnnPolicy,
    "DQNMultiInputPolicy": MultiInputPolicy,
}
"""Policy classes :func:`rebuild_policy` may build, by the name the card records."""

_SKIPPED_KWARGS = ("observation_space", "action_space", "lr_schedule")

CARD_FIX = f"{RETRAIN}, or fix {CARD}"
MAX_CARD_BYTES = 16 * 2**20
"""The largest ``card.json`` read (16 MiB; a trained run's is a few KiB, its metrics and eval history included): a
hostile card could otherwise make a reader load gigabytes."""
MAX_LAYERS, MAX_UNITS, MAX_WEIGHTS = 64, 65_536, 2**27
"""Caps on what a card may make :func:`rebuild_policy` allocate, checked before anything is built: 64 hidden
layers per network; 65,536 units per layer or features extractor output, and entries per MultiDiscrete; about
134M weights over the policy's networks (512 MiB of float32; the estimate counts every layer of the MLPs, from
the flat observation to the actions, so no space of more elements or actions fits: every size a space description
gives is capped at it before the space is built). Trained runs stay far
below (SB3's default MLP: about 10k weights, NatureCNN on Atari frames: about 2M), and training refuses a policy
beyond them (:func:`describe_policy`); without the caps a few bytes of a hostile card could exhaust memory."""


# ---------------------------------------------------------------------------------------- card checks
_MISSING: Any = object()
_JSON_TYPES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


class CardError(ArtifactError):
    """A field of a card that fails its check (the message adds the fix).

    :param field: the field's path, prefixed with the card file.
    :param problem: what is wrong with it.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}; {CARD_FIX}")
        self.field, self.problem = field, problem


def _fail(field: str, problem: str) -> NoReturn:
    raise CardError(field, problem)


def _join(field: str, key: str | int) -> str:
    """``field.key``, a long or unprintable key as a short repr (messages stay one line)."""
    text = str(key)
    return f"{field}.{text if text.isprintable() and len(text) <= 40 else reprlib.repr(text)}"


def expect(field: str, value: Any, *kinds: type) -> Any:
    """``value`` if it has one of the JSON types ``kinds`` (``true`` is no number), else a :class:`CardError` naming
    ``field``."""
    if value is _MISSING:
        _fail(field, "missing")
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        _fail(field, f"{reprlib.repr(value)} is not {' or '.join(_JSON_TYPES[kind] for kind in kinds)}")
    return value


def _get(field: str, data: Mapping[str, Any], key: str, *kinds: type) -> Any:
    """``data[key]`` checked by :func:`expect`."""
    return expect(_join(field, key), data.get(key, _MISSING), *kinds)


def _int(field: str, value: Any, low: int | None = None, high: int | None = None, what: str = "an integer") -> int:
    """``value`` if it is an integer in ``low..high`` (``high`` open when ``None``; no bounds without ``low``)."""
    if value is _MISSING:
        _fail(field, "missing")
    if type(value) is not int or (low is not None and value < low) or (high is not None and value > high):
        bounds = "" if low is None else f" in {low}..{high}" if high is not None else f" >= {low}"
        _fail(field, f"{reprlib.repr(value)} is not {what}{bounds}")
    return value


def _number(field: str, value: Any) -> float:
    """``value`` as a float if it is a finite number (an integer too large for a float is not)."""
    if type(value) not in (int, float) or not abs(value) < 1e300:  # also false for NaN
        _fail(field, f"{reprlib.repr(value)} is not a finite number")
    return float(value)


def _ints(
    field: str, value: Any, low: int | None, high: int | None, length: range, what: str = "an integer"
) -> list[int]:
    """A list of :func:`_int` whose length is in ``length``."""
    items = expect(field, value, list)
    if len(items) not in length:
        _fail(field, f"{len(items)} entries, expected {length.start} to {length.stop - 1}")
    return [_int(_join(field, i), item, low, high, what) for i, item in enumerate(items)]


def _choice(field: str, name: Any, options: Mapping[str, Any], what: str = "class") -> Any:
    """``options[name]``; a name outside the closed list raises (nothing is ever imported by name)."""
    if not isinstance(name, str) or name not in options:
        _fail(field, f"unknown {what} {reprlib.repr(name)} (known: {', '.join(options)})")
    return options[name]


def card_entry(path: Path, card: Mapping[str, Any], key: str, *kinds: type) -> Any:
    """``card[key]`` checked to be one of the JSON types ``kinds``; missing or otherwise raises :class:`ArtifactError`."""
    return expect(f"{path}: {key}", card.get(key, _MISSING), *kinds)


# ---------------------------------------------------------------------------------------------- spaces
def _finite_or_name(values: np.ndarray) -> list[Any]:
    """Bounds as JSON: integers as they are; floats with non-finite entries as the strings ``inf``, ``-inf``, ``nan``
    (numpy parses them back)."""
    if values.dtype.kind != "f":
        return values.reshape(-1).tolist()
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


_BOUND_NAMES = ("inf", "-inf", "nan")
_OFFSETS = (-(2**31), 2**31 - 1)
"""The range of Discrete and MultiDiscrete ``start`` offsets (int32)."""


def _dtype(field: str, name: str) -> np.dtype:
    """The numpy dtype ``name`` if it is a bool, integer or float type (what a Box takes)."""
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        _fail(field, f"{reprlib.repr(name)} is not a numpy bool, integer or float dtype")
    return dtype


def _bounds(field: str, value: Any, size: int, dtype: np.dtype) -> np.ndarray:
    """A Box bound: a flat list of ``size`` entries, as an array of ``dtype``: integers within its range for integer
    dtypes, else numbers (``inf``, ``-inf``, ``nan`` as strings)."""
    items = expect(field, value, list)
    if len(items) != size:
        _fail(field, f"{len(items)} entries for a shape of {size} elements")
    if dtype.kind == "f":
        for i, item in enumerate(items):
            if not (type(item) in (int, float) or item in _BOUND_NAMES) or (type(item) is int and abs(item) >= 2**64):
                _fail(_join(field, i), f"{reprlib.repr(item)} is not a number, 'inf', '-inf' or 'nan'")
        return np.asarray(items, dtype=np.float64).astype(dtype)
    kind, low, high = (bool, 0, 1) if dtype.kind == "b" else (int, np.iinfo(dtype).min, np.iinfo(dtype).max)
    for i, item in enumerate(items):
        if type(item) is not kind or not low <= item <= high:
            _fail(_join(field, i), f"{reprlib.repr(item)} is not a {dtype} value")
    return np.asarray(items, dtype=dtype)


def _size(field: str, value: Any) -> int:
    """A number of elements or actions: 1..:data:`MAX_WEIGHTS` (no policy over a larger space fits the cap)."""
    return _int(field, value, 1, MAX_WEIGHTS, "a size")


def _shape(field: str, value: Any, axes: range) -> tuple[int, ...]:
    """A shape of ``axes`` axes holding at most :data:`MAX_WEIGHTS` elements."""
    shape = tuple(_ints(field, value, 1, MAX_WEIGHTS, axes, "a size"))
    if math.prod(shape) > MAX_WEIGHTS:
        _fail(field, f"{math.prod(shape):,} elements, more than the cap of {MAX_WEIGHTS:,} (card_schema.MAX_WEIGHTS)")
    return shape


def _box(field: str, data: Mapping[str, Any]) -> spaces.Box:
    """A Box: ``dtype``, ``shape`` (up to 31 axes) and flat ``low`` and ``high`` lists."""
    dtype = _dtype(_join(field, "dtype"), _get(field, data, "dtype", str))
    shape = _shape(_join(field, "shape"), data.get("shape", _MISSING), range(32))
    low, high = (
        _bounds(_join(field, key), data.get(key, _MISSING), math.prod(shape), dtype) for key in ("low", "high")
    )
    try:
        return spaces.Box(low.reshape(shape), high.reshape(shape), shape, dtype)
    except ValueError as err:  # gymnasium's checks of the bounds against each other and the dtype
        _fail(field, str(err).partition(",")[0])


def _discrete(field: str, data: Mapping[str, Any]) -> spaces.Discrete:
    """A Discrete space: ``n`` actions and a ``start`` offset."""
    n = _size(_join(field, "n"), data.get("n", _MISSING))
    return spaces.Discrete(n, start=_int(_join(field, "start"), data.get("start", _MISSING), *_OFFSETS))


def _multi_discrete(field: str, data: Mapping[str, Any]) -> spaces.MultiDiscrete:
    """A MultiDiscrete space: a flat ``nvec`` (SB3 takes no other) and as many ``start`` offsets."""
    nvec = _ints(_join(field, "nvec"), data.get("nvec", _MISSING), 1, MAX_WEIGHTS, range(1, MAX_UNITS + 1), "a size")
    start = _ints(_join(field, "start"), data.get("start", _MISSING), *_OFFSETS, range(len(nvec), len(nvec) + 1))
    return spaces.MultiDiscrete(nvec, start=start)


def _multi_binary(field: str, data: Mapping[str, Any]) -> spaces.MultiBinary:
    """A MultiBinary space: ``n`` a size or a list of sizes."""
    n = data.get("n", _MISSING)
    return spaces.MultiBinary(
        _shape(_join(field, "n"), n, range(1, 32)) if isinstance(n, list) else _size(_join(field, "n"), n)
    )


def _dict(field: str, data: Mapping[str, Any]) -> spaces.Dict:
    """A Dict space: a non-empty mapping of names to non-Dict spaces."""
    field = _join(field, "spaces")
    entries = expect(field, data.get("spaces", _MISSING), dict)
    if not entries:
        _fail(field, "no entries")
    out = {}
    for key, entry in entries.items():
        if isinstance(entry, dict) and entry.get("type") == "Dict":
            _fail(_join(field, key), "a nested Dict space, which SB3 policies do not take")
        out[key] = space_from_json(entry, _join(field, key))
    return spaces.Dict(out)


_SPACE_READERS: dict[str, Callable[[str, Mapping[str, Any]], spaces.Space]] = {
    "Box": _box,
    "Discrete": _discrete,
    "MultiDiscrete": _multi_discrete,
    "MultiBinary": _multi_binary,
    "Dict": _dict,
}


def space_from_json(data: Any, field: str = "space") -> spaces.Space:
    """The space :func:`space_to_json` described; anything else raises :class:`ArtifactError` naming ``field``."""
    data = expect(field, data, dict)
    read = _choice(_join(field, "type"), _get(field, data, "type", str), _SPACE_READERS, "space type")
    return read(field, data)


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
    description = {
        "class": _policy_name(policy),
        "observation_space": space_to_json(policy.observation_space),
        "action_space": space_to_json(policy.action_space),
        "kwargs": kwargs,
    }
    try:
        _read_policy("policy", description)  # what trains must load back for analysis
    except CardError as err:
        raise SpecError(
            f"hyperparams: rlbd could not rebuild this policy for analysis ({err.field}: {err.problem}); "
            "change policy_kwargs"
        ) from None
    return description


_FLAGS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("normalize_images", "ortho_init", "use_sde", "share_features_extractor"), (bool,)),
    **dict.fromkeys(("full_std", "use_expln", "squash_output"), (bool, type(None))),  # the card records null there
}
_EXTRACTOR_SIZES = ("features_dim", "cnn_output_dim")
_CLASS_KINDS: dict[str, dict[str, type]] = {
    "activation_fn": {
        k: c for k, c in CLASSES.items() if issubclass(c, torch.nn.Module) and not issubclass(c, BaseFeaturesExtractor)
    },
    "optimizer_class": {k: c for k, c in CLASSES.items() if issubclass(c, torch.optim.Optimizer)},
    "features_extractor_class": {k: c for k, c in CLASSES.items() if issubclass(c, BaseFeaturesExtractor)},
}
"""The classes each class-valued policy kwarg may name."""


def _policy_kwargs(field: str, cls: type[BasePolicy], value: Any) -> dict[str, Any]:
    """``cls``'s constructor kwargs as the card records them, classes resolved (the extractor's default included)."""
    kwargs = dict(expect(field, value, dict, type(None)) or {})
    params = inspect.signature(cls).parameters
    for key, item in list(kwargs.items()):
        where = _join(field, key)
        if key not in params or key in _SKIPPED_KWARGS:
            _fail(where, f"not a parameter of {cls.__name__}")
        if key in _FLAGS:
            expect(where, item, *_FLAGS[key])
        elif key == "log_std_init":
            kwargs[key] = _number(where, item)
        elif key == "optimizer_kwargs":
            expect(where, item, dict, type(None))
        elif key in _CLASS_KINDS:
            kwargs[key] = _choice(where, item, _CLASS_KINDS[key])
    extractor = kwargs.setdefault("features_extractor_class", params["features_extractor_class"].default)
    where = _join(field, "features_extractor_kwargs")
    kwargs["features_extractor_kwargs"] = _extractor_kwargs(where, extractor, kwargs.get("features_extractor_kwargs"))
    return kwargs


def _extractor_kwargs(field: str, extractor: type, value: Any) -> dict[str, Any]:
    """``features_extractor_kwargs``: parameters of ``extractor``, its output sizes capped at :data:`MAX_UNITS`."""
    kwargs = expect(field, value, dict, type(None)) or {}
    params = inspect.signature(extractor).parameters
    for key, item in kwargs.items():
        where = _join(field, key)
        if key not in params or key == "observation_space":
            _fail(where, f"not a parameter of {extractor.__name__}")
        if key in _EXTRACTOR_SIZES:
            _int(where, item, 1, MAX_UNITS)
        else:
            expect(where, item, bool)
    return kwargs


def _layers(field: str, value: Any) -> list[int]:
    """The layer sizes of one network: at most :data:`MAX_LAYERS`, each in 1..:data:`MAX_UNITS`."""
    return _ints(field, value, 1, MAX_UNITS, range(MAX_LAYERS + 1), "a layer size")


def _networks(field: str, value: Any, cls: type[BasePolicy]) -> list[list[int]]:
    """The hidden layer sizes of the two MLPs ``net_arch`` builds (actor and critic, or Q and target Q)."""
    if value is None:
        return [[64, 64]] * 2  # SB3's default
    if isinstance(value, dict) and not issubclass(cls, DQNPolicy):
        for key in value:
            if key not in ("pi", "vf"):
                _fail(_join(field, key), "not a network of net_arch (pi, vf)")
        return [_layers(_join(field, key), value.get(key, [])) for key in ("pi", "vf")]
    return [_layers(field, value)] * 2


def _check_size(
    field: str, cls: type[BasePolicy], observation: spaces.Space, action: spaces.Space, kwargs: dict[str, Any]
) -> None:
    """Refuse a policy whose MLPs hold more than :data:`MAX_WEIGHTS` weights, counted from the flat observation
    through the extractor's features and the hidden layers to the actions (an over-estimate for CNN extractors)."""
    networks = _networks(_join(field, "kwargs.net_arch"), kwargs.get("net_arch"), cls)
    params = inspect.signature(kwargs["features_extractor_class"]).parameters
    features = [kwargs["features_extractor_kwargs"].get(k, params[k].default) for k in _EXTRACTOR_SIZES if k in params]
    chains = [[spaces.flatdim(observation), *features, *layers, spaces.flatdim(action)] for layers in networks]
    weights = sum(a * b for chain in chains for a, b in pairwise(chain))
    if weights > MAX_WEIGHTS:
        _fail(field, f"about {weights:,} weights, more than the cap of {MAX_WEIGHTS:,} (card_schema.MAX_WEIGHTS)")


def _read_policy(field: str, data: Any) -> tuple[type[BasePolicy], spaces.Space, spaces.Space, dict[str, Any]]:
    """The class, spaces and constructor kwargs a card's ``policy`` entry describes, checked before anything is built."""
    data = expect(field, data, dict)
    cls = _choice(_join(field, "class"), _get(field, data, "class", str), POLICIES)
    observation = space_from_json(data.get("observation_space", _MISSING), _join(field, "observation_space"))
    action = space_from_json(data.get("action_space", _MISSING), _join(field, "action_space"))
    if isinstance(action, spaces.Dict) or (issubclass(cls, DQNPolicy) and not isinstance(action, spaces.Discrete)):
        _fail(_join(field, "action_space"), f"{cls.__name__} cannot act in a {type(action).__name__} space")
    kwargs = _policy_kwargs(_join(field, "kwargs"), cls, data.get("kwargs"))
    extractor = kwargs["features_extractor_class"]
    if issubclass(extractor, CombinedExtractor) != isinstance(observation, spaces.Dict):
        where = _join(field, "kwargs.features_extractor_class")
        _fail(where, f"{extractor.__name__} does not take a {type(observation).__name__} observation space")
    _check_size(field, cls, observation, action, kwargs)
    return cls, observation, action, kwargs


def rebuild_policy(description: Any, source: str | Path = CARD) -> BasePolicy:
    """A fresh policy (random weights) from :func:`describe_policy`'s output.

    :param description: a card's ``policy`` entry; anything malformed raises :class:`ArtifactError` naming the field.
    :param source: the card it comes from, named in errors.
    """
    cls, observation_space, action_space, kwargs = _read_policy(f"{source}: policy", description)
    try:
        return cls(observation_space, action_space, lambda _: 0.0, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        # _read_policy checked the structure, types and sizes; SB3, torch and the optimizer check what is left
        # (optimizer_kwargs values, a NatureCNN on a non-image space or on images smaller than its kernels)
        # and report it with these
        problem = textwrap.shorten(str(err), 200, placeholder=" ...")
        raise ArtifactError(
            f"{source}: policy: SB3 cannot build the {cls.__name__} it describes ({problem}); {CARD_FIX}"
        ) from None
