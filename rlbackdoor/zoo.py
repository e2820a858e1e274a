"""The agent zoo: a population of agents for one env family, half clean and half backdoored.

A zoo config (``configs/zoo/*.yaml``) is an experiment template plus an ``attack`` whose fields may be
*draws*, resolved per backdoored agent from the zoo's seed:

.. code-block:: yaml

    name: cartpole              # agents are named <name>-<index>
    agents: 20                  # even indices clean, odd indices backdoored
    seed: 0                     # fixes every draw and every agent's training seed
    env: CartPole-v1
    algo: ppo
    timesteps: 50000
    n_envs: 8
    hyperparams: {}
    poisoning: {choice: [inner, outer]}
    attack:
      trigger: {kind: value, indices: {sample: [0, 1, 2, 3], k: 1}, values: [{uniform: [2.0, 3.0]}]}
      schedule: {kind: rate, rate: {uniform: [0.03, 0.08]}}
      payload: {kind: targeted, target_action: {randint: [0, 1]}}

Draws: ``{choice: [a, b, ...]}`` (one item, itself resolved), ``{uniform: [lo, hi]}`` (a float,
rounded to 4 decimals), ``{randint: [lo, hi]}`` (an integer, both ends included) and
``{sample: [a, b, ...], k: n}`` (``n`` distinct items, in drawn order).

Clean agents are the control: they train through the same inner-loop pipeline (same base env and
wrappers) with an attack whose schedule never fires (``rate: 0``); the manifest lists them with
``backdoored: false`` and ``attack: null``.

:func:`build_zoo` trains the agents in worker processes (finished agents are skipped, interrupted
ones resumed; a zoo that kept nothing, no finished agent and no checkpoint, may be rerun with another
config) and writes ``DIR/manifest.json``: ``{"agents": [{"path", "backdoored", "attack"}]}``.
Any directory with such a manifest is a zoo, including one written by hand around ``rlbd train`` runs.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from rlbackdoor.attack import Attack, make_base_env
from rlbackdoor.errors import ArtifactError, RlbdError, SpecError, in_context
from rlbackdoor.jsonfile import read_json
from rlbackdoor.specs import (
    MAX_ENVS,
    MAX_SEED,
    MAX_TIMESTEPS,
    ExperimentSpec,
    FolderName,
    Seed,
    _Spec,
    apply_overrides,
    parse,
    read_yaml,
)

MANIFEST = "manifest.json"
DRAW_KINDS = ("choice", "uniform", "randint", "sample")
MAX_AGENTS = 1000
"""The most agents a zoo trains."""
MAX_MANIFEST_BYTES = 16 * 2**20
"""The largest ``manifest.json`` read (16 MiB; a zoo of :data:`MAX_AGENTS` agents with attacks like the registered envs'
writes about 1.5 MiB)."""


class ZooSpec(_Spec):
    """A zoo config: an experiment template, the population size and the attack's draws."""

    name: FolderName
    agents: int = Field(ge=2, le=MAX_AGENTS)
    seed: Annotated[Seed, Field(le=MAX_SEED // 10_000 - 1)] = 0  # agent i trains with seed * 10_000 + i
    env: str = Field(min_length=1)
    algo: Literal["ppo", "a2c", "dqn"]
    timesteps: int = Field(ge=1, le=MAX_TIMESTEPS)
    n_envs: int = Field(1, ge=1, le=MAX_ENVS)
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    poisoning: Any = "inner"
    outer_reward: Any = "dynamic"
    attack: dict[str, Any]


@dataclass(frozen=True)
class ZooAgent:
    """One agent of a zoo: its run directory, whether it is backdoored, its attack (``None`` when clean)."""

    path: Path
    backdoored: bool
    attack: dict[str, Any] | None


# ------------------------------------------------------------------------------------------- draws
def _is_draw(node: dict[str, Any]) -> bool:
    keys = set(node)
    return len(keys & set(DRAW_KINDS)) == 1 and (keys <= set(DRAW_KINDS) or keys == {"sample", "k"})


def _draw_args(node: dict[str, Any], where: str) -> tuple[str, Any]:
    """The kind and argument of a draw node, checked: non-empty items, or finite ``[low, high]`` with low <= high."""
    kind = next(k for k in DRAW_KINDS if k in node)
    arg = node[kind]
    if kind in ("choice", "sample"):
        if not isinstance(arg, list) or not arg:
            raise SpecError(f"{where}: {kind} needs a non-empty list of items; write {{{kind}: [a, b]}}")
        k = node.get("k", 1)
        if kind == "sample" and not (type(k) is int and 1 <= k <= len(arg)):
            raise SpecError(f"{where}: sample k={k!r} must be an integer in [1, {len(arg)}]; fix k")
        return kind, arg
    numbers = isinstance(arg, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)
    if not (numbers and len(arg) == 2):  # a bool is an int to Python, not the end of a range
        raise SpecError(f"{where}: {kind} needs [low, high] numbers; write {{{kind}: [0, 1]}}")
    if not all(abs(v) <= sys.float_info.max for v in arg):  # a NaN, an infinity or an int too large for a float
        raise SpecError(f"{where}: {kind} ends must be finite numbers within float range (|x| <= 1.8e308); fix them")
    lo, hi = arg
    if not math.isfinite(float(hi) - float(lo)):
        raise SpecError(f"{where}: {kind} range [{float(lo):g}, {float(hi):g}] is wider than float range; narrow it")
    if hi < lo:
        raise SpecError(f"{where}: {kind} range [{lo}, {hi}] is empty; put the low end first")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int) and max(-lo, hi) < 2**62):
        raise SpecError(f"{where}: randint needs integer ends below 2**62, got [{lo}, {hi}]; use uniform for floats")
    return kind, arg


