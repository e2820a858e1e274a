"""The benchmark matrix: a bench config (``configs/bench/*.yaml``) and its expansion into cells.

.. code-block:: yaml

    name: small
    envs: [rlbd/TrojanCartPole-v1]     # registered rlbd/ ids, or experiment YAML files (relative to this file)
    poisoning: [inner, outer]          # the attacks: inner loop (TrojDRL), outer loop (SleeperNets)
    poison_rates: [0.005, 0.02]        # optional: sets the attack schedule's rate (budget: rate x horizon)
    algo: ppo                          # algo, timesteps, n_envs, hyperparams: over each env's config
    timesteps: 20000
    seeds: 2                           # training seeds 0..n-1, or a list
    eval: {episodes: 5, seeds: 2}
    defenses:
      sanitizers: [support]            # rlbd sanitize --list
      detectors: [probe]               # rlbd detect --list
      n_clean: 256

Cells, each with a stable id (a hash of its resolved config):

- ``train``: trains one agent (or reuses the artifact of the same experiment) and evaluates it. Every
  (env, seed) has a clean agent (``poisoning: null``, the attack's clean base env); every (env,
  poisoning, rate, seed) a backdoored one, evaluated against its clean twin (``ctp_ratio``).
- ``sanitize``: a backdoored agent under each sanitizer: ASR and CTP before and after.
- ``detect``: a detector over the population of one (env, seed): its clean agent and every backdoored
  agent (all poisonings and rates), scored by model-level AUROC (input-level detectors: their mean input
  AUROC). Over seeds this gives an AUROC per seed, summarised like every other metric.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import (
    MAX_CLEAN,
    MAX_ENVS,
    MAX_EPISODES,
    MAX_TIMESTEPS,
    ExperimentSpec,
    FolderName,
    SeedCount,
    Seeds,
    _Spec,
    apply_overrides,
    parse,
    read_yaml,
)


class EvalSettings(_Spec):
    """Evaluation of every agent: ``episodes`` per evaluation seed, ``seeds`` evaluation seeds."""

    episodes: int = Field(5, ge=1, le=MAX_EPISODES)
    seeds: SeedCount = 2


class DefenseSettings(_Spec):
    """Defenses of every backdoored agent: run-time ``sanitizers`` and ``detectors`` by name."""

    sanitizers: list[str] = Field(default_factory=list)
    detectors: list[str] = Field(default_factory=list)
    n_clean: int = Field(256, ge=16, le=MAX_CLEAN, description="clean observations each defense is fitted on")

    @field_validator("sanitizers", "detectors")
    @classmethod
    def _unique(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} lists {next(x for x in v if v.count(x) > 1)} twice; name each once")
        return v

    @field_validator("sanitizers", "detectors")
    @classmethod
    def _known(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from rlbackdoor.defenses.detectors import DETECTORS
        from rlbackdoor.defenses.sanitize import METHODS

        known, command = {"sanitizers": (METHODS, "sanitize"), "detectors": (DETECTORS, "detect")}[info.field_name]
        for name in v:
            if name not in known:
                raise ValueError(
                    f"unknown {info.field_name[:-1]} '{name}'; use one of {', '.join(known)} (rlbd {command} --list)"
                )
        return v


def _seeds_form(value: Any) -> str:
    """Which form a bench's ``seeds`` takes: a list of seeds, or else a count (validated as one)."""
    return "list" if isinstance(value, (list, tuple)) else "count"


CountOrSeeds = Annotated[Annotated[SeedCount, Tag("count")] | Annotated[Seeds, Tag("list")], Discriminator(_seeds_form)]
"""Training seeds: a count ``n`` (seeds ``0..n-1``) or a list of seeds; either way at most ``MAX_SEED_COUNT``."""


