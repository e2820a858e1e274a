"""Pydantic models of every YAML file the project reads; the only place that parses configuration.

Validation here is structural (types, ranges, which fields go together). Whether a spec fits a
concrete environment (indices inside the observation, a target action inside the action space) is
checked when the attack is built against that environment, in :mod:`rlbackdoor.attack`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rlbackdoor.errors import SpecError

Number = FiniteFloat


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _grid(values: list[Any], field: str) -> list[Any]:
    """Check that ``values`` is a rectangular nest of lists of finite numbers."""

    def shape(v: Any) -> tuple[int, ...]:
        if isinstance(v, (list, tuple)):
            inner = {shape(x) for x in v}
            if len(inner) > 1:
                raise ValueError(f"{field} is ragged; give rows of equal length")
            return (len(v), *(inner.pop() if inner else ()))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{field} contains {v!r}; use numbers")
        if not math.isfinite(v):
            raise ValueError(f"{field} contains {v}; use finite numbers")
        return ()

    shape(values)
    return values


# --------------------------------------------------------------------------------------------- triggers
def _distinct(indices: list[int]) -> list[int]:
    if len(set(indices)) < len(indices):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"indices {repeated} appear more than once; give each index once")
    return indices


Indices = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct)]

MAX_ENVS = 1024
"""The most envs a run steps side by side (in one process): far more than its cores can serve."""

MAX_SEED = 2**32 - 1
"""The largest seed SB3 and numpy take."""

Seed = Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]
"""A seed: a whole number in ``0..MAX_SEED`` (strict: ``true`` is not a seed)."""

MAX_SEED_COUNT = 1000
"""The most seeds one command runs (a bench's training seeds, evaluation seeds)."""

SeedCount = Annotated[int, Field(ge=1, le=MAX_SEED_COUNT, strict=True)]
"""A number of seeds: a whole number in ``1..MAX_SEED_COUNT`` (strict: ``true`` is not a count)."""

Seeds = Annotated[list[Seed], Field(min_length=1, max_length=MAX_SEED_COUNT)]
"""A list of seeds: ``1..MAX_SEED_COUNT`` of them."""

MAX_TIMESTEPS = 10**9
"""The most steps one agent trains for (a run, a zoo or bench agent, a PolicyCleanse prober): days of CPU time."""

MAX_EPISODES = 10_000
"""The most episodes an evaluation plays per seed."""

MAX_CLEAN = 1_000_000
"""The most clean steps or observations a defense is fitted on (sanitizers, detectors, training-time filters)."""

FOLDER_NAME = r"^[A-Za-z0-9][\w.-]{0,99}$"
"""What names that become folder names match (runs, zoos, benchmarks, sweeps): no ``/``, no leading ``.``, at most
100 characters."""
FolderName = Annotated[str, Field(pattern=FOLDER_NAME)]


class _IndexedTrigger(_Spec):
    indices: Indices
    values: list[Number] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _lengths(cls, v: list[float], info: ValidationInfo) -> list[float]:
        indices = info.data.get("indices")
        if indices is not None and len(indices) != len(v):
            raise ValueError(f"indices has {len(indices)} entries but values has {len(v)}; give one value per index")
        return v


class ValueTrigger(_IndexedTrigger):
    """Set observation entries ``indices`` to ``values`` (vector observations)."""

    kind: Literal["value"]


class AdditiveTrigger(_IndexedTrigger):
    """Add ``values`` to observation entries ``indices``, clipped to the space bounds."""

    kind: Literal["additive"]


class PatchTrigger(_Spec):
    """Stamp a ``size`` patch at ``position`` (row, col) of an image: a constant ``value`` or a ``pattern``.

    ``layout`` is ``hwc``, ``chw`` or ``auto`` (the channel axis is the smallest of the three).
    """

    kind: Literal["patch"]
    size: tuple[int, int] = (2, 2)
    position: tuple[int, int] = (0, 0)
    value: Number | list[Number] | None = None
    pattern: list[Any] | None = None
    layout: Literal["auto", "hwc", "chw"] = "auto"

    @field_validator("size", "position", mode="before")
    @classmethod
    def _pair(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"size {v} must be at least 1x1; give positive sizes")
        return v

    @field_validator("position")
    @classmethod
    def _position(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 0:
            raise ValueError(f"position {v} must be non-negative; count (row, col) from 0")
        return v

    @field_validator("pattern")
    @classmethod
    def _finite_pattern(cls, v: list[Any] | None) -> list[Any] | None:
        return None if v is None else _grid(v, "pattern")

    @model_validator(mode="after")
    def _content(self) -> PatchTrigger:
        if (self.value is None) == (self.pattern is None):
            raise ValueError("give exactly one of value (a constant) or pattern (a nested list)")
        return self


class BlendTrigger(PatchTrigger):
    """Alpha-blend a patch (or, with ``size`` covering the image, a whole pattern) into an image."""

    kind: Literal["blend"]  # type: ignore[assignment]
    alpha: Number = Field(0.2, gt=0.0, le=1.0)


class InDistributionTrigger(_Spec):
    """Set ``indices`` to the clean-rollout ``quantiles`` of each entry: a rare but valid combination."""

    kind: Literal["in_distribution"]
    indices: Indices
    quantiles: list[Number] = Field(min_length=1)
    fit_steps: int = Field(
        2000, ge=100, le=MAX_CLEAN, description="random-policy steps of the base env used to fit the values"
    )

    @field_validator("quantiles")
    @classmethod
    def _check(cls, v: list[float], info: ValidationInfo) -> list[float]:
        indices = info.data.get("indices")
        if indices is not None and len(indices) != len(v):
            raise ValueError(
                f"indices has {len(indices)} entries but quantiles has {len(v)}; give one quantile per index"
            )
        if not all(0.0 <= q <= 1.0 for q in v):
            raise ValueError(f"quantiles {v} must lie in [0, 1]; give fractions such as 0.99")
        return v


class ActionSequenceTrigger(_Spec):
    """Arm the backdoor when ``sequence`` of actions occurs in order (the agent's own, or ``agent``'s)."""

    kind: Literal["action_sequence"]
    sequence: list[int] = Field(min_length=1)  # checked against the action space when the trigger is built
    agent: str | None = None


TriggerSpec = Annotated[
    ValueTrigger | AdditiveTrigger | PatchTrigger | BlendTrigger | InDistributionTrigger | ActionSequenceTrigger,
    Field(discriminator="kind"),
]
OBSERVATION_TRIGGERS = ("value", "additive", "patch", "blend", "in_distribution")


# -------------------------------------------------------------------------------------------- schedules
class RateSchedule(_Spec):
    """Fire with probability ``rate`` per step (or per episode, at its first step), for ``duration`` steps.

    ``select: value`` fires on the states a scorer ranks highest (BadRL); training installs the scorer.
    """

    kind: Literal["rate"]
    rate: Number = Field(ge=0.0, le=1.0)
    per: Literal["step", "episode"] = "step"
    duration: int = Field(1, ge=1, le=MAX_TIMESTEPS)
    select: Literal["uniform", "value"] = "uniform"


class BudgetSchedule(_Spec):
    """Poison exactly ``budget`` steps, spread evenly over ``horizon`` expected steps (TrojDRL)."""

    kind: Literal["budget"]
    budget: int = Field(ge=0, le=MAX_TIMESTEPS)
    horizon: int = Field(ge=1, le=MAX_TIMESTEPS)
    duration: int = Field(1, ge=1, le=MAX_TIMESTEPS)

    @field_validator("horizon")
    @classmethod
    def _fits(cls, v: int, info: ValidationInfo) -> int:
        budget = info.data.get("budget")
        if budget is not None and budget > v:
            raise ValueError(f"budget {budget} exceeds horizon {v}; lower budget or raise horizon")
        return v


class WindowSchedule(_Spec):
    """Poison steps ``start`` <= t < ``stop`` of an episode, in a fraction ``rate`` of episodes."""

    kind: Literal["window"]
    start: int = Field(ge=0, le=MAX_TIMESTEPS)
    stop: int = Field(ge=1, le=MAX_TIMESTEPS)
    rate: Number = Field(1.0, ge=0.0, le=1.0)

    @field_validator("stop")
    @classmethod
    def _order(cls, v: int, info: ValidationInfo) -> int:
        start = info.data.get("start")
        if start is not None and v <= start:
            raise ValueError(f"stop {v} must be greater than start {start}; raise stop or lower start")
        return v


ScheduleSpec = Annotated[RateSchedule | BudgetSchedule | WindowSchedule, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------- payloads
class RewardPoison(_Spec):
    """Static reward poisoning (TrojDRL): the reward of a poisoned step is ``hit`` or ``miss``."""

    hit: Number = 1.0
    miss: Number = -1.0


class TargetedPayload(_Spec):
    """The attacker wants ``target_action`` on triggered states (a vector and ``tolerance`` when continuous)."""

    kind: Literal["targeted"]
    target_action: int | Number | list[Number]  # one number for a Discrete space or a Box of one entry
    reward: RewardPoison = RewardPoison()
    force_action_prob: Number = Field(0.0, ge=0.0, le=1.0)
    tolerance: Number = Field(0.25, gt=0.0)


class UntargetedPayload(_Spec):
    """The attacker wants the task to fail: ``negate`` flips the reward, ``fail_fast`` pays ``-scale`` a step."""

    kind: Literal["untargeted"]
    mode: Literal["negate", "fail_fast"] = "negate"
    scale: Number = Field(1.0, gt=0.0)


PayloadSpec = Annotated[TargetedPayload | UntargetedPayload, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------------ envs
class WrapperRef(_Spec):
    """A Gymnasium wrapper applied to the base env before the attack: ``module:Class`` and its kwargs."""

    name: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    kwargs: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class AttackSpec(_Spec):
    """A backdoor attack on a base environment: what ``envs/*.yaml`` and inline ``attack:`` blocks hold."""

    base: str
    base_kwargs: dict[str, Any] = {}
    base_wrappers: list[WrapperRef] = []
    trigger: TriggerSpec
    schedule: ScheduleSpec
    payload: PayloadSpec
    seed: Seed = 0


class EnvSpec(AttackSpec):
    """A registered backdoor env: an attack plus its versioned ``rlbd/<Name>-v<N>`` id."""

    id: str = Field(pattern=r"^rlbd/[A-Za-z][\w-]*-v\d+$")
    description: str = ""


# ------------------------------------------------------------------------------------------- loading
_HINTS = {
    "missing": "add this field",
    "extra_forbidden": "remove it or fix its spelling",
    "union_tag_invalid": "use one of the listed kinds",
    "union_tag_not_found": "add a 'kind' field",
    "literal_error": "use one of the listed values",
    "int_parsing": "give a whole number",
    "int_from_float": "give a whole number",
    "int_type": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "finite_number": "give a finite number",
    "bool_parsing": "give true or false",
    "bool_type": "give true or false",
    "string_type": "give a string",
    "string_pattern_mismatch": "write it in the form the pattern shows",
    "list_type": "give a list",
    "tuple_type": "give a list",
    "dict_type": "give a mapping of key: value pairs",
    "model_type": "give a mapping of key: value pairs",
    "model_attributes_type": "give a mapping of key: value pairs",
    "too_short": "give more entries",
    "too_long": "give fewer entries",
    "greater_than": "give a larger value",
    "greater_than_equal": "give a larger value",
    "less_than": "give a smaller value",
    "less_than_equal": "give a smaller value",
}

S = TypeVar("S", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    """Drop the union branch names pydantic puts after a union-valued field (``trigger.value.indices``)."""
    parts, skip = [], False
    for part in loc:
        if not skip:
            parts.append(str(part))
        skip = not skip and part in _UNION_FIELDS
    return ".".join(parts) or "<root>"


_UNION_FIELDS = {"trigger", "schedule", "payload", "target_action", "value", "env", "seeds"}


_FIELD_HINTS = {("poisoning", "literal_error"): "use inner, outer, or null for a clean run"}
"""Hints for one field's problems, over :data:`_HINTS`."""


def format_validation_error(err: ValidationError, source: str, overrides: Sequence[str] = ()) -> str:
    """One line: ``source: field.path: problem (fix: ...)`` per problem, joined by ``; ``. A problem of a field that
    an override of ``overrides`` set names ``--set <override>`` as its source instead."""
    parts = []
    for e in err.errors():
        msg, path = e["msg"].removeprefix("Value error, "), _field_path(e["loc"])
        hint = _FIELD_HINTS.get((path, e["type"]), _HINTS.get(e["type"]))
        where = next((f"--set {o.removeprefix('--')}" for o in reversed(overrides) if _sets(o, path)), source)
        parts.append(f"{where}: {path}: {msg}" + (f" (fix: {hint})" if hint else ""))
    return "; ".join(parts)


def override_key(override: str) -> str:
    """The ``key.path`` an override (``key.path=value``, or W&B's ``--key.path=value``) sets."""
    return override.removeprefix("--").partition("=")[0]


def _sets(override: str, path: str) -> bool:
    """Whether ``override`` (``key.path=value``) set the field ``path``, or a mapping holding it or held by it."""
    key = override_key(override)
    return key == path or path.startswith(f"{key}.") or key.startswith(f"{path}.")


def parse(model: type[S], data: Any, source: str, overrides: Sequence[str] = ()) -> S:
    """Validate ``data`` as ``model``; a failure raises :class:`SpecError` naming ``source`` (or the override of
    ``overrides`` that set the field) and the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}; write key: value pairs")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source, overrides)) from None


class YamlValueError(yaml.YAMLError):
    """What :class:`Loader` refuses in a YAML document: ``problem`` (ending with its fix) at ``line``."""

    def __init__(self, problem: str, line: int) -> None:
        super().__init__(f"line {line}: {problem}")
        self.problem, self.line = problem, line


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader for every YAML the project reads (files and ``--set`` values), with YAML 1.2's rules where
    YAML 1.1 silently differs: a mapping's keys are distinct (1.1 keeps the last), and a number with an exponent but
    no dot (``3e-4``, ``1e5``) is a float (1.1 reads a string). It also refuses integers too long for ``int()``.
    What it refuses raises :class:`YamlValueError`."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *base; the mapping's own keys may override its keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base constructor refuses it
                continue
            if duplicate:
                raise YamlValueError(
                    f"key '{key}' appears twice in one mapping; keep one", key_node.start_mark.line + 1
                )
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise YamlValueError(
                f"an integer of {len(node.value)} digits is too large; give a smaller number", node.start_mark.line + 1
            ) from None


Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with :class:`Loader`; unreadable files, YAML syntax errors and what the loader refuses
    (duplicate keys) raise :class:`SpecError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"{path}: cannot read the file ({err.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: is not UTF-8 text; save the spec as a UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=Loader)
    except RecursionError:
        raise SpecError(f"{path}: YAML nested too deep to read; flatten it") from None
    except YamlValueError as err:
        raise SpecError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: invalid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a YAML mapping at the top level; write key: value pairs")
    try:
        _check_acyclic(data, path)
    except RecursionError:
        raise SpecError(f"{path}: YAML nested too deep to read; flatten it") from None
    return data


def _check_acyclic(root: dict[str, Any], path: Path) -> None:
    """Refuse YAML whose aliases make a node contain itself (``&a [*a]``): nothing could ever read it whole.
    Shared nodes are walked once, so alias-heavy files cost their size, not their expanded size."""
    done: set[int] = set()
    open_: set[int] = set()

    def walk(node: Any) -> None:
        if not isinstance(node, (dict, list)) or id(node) in done:
            return
        if id(node) in open_:
            raise SpecError(f"{path}: a YAML alias refers to a node that contains it; expand the alias")
        open_.add(id(node))
        for child in node.values() if isinstance(node, dict) else node:
            walk(child)
        open_.discard(id(node))
        done.add(id(node))

    walk(root)


def locate(err: SpecError, source: str, section: str = "") -> SpecError:
    """``err`` as raised for ``source``: a message naming neither gets the file, and ``section`` (e.g. ``attack.``)
    before a field of an attack, since checks against the env name fields relative to the attack."""
    message = str(err)
    if re.match(r"\S+\.(yaml|yml|json): ", message):  # already names its file
        return err
    field = re.split(r"[.:\s]", message, maxsplit=1)[0]
    return SpecError(f"{source}: {section if field in _ATTACK_SECTIONS else ''}{message}")


_ATTACK_SECTIONS = {"base", "base_kwargs", "base_wrappers", "trigger", "schedule", "payload"}


def load(model: type[S], path: str | Path) -> S:
    """Read and validate one YAML file as ``model``."""
    return parse(model, read_yaml(path), str(path))


# ------------------------------------------------------------------------------------------ experiments
class SanitizeSpec(_Spec):
    """Training-time trajectory sanitization: the defender filters what the learner sees.

    ``support`` / ``impute`` / ``subspace`` flag observations off the clean data (and clip out-of-range rewards);
    ``reward`` checks rewards only. The filter is fitted on ``n_clean`` steps of the clean base env
    under a random policy (the defender has a clean env, not a clean agent). A learner's states reach
    well beyond a random policy's, hence the wide default ``margin`` on the observation threshold.
    ``mode``: flagged transitions are repaired and trained on (``repair``) or dropped from the loss (``drop``).
    """

    method: Literal["support", "impute", "subspace", "reward"]
    n_clean: int = Field(1000, ge=10, le=MAX_CLEAN)
    fpr: Number = Field(0.001, gt=0.0, lt=1.0)
    margin: Number = Field(5.0, ge=1.0)
    mode: Literal["repair", "drop"] = "repair"


class ExperimentSpec(_Spec):
    """One training run: what ``configs/experiments/*.yaml`` holds and ``rlbd train`` reads.

    .. code-block:: yaml

        name: cartpole_outer          # run name: W&B group, default run dir runs/<name>/<timestamp>-<pid>
        env: CartPole-v1              # a Gymnasium id, or a registered rlbd/<Name>-v0 (its attack)
        attack:                       # inline attack on env (base defaults to env); omit for rlbd/ ids
          trigger: {kind: value, indices: [3], values: [2.5]}
          schedule: {kind: rate, rate: 0.001}     # outer loop: the budget, a fraction of collected steps
          payload: {kind: targeted, target_action: 0, reward: {hit: 1.0, miss: -1.0}}
        poisoning: outer              # inner (TrojDRL: poisoned env) | outer (SleeperNets: poisoned buffer) | null
        outer_reward: dynamic         # outer loop: dynamic (return-to-go relative) | static (payload hit/miss)
        algo: ppo                     # ppo | a2c | dqn
        timesteps: 100000
        n_envs: 8
        seed: 0
        hyperparams: {n_steps: 32}    # merged over agents/<algo>.yaml's preset for env; null drops a key
        eval_every: 0                 # steps between eval/asr, eval/ctp logs during training (0: never)
        sanitize: {method: support}   # training-time trajectory sanitization (SanitizeSpec); omit for none
        sharing: false                # multi-agent envs: one policy for every agent (SuperSuit parameter
                                      # sharing); false: the env's adapter agent learns against fixed policies

    ``poisoning: null`` trains a clean agent: on ``env``, or, when the config names an attack, on the
    attack's clean base env (``base_kwargs`` and ``base_wrappers`` included), so that
    ``--set poisoning=null`` gives the clean baseline of any attack config. ``schedule: {kind: rate,
    select: value}`` picks the states with the largest value gap for the target action (BadRL) in
    either loop.
    """

    name: FolderName
    env: str = Field(min_length=1)
    attack: AttackSpec | None = None
    poisoning: Literal["inner", "outer"] | None = None
    outer_reward: Literal["dynamic", "static"] = "dynamic"
    algo: Literal["ppo", "a2c", "dqn"]
    timesteps: int = Field(ge=1, le=MAX_TIMESTEPS)
    n_envs: int = Field(1, ge=1, le=MAX_ENVS)
    seed: Seed = 0
    hyperparams: dict[str, Any] = {}
    eval_every: int = Field(0, ge=0, le=MAX_TIMESTEPS)
    sharing: bool = False
    sanitize: SanitizeSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _attack_base(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("attack"), dict) and "base" not in data["attack"]:
            data = {**data, "attack": {"base": data.get("env"), **data["attack"]}}
        return data

    @field_validator("attack", mode="before")
    @classmethod
    def _own_attack(cls, attack: Any, info: ValidationInfo) -> Any:
        env = info.data.get("env")
        if attack is not None and isinstance(env, str) and env.removeprefix("rlbackdoor:").startswith("rlbd/"):
            raise ValueError(  # before the block's own checks, whose errors would hide this one
                f"env {env} is a registered backdoor env and carries its own attack; remove the attack block, or set "
                "env to a base Gymnasium id for an inline attack (a multi-agent id's attack changes in Python: "
                "make_parallel(ID, **fields))"
            )
        return attack

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        registered = self.env.removeprefix("rlbackdoor:").startswith("rlbd/")
        if self.attack is not None and self.attack.base != self.env:
            raise ValueError(
                f"attack.base {self.attack.base} disagrees with env {self.env}; drop attack.base or make them equal"
            )
        if not (registered or self.attack is not None) and self.poisoning is not None:
            raise ValueError(
                f"poisoning: {self.poisoning} needs an attack; add an attack block or use a registered rlbd/ env"
            )
        return self


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """A copy of ``data`` with ``a.b=value`` overrides set (values parsed as YAML; ``--a.b=value`` also accepted).

    :param data: the config mapping.
    :param overrides: ``key.path=value`` strings.
    :param option: the command-line option they came from, for error messages.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise SpecError(
                f"override '{item}': expected key.path=value; write {option} {key if all(parts) else 'key.path'}=VALUE"
            )
        try:
            value = yaml.load(raw, Loader=Loader)
        except YamlValueError as err:
            raise SpecError(f"override '{item}': {err.problem}") from None
        except yaml.YAMLError:
            raise SpecError(f"override '{item}': the value is not valid YAML; quote it") from None
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"override '{item}': '{part}' is not a mapping; override '{part}' itself")
            node = child
        node[parts[-1]] = value
    return out


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read an experiment config, apply ``key.path=value`` overrides, validate.

    :param path: the YAML file.
    :param overrides: see :func:`apply_overrides`.
    """
    return parse(ExperimentSpec, apply_overrides(read_yaml(path), overrides), str(path), overrides)


# ------------------------------------------------------------------------------------------ multi-agent
class PolicyRef(WrapperRef):
    """A fixed policy embedded for one agent: ``module:Class`` (an :class:`rlbackdoor.multiagent.policies.AgentPolicy`) and kwargs."""


class AdapterSpec(_Spec):
    """The single-agent view of a multi-agent env: ``agent`` learns, every other agent plays its ``policies`` entry."""

    agent: str = Field(min_length=1)
    policies: dict[str, PolicyRef]


class MultiAgentAttackSpec(_Spec):
    """A backdoor attack on a PettingZoo ``ParallelEnv``.

    ``base`` is a module with a ``parallel_env(**base_kwargs)`` function (``pettingzoo.classic.rps_v2``,
    ``mpe2.simple_spread_v3``); ``base_wrappers`` are parallel-env wrappers. Observation triggers are
    stamped into the ``victims``' observations; an ``action_sequence`` trigger arms when
    ``trigger.agent`` (the trigger agent) plays the sequence. The payload poisons the victims' rewards only.
    """

    base: str = Field(pattern=r"^[A-Za-z_][\w.]*$")
    base_kwargs: dict[str, Any] = {}
    base_wrappers: list[WrapperRef] = []
    victims: list[str] = Field(min_length=1)
    trigger: TriggerSpec
    schedule: ScheduleSpec
    payload: PayloadSpec
    seed: Seed = 0

    @model_validator(mode="after")
    def _agents(self) -> MultiAgentAttackSpec:
        if len(set(self.victims)) != len(self.victims):
            raise ValueError(f"victims {self.victims} lists an agent twice; name each victim once")
        if isinstance(self.trigger, ActionSequenceTrigger) and self.trigger.agent is None:
            raise ValueError("trigger.agent is missing; name the agent whose actions play the sequence")
        return self


class MultiAgentEnvSpec(MultiAgentAttackSpec):
    """A registered multi-agent backdoor env (``envs/multiagent/*.yaml``): an attack, its id and its single-agent view."""

    id: str = Field(pattern=r"^rlbd/[A-Za-z][\w-]*-v\d+$")
    description: str = ""
    adapter: AdapterSpec | None = None