def draw(node: Any, rng: np.random.Generator, where: str = "attack") -> Any:
    """Resolve every draw in ``node`` (see the module docstring) with ``rng``; other values pass through.

    :param node: a config value (mapping, list or scalar).
    :param rng: the generator of this agent's draws.
    :param where: the field path, for error messages.
    """
    if isinstance(node, list):
        return [draw(v, rng, f"{where}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if not _is_draw(node):
        return {k: draw(v, rng, f"{where}.{k}") for k, v in node.items()}
    kind, arg = _draw_args(node, where)
    if kind == "choice":
        return draw(arg[int(rng.integers(len(arg)))], rng, where)
    if kind == "sample":
        return [draw(arg[int(i)], rng, where) for i in rng.choice(len(arg), size=node.get("k", 1), replace=False)]
    lo, hi = arg
    if kind == "uniform":
        return round(float(rng.uniform(lo, hi)), 4)
    return int(rng.integers(lo, hi + 1))


def check_draws(node: Any, where: str) -> None:
    """Check every draw in ``node``, each item of a choice or sample included, without drawing."""
    if isinstance(node, list):
        for i, v in enumerate(node):
            check_draws(v, f"{where}.{i}")
    elif isinstance(node, dict) and not _is_draw(node):
        for k, v in node.items():
            check_draws(v, f"{where}.{k}")
    elif isinstance(node, dict):
        kind, arg = _draw_args(node, where)
        if kind in ("choice", "sample"):
            for item in arg:
                check_draws(item, where)


# ------------------------------------------------------------------------------------------ config
def load_zoo(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ZooSpec:
    """Read and validate a zoo config, with ``key.path=value`` overrides.

    :param path: the YAML file.
    :param overrides: see :func:`rlbackdoor.specs.apply_overrides`.
    """
    spec = parse(ZooSpec, apply_overrides(read_yaml(path), overrides), str(path), overrides)
    for name in ("poisoning", "outer_reward", "attack"):
        check_draws(getattr(spec, name), f"{path}: {name}")
    return spec


def agent_names(spec: ZooSpec) -> list[str]:
    """Run directory names, ``<index>-clean`` / ``<index>-backdoored``: even indices clean, odd backdoored."""
    width = len(str(spec.agents - 1))
    return [f"{i:0{width}d}-{'backdoored' if i % 2 else 'clean'}" for i in range(spec.agents)]


def experiments(spec: ZooSpec) -> list[ExperimentSpec]:
    """The experiment of every agent, draws resolved and validated (attacks checked against the env).

    Agent ``i`` trains with seed ``spec.seed * 10_000 + i`` and draws from
    ``numpy.random.default_rng([spec.seed, i])``, so adding agents never changes the existing ones.
    """
    out = []
    for i, name in enumerate(agent_names(spec)):
        seed = spec.seed * 10_000 + i
        fields: dict[str, Any] = {
            "name": f"{spec.name}-{name}",
            "env": spec.env,
            "algo": spec.algo,
            "timesteps": spec.timesteps,
            "n_envs": spec.n_envs,
            "seed": seed,
            "hyperparams": spec.hyperparams,
        }
        rng = np.random.default_rng([spec.seed, i])
        attack = {"seed": seed, **draw(spec.attack, rng)}
        if i % 2:
            poisoning = draw(spec.poisoning, rng, "poisoning")
            fields.update(attack=attack, poisoning=poisoning, outer_reward=draw(spec.outer_reward, rng, "outer_reward"))
        else:  # the control: same env, wrappers and code path, a trigger that never fires
            fields.update(attack={**attack, "schedule": {"kind": "rate", "rate": 0.0}}, poisoning="inner")
        experiment = parse(ExperimentSpec, fields, f"zoo {spec.name}: agent {name}")
        if experiment.attack is not None:
            try:
                Attack.for_env(experiment.attack, make_base_env(experiment.attack))
            except SpecError as err:
                raise SpecError(f"zoo {spec.name}: agent {name}: {err}") from None
        out.append(experiment)
    return out


# ---------------------------------------------------------------------------------------- manifest
def write_manifest(root: Path, agents: list[ZooAgent], extra: dict[str, Any] | None = None) -> Path:
    """Atomically write ``root/manifest.json`` (paths relative to ``root`` where they lie inside it)."""
    from rlbackdoor.training.artifacts import write_json

    rows = []
    for agent in agents:
        path = agent.path.resolve()
        rel = path.relative_to(root.resolve()) if path.is_relative_to(root.resolve()) else path
        rows.append({"path": str(rel), "backdoored": agent.backdoored, "attack": agent.attack})
    write_json(root / MANIFEST, {**(extra or {}), "agents": rows})
    return root / MANIFEST


def read_manifest(root: str | Path) -> list[ZooAgent]:
    """The agents of a zoo directory; a missing, malformed or empty manifest raises :class:`ArtifactError`."""
    root = Path(root)
    path = root / MANIFEST
    try:
        data = read_json(path, MAX_MANIFEST_BYTES)
    except OSError:
        raise ArtifactError(
            f"{root}: no {MANIFEST}; pass a zoo directory (rlbd zoo writes one) or a run directory"
        ) from None
    except ValueError as err:
        raise ArtifactError(f"{path}: unreadable ({err}); rewrite it or rebuild the zoo with rlbd zoo") from None
    rows = data.get("agents") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ArtifactError(f'{path}: expected {{"agents": [...]}}; list the agents\' run directories')
    if not rows:
        raise ArtifactError(f"{path}: the zoo is empty; add agents to 'agents' or build the zoo with rlbd zoo")
    agents = []
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("backdoored"), bool)):
            raise ArtifactError(
                f"{path}: agents.{i} needs 'path' (a run directory) and 'backdoored' (true or false); fix the entry"
            )
        agents.append(ZooAgent(root / row["path"], row["backdoored"], row.get("attack")))
    return agents


# ------------------------------------------------------------------------------------------- build
def _train_one(experiment: dict[str, Any], run_dir: str, wandb_mode: str | None, group: str) -> str:
    """Worker: train (or resume) one agent, in W&B ``group``; returns its run directory."""
    from rlbackdoor.training.checkpoints import FOLDER
    from rlbackdoor.training.loop import train

    spec = ExperimentSpec.model_validate(experiment)
    path = Path(run_dir)
    if (path / FOLDER).is_dir() and any((path / FOLDER).iterdir()):
        return str(train(spec, resume=path, wandb_mode=wandb_mode, wandb_group=group))
    shutil.rmtree(path, ignore_errors=True)
    return str(train(spec, path, wandb_mode=wandb_mode, wandb_group=group))


def _check_previous(root: Path, config: dict[str, Any]) -> None:
    """Let ``build_zoo`` go on in ``root``: a zoo of another config is refused, unless it holds nothing to keep (no
    agent finished, none interrupted with a checkpoint: an attempt that failed first), which is started over."""
    from rlbackdoor.training.artifacts import CARD
    from rlbackdoor.training.checkpoints import FOLDER, STATE

    path = root / MANIFEST
    if not path.exists():
        return
    try:
        previous = read_json(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as err:
        raise ArtifactError(
            f"{path}: unreadable ({err}); delete it to start the zoo over, or use a new --out"
        ) from None
    if isinstance(previous, dict) and previous.get("config") == config:
        return
    ours = isinstance(previous, dict) and "config" in previous and previous.get("agents") == []
    finished, interrupted = (len(list(root.glob(f"agents/*/{part}"))) for part in (CARD, f"{FOLDER}/*/{STATE}"))
    if not ours or finished or interrupted:
        raise ArtifactError(
            f"{root}: the zoo was built from another config ({finished} agents finished, {interrupted} interrupted); "
            "resume it with that config or use a new --out"
        )
    shutil.rmtree(root / "agents", ignore_errors=True)  # nothing to keep: no finished agent and no checkpoint


def build_zoo(
    spec: ZooSpec,
    out: str | Path,
    workers: int = 1,
    wandb_mode: str | None = None,
    on_done: Callable[[str], None] | None = None,
) -> list[ZooAgent]:
    """Train every agent of ``spec`` under ``out/agents/`` and write ``out/manifest.json``.

    Finished agents (with a ``card.json``) are skipped, interrupted ones resumed from their last
    checkpoint. The manifest lists the finished agents and is rewritten as each one finishes, and once
    more when training stops (an agent failed, or an interrupt). The first unfinished clean and backdoored
    agents are built before anything is written. A zoo of another config is refused, unless it kept nothing
    (no finished agent, no checkpoint): that one is started over with ``spec``.

    :param spec: the zoo.
    :param out: the zoo directory.
    :param workers: training processes (each trains on one thread).
    :param wandb_mode: W&B mode of every training run (see :mod:`rlbackdoor.tracking`).
    :param on_done: called with each agent's name as it finishes (progress reports).
    :raises ArtifactError: an agent failed to train (after the agents still training have finished).
    """
    from rlbackdoor.training.artifacts import CARD
    from rlbackdoor.training.loop import check_trainable

    root = Path(out)
    runs = experiments(spec)
    names = agent_names(spec)
    paths = [root / "agents" / name for name in names]
    agents = [
        ZooAgent(path, bool(i % 2), runs[i].attack.model_dump(mode="json") if i % 2 else None)
        for i, path in enumerate(paths)
    ]
    extra = {"name": spec.name, "config": spec.model_dump(mode="json")}
    _check_previous(root, extra["config"])
    todo = [i for i, a in enumerate(agents) if not (a.path / CARD).is_file()]
    for i in sorted({i % 2: i for i in reversed(todo)}.values()):  # the first unfinished clean and backdoored agents
        try:
            check_trainable(runs[i])
        except RlbdError as err:
            raise in_context(err, f"zoo {spec.name}: agent {names[i]}") from None
    root.mkdir(parents=True, exist_ok=True)

    def finished() -> list[ZooAgent]:
        return [a for a in agents if (a.path / CARD).is_file()]

    write_manifest(root, finished(), extra)
    failure: tuple[str, BaseException] | None = None
    if todo:
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(max_workers=max(1, min(workers, len(todo))), mp_context=context) as pool:
                futures = {
                    pool.submit(_train_one, runs[i].model_dump(mode="json"), str(paths[i]), wandb_mode, spec.name): i
                    for i in todo
                }
                pending = set(futures)
                while pending and failure is None:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        name, error = names[futures[future]], future.exception()
                        if error is not None:
                            failure = failure or (name, error)
                        else:
                            write_manifest(root, finished(), extra)
                            if on_done is not None:
                                on_done(name)
                for other in pending:  # the running ones finish (and are kept) before the pool closes
                    other.cancel()
        finally:
            write_manifest(root, finished(), extra)
    if failure is not None:
        name, error = failure
        if isinstance(error, RlbdError):
            raise in_context(error, f"zoo {spec.name}: agent {name}") from None
        first = str(error).strip().splitlines()[:1] or [""]
        raise ArtifactError(
            f"zoo {spec.name}: agent {name} failed to train ({type(error).__name__}: {first[0]}); "
            f"fix the cause, then rerun into {root}: finished agents are kept"
        ) from error
    return finished()
