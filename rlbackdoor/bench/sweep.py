"""W&B sweeps without a W&B server: expand a grid or random sweep file and run its command per point.

A sweep file (``configs/sweeps/*.yaml``) is in W&B's format, so ``wandb sweep FILE`` + ``wandb agent``
run it unchanged; :func:`run_sweep` (``rlbd sweep FILE``) does what the agent does, locally:

- ``method: grid`` takes every combination of the parameters' ``value`` / ``values``; ``random`` draws
  ``count`` points from their distributions (seeded); ``bayes`` needs the W&B server and is refused.
- The ``command`` (default ``${env} ${interpreter} ${program} ${args}``) is built as ``wandb agent`` builds
  it: a token that is exactly ``${name}`` is replaced by that macro's list of words (``${env}`` is
  ``/usr/bin/env``, ``${interpreter}`` ``python``, ``${program}`` the file's ``program``, ``${args}``
  ``--name=value`` each, ``${args_no_hyphens}`` ``name=value``, ``${args_no_equals}`` ``--name value``,
  ``${args_json}`` one JSON object; unknown macros vanish), ``${envvar:NAME}`` inside a token by that
  environment variable; values are written with Python's ``str``. ``PATH`` starts with the folder of the
  running Python, so ``python`` and ``rlbd`` are this installation's.
- Each run is a subprocess with ``WANDB_MODE=offline`` (unless set), ``WANDB_RUN_GROUP`` the sweep's name
  and ``WANDB_TAGS`` ``sweep``: ``wandb sync`` then shows the runs grouped like a sweep. One JSON line per
  run goes to ``OUT/runs.jsonl`` and its output to ``OUT/run-<i>.log``.

Parameters are dotted fields of the config the command runs (``rlbd train CONFIG`` or ``rlbd bench
CONFIG``); each is checked against that config before any run starts (the config loads with it; a
``hyperparams.KEY`` names a hyperparameter of the sweep's algos, of a kind and range it takes), with every value of
a list, and the ends of a distribution and a value inside it (so that a float distribution on an integer field is
refused). Values are checked one at a time: what only a combination refuses is the run's to report.
A grid of more than :data:`MAX_RUNS` points is refused before it is expanded.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import FOLDER_NAME, read_yaml

METHODS = ("grid", "random", "bayes")
MAX_RUNS = 10_000
"""The most runs one local sweep starts (``--count``, ``run_cap``, the points of a grid)."""
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
KEYS = {
    "program",
    "command",
    "method",
    "metric",
    "parameters",
    "name",
    "description",
    "project",
    "entity",
    "early_terminate",
    "run_cap",
}
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "normal",
    "q_normal",
)
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


class Sweep:
    """A validated sweep file.

    :param path: the YAML file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        data = read_yaml(self.path)
        where = str(self.path)
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise SpecError(f"{where}: unknown key '{unknown[0]}'; a W&B sweep file has {', '.join(sorted(KEYS))}")
        self.method = data.get("method")
        if self.method not in METHODS:
            raise SpecError(f"{where}: method '{self.method}' is not a sweep method; use grid or random (or bayes)")
        if self.method == "bayes":
            raise SpecError(
                f"{where}: method bayes needs the W&B sweep server; run it with wandb sweep + wandb agent, "
                "or use grid or random here"
            )
        self.name = str(data.get("name") or self.path.stem)
        if not re.fullmatch(FOLDER_NAME, self.name):
            raise SpecError(
                f"{where}: name '{self.name}' is not a folder name (runs/sweeps/<name>); "
                "use letters, digits, -, _ and ., starting with a letter or digit"
            )
        self.program = data.get("program")
        if self.program is not None and not isinstance(self.program, str):
            raise SpecError(f"{where}: program {self.program!r} is not a string; name the script the command runs")
        command = data.get("command", DEFAULT_COMMAND)
        if not (isinstance(command, list) and command and all(isinstance(c, (str, int, float)) for c in command)):
            raise SpecError(f"{where}: command must be a list of words, e.g. [rlbd, train, CONFIG, '${{args}}']")
        self.command = [str(c) for c in command]
        if "${program}" in self.command and not self.program:
            raise SpecError(f"{where}: the command uses ${{program}} but the file has no program; add program:")
        parameters = data.get("parameters")
        if not isinstance(parameters, dict) or not parameters:
            raise SpecError(f"{where}: parameters must map parameter names to {{value|values|distribution}}")
        self.parameters: dict[str, dict[str, Any]] = {}
        for name, spec in parameters.items():
            self.parameters[str(name)] = _parameter(str(name), spec, self.method, where)
        if self.method == "grid":
            size = math.prod(len(_choices(spec)) for spec in self.parameters.values())
            if size > MAX_RUNS:
                raise SpecError(
                    f"{where}: the grid has {size:,} points, more than the {MAX_RUNS:,} runs a local sweep starts; "
                    "drop values, or split it into several sweeps"
                )
        self.run_cap = data.get("run_cap")
        if self.run_cap is not None and not (type(self.run_cap) is int and 1 <= self.run_cap <= MAX_RUNS):
            raise SpecError(
                f"{where}: run_cap {self.run_cap!r} is not a whole number in 1..{MAX_RUNS}; fix it or drop it"
            )
        self._check_fields()

    def _target(self) -> tuple[str, Path]:
        """The ``rlbd`` subcommand (``train`` or ``bench``) and config file the command runs."""
        words = [self.program if w == "${program}" else w for w in self.command]
        for i, word in enumerate(words[:-1]):
            if word in ("train", "bench") and not words[i + 1].startswith("${"):
                return word, Path(words[i + 1])
        raise SpecError(
            f"{self.path}: the command runs neither 'rlbd train CONFIG' nor 'rlbd bench CONFIG'; "
            "name the subcommand and its config file in command"
        )

    def _check_fields(self) -> None:
        """Every parameter is a field of the target config, and the config takes each of its values (every value of a
        list, the ends of a distribution and a value inside it: see :func:`_bounds`), written as the run's command
        writes them; a ``hyperparams.KEY`` parameter names a hyperparameter one of the sweep's algos takes, and
        each value is of a kind and range it takes (:func:`~rlbackdoor.training.presets.check_hyperparameter`).
        Values are checked one at a time: what only a combination refuses is each run's to report."""
        from rlbackdoor.bench.matrix import load_bench
        from rlbackdoor.specs import load_experiment
        from rlbackdoor.training.presets import ALGOS, check_hyperparameter

        kind, config = self._target()
        load = load_experiment if kind == "train" else load_bench
        if not config.is_file():
            where = "" if Path(config).is_absolute() else f" (from {Path.cwd()}: commands run in the current folder)"
            raise SpecError(f"{self.path}: the command's config {config} does not exist{where}; fix the path")
        base = load(config)
        algos = [a for a in ALGOS if a == getattr(base, "algo", None) or a in map(str, self._values("algo"))]
        for name, spec in self.parameters.items():
            key = name.removeprefix("hyperparams.") if name.count(".") == 1 else None
            for value in dict.fromkeys(str(v) for v in _bounds(spec, self.method)):
                try:
                    loaded = load(config, [f"{name}={value}"])
                    if name.startswith("hyperparams.") and key is not None:
                        check_hyperparameter(algos or list(ALGOS), key, loaded.hyperparams[key])
                except SpecError as err:
                    raise SpecError(
                        f"{self.path}: parameter '{name}' does not fit {config} with value {value} ({err}); "
                        "fix the value, or use a field of that config"
                    ) from None

    def _values(self, name: str) -> list[Any]:
        """The values the sweep can give ``name`` (none when it is not a parameter)."""
        return _bounds(self.parameters[name], self.method) if name in self.parameters else []

    def points(self, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """The parameter values of each run: the whole grid (or its first ``count``), or ``count`` random draws."""
        cap = min(c for c in (count, self.run_cap) if c is not None) if (count or self.run_cap) else None
        if self.method == "grid":
            names = list(self.parameters)
            combos = itertools.product(*(_choices(self.parameters[n]) for n in names))
            return [dict(zip(names, combo, strict=True)) for combo in itertools.islice(combos, cap)]
        if cap is None:
            raise SpecError(f"{self.path}: a random sweep runs until stopped; give --count N (or run_cap: N)")
        rng = np.random.default_rng(seed)
        return [{n: _draw(spec, rng) for n, spec in self.parameters.items()} for _ in range(cap)]

    def command_for(self, point: Mapping[str, Any]) -> list[str]:
        """The command of one run, macros substituted as ``wandb agent`` does."""
        variables = {
            "env": ["/usr/bin/env"],
            "interpreter": ["python"],
            "program": [str(self.program)] if self.program else [],
            "args": [f"--{k}={v}" for k, v in point.items()],
            "args_no_hyphens": [f"{k}={v}" for k, v in point.items()],
            "args_no_equals": [w for k, v in point.items() for w in (f"--{k}", str(v))],
            "args_no_boolean_flags": [
                f"--{k}" if isinstance(v, bool) else f"--{k}={v}" for k, v in point.items() if v is not False
            ],
            "args_json": [json.dumps(dict(point))],
        }
        out: list[str] = []
        for word in self.command:
            word = _ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), word)
            if word.startswith("${") and word.endswith("}"):
                out += variables.get(word[2:-1]) or []
            else:
                out.append(word)
        return out