class BenchSpec(_Spec):
    """A bench config (see the module docstring)."""

    name: FolderName
    envs: list[str] = Field(min_length=1)
    poisoning: list[Literal["inner", "outer"]] = Field(["inner"], min_length=1)
    poison_rates: list[float] | None = Field(None, min_length=1)
    algo: Literal["ppo", "a2c", "dqn"] | None = None
    timesteps: int | None = Field(None, ge=1, le=MAX_TIMESTEPS)
    n_envs: int | None = Field(None, ge=1, le=MAX_ENVS)
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    seeds: CountOrSeeds = 2
    eval: EvalSettings = EvalSettings()
    defenses: DefenseSettings = DefenseSettings()

    @field_validator("envs", "poisoning", "poison_rates", "seeds")
    @classmethod
    def _unique(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list) and len(set(v)) != len(v):
            twice = next(x for x in v if v.count(x) > 1)
            raise ValueError(f"{info.field_name} lists {twice} twice; name each once")
        return v

    @field_validator("poison_rates")
    @classmethod
    def _rates(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(0.0 < r <= 1.0 for r in v):
            raise ValueError(f"poison_rates {v} must lie in (0, 1]")
        return v

    @property
    def seed_list(self) -> list[int]:
        """The training seeds."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``kind`` (train, sanitize, detect), its labels, its config and the cells it needs.

    :param id: a hash of everything that determines the cell's result (its config and those of the cells it needs).
    :param kind: ``train`` (train or reuse ``config["artifact"]``, then evaluate), ``sanitize`` or ``detect``.
    :param labels: env, poisoning, poison_rate, seed, defense: the report's grouping.
    :param config: what the cell runs; artifacts are named by the hash of their experiment (``runs/<hash>``).
    :param needs: ids of the cells that must finish first.
    """

    id: str
    kind: Literal["train", "sanitize", "detect"]
    labels: dict[str, Any]
    config: dict[str, Any]
    needs: tuple[str, ...] = ()


def digest(data: Any) -> str:
    """A short stable hash of JSON-able ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_bench(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BenchSpec:
    """Read a bench config, apply ``key.path=value`` overrides and validate its fields (:func:`expand` checks the envs).

    :param path: the YAML file.
    :param overrides: see :func:`rlbackdoor.specs.apply_overrides`.
    """
    return parse(BenchSpec, apply_overrides(read_yaml(path), overrides), str(path), overrides)


def _env_base(entry: str, root: Path, source: str) -> tuple[str, dict[str, Any]]:
    """The label and experiment fields of one ``envs`` entry (a registered id or an experiment YAML)."""
    from rlbackdoor.multiagent.registry import is_multiagent, list_parallel_envs
    from rlbackdoor.registry import env_specs

    if entry.endswith((".yaml", ".yml")):
        path = Path(entry) if Path(entry).is_file() else root / entry
        if not path.is_file():
            raise SpecError(f"{source}: envs: experiment config '{entry}' not found; give a path to a YAML file")
        data = read_yaml(path)
        return str(data.get("name", path.stem)), data
    env_id = entry.removeprefix("rlbackdoor:")
    if is_multiagent(env_id):
        return env_id, {"env": env_id}
    if env_id not in env_specs():
        known = ", ".join([*env_specs(), *list_parallel_envs()])
        raise SpecError(
            f"{source}: envs: unknown env '{entry}'; use a registered id ({known}) or an experiment config YAML"
        )
    return env_id, {"env": env_id}


def _with_rate(fields: dict[str, Any], rate: float | None, where: str) -> dict[str, Any]:
    """``fields`` with the attack's schedule set to ``rate`` (a registered id becomes its inline attack)."""
    from rlbackdoor.registry import registered_attack

    if rate is None:
        return fields
    if "attack" not in fields and str(fields.get("env", "")).startswith("rlbd/"):
        attack = registered_attack(fields["env"]).model_dump(mode="json")
        fields = {**fields, "env": attack["base"], "attack": attack}
    attack = fields.get("attack")
    if not isinstance(attack, dict):
        raise SpecError(f"{where}: poison_rates need an attack block to set the rate of; drop poison_rates")
    schedule = dict(attack.get("schedule") or {})
    if schedule.get("kind") == "rate":
        schedule["rate"] = rate
    elif schedule.get("kind") == "budget":
        schedule["budget"] = round(rate * int(schedule["horizon"]))
    else:
        raise SpecError(f"{where}: poison_rates apply to rate and budget schedules only; drop poison_rates")
    return {**fields, "attack": {**attack, "schedule": schedule}}


def _experiment(
    spec: BenchSpec, base: dict[str, Any], label: str, poisoning: str | None, seed: int, source: str
) -> dict[str, Any]:
    """The validated experiment of one agent, as JSON (errors name ``source`` and the env)."""
    fields = {**base, "name": f"{spec.name}-{label}".replace("/", "-"), "poisoning": poisoning, "seed": seed}
    for key in ("algo", "timesteps", "n_envs"):
        if getattr(spec, key) is not None:
            fields[key] = getattr(spec, key)
    own = base.get("hyperparams") or {}
    if not isinstance(own, dict):
        raise SpecError(f"{source}: env {label}: hyperparams must be a mapping; write key: value pairs")
    fields["hyperparams"] = {**own, **spec.hyperparams}
    fields.pop("eval_every", None)
    experiment = parse(ExperimentSpec, fields, f"{source}: env {label}")
    return experiment.model_dump(mode="json")


def expand(spec: BenchSpec, root: Path = Path(), source: str | None = None) -> list[Cell]:
    """Every cell of the matrix, in run order (clean agents, backdoored agents, sanitizers, detectors).

    Unknown envs, rates that do not apply, invalid experiments and attacks that do not fit their env
    raise :class:`SpecError` here, before any cell runs.

    :param spec: the bench.
    :param root: the folder relative experiment configs are found in (the bench file's).
    :param source: what errors name first: the bench file's path (default ``bench <name>``).
    """
    from rlbackdoor.multiagent.registry import is_multiagent

    source = source or f"bench {spec.name}"
    evaluation = spec.eval.model_dump()
    cells: list[Cell] = []
    rates: list[float | None] = list(spec.poison_rates) if spec.poison_rates else [None]
    for entry in spec.envs:
        label, base = _env_base(entry, root, source)
        multiagent = is_multiagent(str(base.get("env", "")))
        if multiagent and (spec.poison_rates or spec.defenses.sanitizers or spec.defenses.detectors):
            raise SpecError(
                f"{source}: env {label} is multi-agent; poison_rates, sanitizers and detectors apply to "
                "single-agent envs; bench it in a config without them"
            )
        checked: set[str] = set()
        for seed in spec.seed_list:
            labels = {"env": label, "poisoning": "clean", "poison_rate": 0.0, "seed": seed}
            clean = _train_cell(_experiment(spec, base, label, None, seed, source), labels, evaluation)
            cells.append(clean)
            population = {clean.config["artifact"]: False}
            needs = [clean.id]
            for poisoning in spec.poisoning:
                for rate in rates:
                    experiment = _experiment(
                        spec, _with_rate(base, rate, f"{source}: env {label}"), label, poisoning, seed, source
                    )
                    attack = experiment.get("attack")
                    if attack is not None and not multiagent and digest(attack) not in checked:
                        _check_attack(attack, f"{source}: env {label}")
                        checked.add(digest(attack))
                    labels = {"env": label, "poisoning": poisoning, "poison_rate": _rate_of(experiment), "seed": seed}
                    cell = _train_cell(experiment, labels, evaluation, clean)
                    cells.append(cell)
                    population[cell.config["artifact"]] = True
                    needs.append(cell.id)
                    for method in spec.defenses.sanitizers:
                        config = {
                            "method": method,
                            "n_clean": spec.defenses.n_clean,
                            "eval": evaluation,
                            "artifact": cell.config["artifact"],
                            "baseline": clean.config["artifact"],
                        }
                        key = digest({"kind": "sanitize", **config, "needs": [cell.id, clean.id]})
                        cells.append(Cell(key, "sanitize", {**labels, "defense": method}, config, (cell.id, clean.id)))
            for name in spec.defenses.detectors:
                config = {"detector": name, "n_clean": spec.defenses.n_clean, "seed": seed, "population": population}
                key = digest({"kind": "detect", **config, "needs": needs})
                labels = {"env": label, "poisoning": "all", "poison_rate": None, "seed": seed, "defense": name}
                cells.append(Cell(key, "detect", labels, config, tuple(needs)))
    return cells


def _check_attack(attack: dict[str, Any], where: str) -> None:
    """The attack fits its env (trigger indices inside the observation, target action inside the action space)."""
    from rlbackdoor.attack import Attack, make_base_env
    from rlbackdoor.specs import AttackSpec

    spec = AttackSpec.model_validate(attack)
    try:
        Attack.for_env(spec, make_base_env(spec))
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None


def _rate_of(experiment: dict[str, Any]) -> float | None:
    """The poison rate an experiment's attack schedule sets (budget / horizon for a budget schedule)."""
    from rlbackdoor.registry import env_specs

    attack = experiment.get("attack")
    if attack is None and experiment["env"] in env_specs():
        attack = env_specs()[experiment["env"]].model_dump(mode="json")
    schedule = (attack or {}).get("schedule") or {}
    if schedule.get("kind") == "rate":
        return float(schedule["rate"])
    if schedule.get("kind") == "budget":
        return float(schedule["budget"]) / float(schedule["horizon"])
    return None


def _train_cell(
    experiment: dict[str, Any], labels: dict[str, Any], evaluation: dict[str, Any], clean: Cell | None = None
) -> Cell:
    """Train (or reuse) and evaluate one agent; a backdoored one against its ``clean`` twin."""
    config = {
        "experiment": experiment,
        "eval": evaluation,
        "artifact": digest({"experiment": experiment}),
        "baseline": clean.config["artifact"] if clean is not None else None,
    }
    needs = (clean.id,) if clean is not None else ()
    key = digest({"kind": "train", **config, "needs": list(needs)})
    return Cell(key, "train", {**labels, "defense": "none"}, config, needs)