def _parameter(name: str, spec: Any, method: str, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: parameter '{name}' must be a mapping like {{values: [a, b]}}")
    if "parameters" in spec:
        raise SpecError(f"{where}: parameter '{name}' nests parameters; name nested fields with dots ({name}.key)")
    if "values" in spec and not (isinstance(spec["values"], list) and spec["values"]):
        raise SpecError(f"{where}: parameter '{name}': values must be a non-empty list")
    if method == "grid" and "values" not in spec and "value" not in spec:
        raise SpecError(f"{where}: parameter '{name}': a grid sweep needs value or values; give a list of values")
    distribution = spec.get("distribution") or _infer(spec)
    if distribution not in DISTRIBUTIONS:
        raise SpecError(
            f"{where}: parameter '{name}': distribution '{distribution}' is not supported here; "
            f"use one of {', '.join(DISTRIBUTIONS)}"
        )
    needs = {"constant": ("value",), "categorical": ("values",), "normal": (), "q_normal": ()}.get(
        distribution, ("min", "max")
    )
    missing = [k for k in needs if k not in spec]
    if missing:
        raise SpecError(f"{where}: parameter '{name}': distribution {distribution} needs '{missing[0]}'; add it")
    if needs == ("min", "max"):
        _check_range(name, spec["min"], spec["max"], distribution.endswith("_values"), where)
    if distribution == "int_uniform" and not all(type(spec[k]) is int and abs(spec[k]) < 2**62 for k in ("min", "max")):
        raise SpecError(f"{where}: parameter '{name}': int_uniform needs integer min and max (|x| < 2**62); fix them")
    for key, low in (("mu", None), ("sigma", 0.0), ("q", 0.0)):
        if key in spec:
            _check_number(name, key, spec[key], low, where)
    if "probabilities" in spec:
        _check_probabilities(name, spec, where)
    spec = {**spec, "distribution": distribution}
    if distribution not in ("constant", "categorical", "int_uniform"):
        with np.errstate(over="ignore"):
            infinite = [v for v in _probes(spec) if not math.isfinite(v)]
        if infinite:
            fix = (
                "min and max are exponents of e: keep max below 709, or give the values with log_uniform_values"
                if distribution == "log_uniform"
                else "narrow the range, or raise q"
            )
            raise SpecError(
                f"{where}: parameter '{name}': {distribution} draws {infinite[0]}, not a finite number; {fix}"
            )
    return spec


def _finite(value: Any) -> bool:
    """``value`` is a number (not a bool) that a float holds: no NaN, no inf, no integer beyond the float range."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def _check_number(name: str, key: str, value: Any, low: float | None, where: str) -> None:
    """``value`` is a finite number, above ``low`` when given (``sigma`` >= 0 needs 0 allowed: ``q`` does not)."""
    if not _finite(value) or (low is not None and (value < low or (key == "q" and value <= low))):
        bound = "" if low is None else (" > 0" if key == "q" else " >= 0")
        raise SpecError(f"{where}: parameter '{name}': {key} {value!r} is not a finite number{bound}; fix it")


def _check_probabilities(name: str, spec: Mapping[str, Any], where: str) -> None:
    """``probabilities`` gives each of ``values`` a non-negative weight, summing to 1."""
    probs = spec["probabilities"]
    ok = isinstance(probs, list) and len(probs) == len(spec.get("values") or [])
    ok = ok and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs)
    if not ok or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise SpecError(
            f"{where}: parameter '{name}': probabilities {probs!r} are not one weight in [0, 1] per value, "
            "summing to 1; fix them"
        )


def _check_range(name: str, low: Any, high: Any, positive: bool, where: str) -> None:
    """``min`` and ``max`` are finite numbers with ``min <= max`` (and ``min > 0`` where ``positive``: log scales)."""
    if not (_finite(low) and _finite(high) and math.isfinite(float(high) - float(low)) and low <= high):
        raise SpecError(
            f"{where}: parameter '{name}': min {low!r} and max {high!r} are not a range; give finite numbers, min <= max"
        )
    if positive and low <= 0:
        raise SpecError(f"{where}: parameter '{name}': a log scale needs min > 0, got {low!r}; raise min")


def _infer(spec: Mapping[str, Any]) -> str | None:
    """W&B's default distribution: constant for value, categorical for values, int or float uniform for min/max."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        return "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
    return None


def _choices(spec: Mapping[str, Any]) -> list[Any]:
    """A grid parameter's values: its ``values``, or its one ``value``."""
    return list(spec["values"]) if "values" in spec else [spec["value"]]


def _bounds(spec: Mapping[str, Any], method: str) -> list[Any]:
    """The values that bound a parameter's runs: a grid's values, a constant's value, every categorical value, an
    integer range's ends, and for the other distributions the draws of :func:`_probes`."""
    kind = spec["distribution"]
    if method == "grid":
        return _choices(spec)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return [spec["min"], spec["max"]]
    return _probes(spec)


_INSIDE = (3 - math.sqrt(5)) / 2
"""Where :func:`_probes` looks inside a range (0.382 of the way): the draw there is a whole number only by accident,
unlike the midpoint (5.0 between 1 and 9), so a float distribution on an integer field is caught."""


def _probes(spec: Mapping[str, Any]) -> list[float]:
    """Values that bound a float distribution's draws, as :func:`_drawn` makes them: a range's ends (a normal's
    ``mu``), then the draw at :data:`_INSIDE` (``mu + _INSIDE * sigma`` for a normal)."""
    ends = (0.0,) if spec["distribution"] in ("normal", "q_normal") else (0.0, 1.0)
    return [_drawn(spec, x) for x in (*ends, _INSIDE)]


def _drawn(spec: Mapping[str, Any], x: float) -> float:
    """The value a float distribution draws from ``x``, a standard normal deviate for the normal kinds and a
    fraction of the range (of its logarithm for the log kinds) for the others; rounded to ``q`` for the ``q_`` kinds.
    (``rng.uniform(a, b)`` is ``a + (b - a) * rng.random()``, ``rng.normal(m, s)`` ``m + s * rng.standard_normal()``.)
    """
    kind = spec["distribution"]
    if kind in ("normal", "q_normal"):
        value = float(spec.get("mu", 0.0)) + float(spec.get("sigma", 1.0)) * x
    elif kind == "log_uniform":  # min and max are exponents (natural log)
        low, high = float(spec["min"]), float(spec["max"])
        value = float(np.exp(low + (high - low) * x))
    elif kind in ("log_uniform_values", "q_log_uniform_values"):
        low, high = np.log(spec["min"]), np.log(spec["max"])
        value = float(np.exp(low + (high - low) * x))
    else:
        low, high = float(spec["min"]), float(spec["max"])
        value = low + (high - low) * x
    return _quantized(spec, value)


def _quantized(spec: Mapping[str, Any], value: float) -> float:
    """``value`` rounded to a multiple of ``q`` (default 1) for the ``q_`` distributions, else ``value`` (one too large
    for ``q`` comes back infinite: :func:`_parameter` refuses distributions that draw one)."""
    if not spec["distribution"].startswith("q_"):
        return value
    q = spec.get("q", 1.0)
    return round(value / q) * q if math.isfinite(value / q) else value / q


def _draw(spec: Mapping[str, Any], rng: np.random.Generator) -> Any:
    kind = spec["distribution"]
    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        values, probs = spec["values"], spec.get("probabilities")
        return values[int(rng.choice(len(values), p=probs))]
    if kind == "int_uniform":
        return int(rng.integers(spec["min"], spec["max"] + 1))
    return _drawn(spec, float(rng.standard_normal() if kind in ("normal", "q_normal") else rng.random()))


def run_command(command: list[str], env: dict[str, str], log: str) -> dict[str, Any]:
    """Run one sweep command with its output to ``log``; return its exit code, wall seconds and, when its output
    names one (``rlbd train`` prints it), its run directory."""
    start = time.monotonic()
    with open(log, "wb") as fh:
        code = subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    record: dict[str, Any] = {"returncode": code, "seconds": round(time.monotonic() - start, 3)}
    lines = Path(log).read_text(errors="replace").splitlines()
    run_dir = next((line for line in reversed(lines) if line and (Path(line) / "card.json").is_file()), None)
    if run_dir is not None:
        record["run_dir"] = str(Path(run_dir).resolve())
    return record


def run_sweep(
    path: str | Path | Sweep,
    out: str | Path,
    count: int | None = None,
    seed: int = 0,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``rlbd sweep``: run every point of a grid or random sweep as a subprocess, in the sweep's W&B group.

    :param path: the sweep file, or the :class:`Sweep` read from it.
    :param out: the folder for ``runs.jsonl`` and the runs' logs.
    :param count: at most this many runs (required for random sweeps without ``run_cap``).
    :param seed: seeds the random draws.
    :param workers: runs at a time.
    :param backend: ``local`` or ``ray``.
    :param ray_address: ``ray``: an existing cluster.
    :param on_run: called with each run's record as it finishes.
    :return: the records, in finishing order.
    """
    from rlbackdoor.bench.backends import check_backend, make_backend
    from rlbackdoor.bench.runner import append_line

    sweep = path if isinstance(path, Sweep) else Sweep(path)
    points = sweep.points(count, seed)
    check_backend(backend, workers, ray_address)
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_RUN_GROUP": sweep.name, "WANDB_TAGS": "sweep"}
    env.setdefault("WANDB_MODE", "offline")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    pool = make_backend(backend, max(1, min(workers, len(points))), ray_address)
    records = []
    try:
        running = {}
        for i, point in enumerate(points):
            command = sweep.command_for(point)
            handle = pool.submit(run_command, command, env, str(root / f"run-{i}.log"))
            running[handle] = {"index": i, "params": point, "command": shlex.join(command), "group": sweep.name}
        while running:
            done, _ = pool.wait(running)
            for handle in done:
                record = running.pop(handle)
                try:
                    record |= pool.result(handle)
                except Exception as err:
                    record |= {"returncode": None, "error": f"{type(err).__name__}: {err}"}
                append_line(root / "runs.jsonl", record)
                records.append(record)
                if on_run is not None:
                    on_run(record)
    finally:
        pool.close()
    return records
