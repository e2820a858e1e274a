"""The detector registry and :func:`detect`: run one detector over a run directory or a zoo.

For every agent, the policy is rebuilt with :func:`rlbackdoor.load_policy` (safetensors + card, never
unpickling) and the detector is fitted on clean observations: the agent's own deterministic rollouts
on its clean env for a single run; for a zoo, one pool of every agent's rollouts (each agent is
probed on the same clean states, all from the family's clean env). Input-level detectors score
held-out clean observations and, for a backdoored agent with an observation trigger, triggered copies
of some of them (a fifth of the set).

Over a zoo, model-level scores give AUROC, ROC points and the cross-entropy of the detector's fixed,
label-free probabilities (TrojAI's metric). Detectors with a behaviour *profile* (responses to the same
candidate triggers) are also compared with the population: an agent's population score is its mean
robust z-score (``|r - median| / max(1.4826 MAD, 0.05)`` per candidate) against the zoo, and its
probability the logistic of the robust z-score of that score within the zoo. No labels are used.
"""

from __future__ import annotations

import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import log_loss, precision_recall_fscore_support, roc_auc_score, roc_curve

from rlbackdoor.defenses.base import Detector
from rlbackdoor.defenses.neurons import ActivationBands, ActivationClustering, NeuronStimulation, SpectralSignature
from rlbackdoor.defenses.probing import BlackBoxProbe, ReverseTrigger
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.trajectories import Trajectories

DETECTORS: dict[str, type[Detector]] = {
    d.name: d
    for d in (
        ReverseTrigger,
        BlackBoxProbe,
        NeuronStimulation,
        ActivationBands,
        ActivationClustering,
        SpectralSignature,
    )
}
"""Every detector by name."""

POISONED_SHARE = 0.2
"""Share of triggered steps in the input-level evaluation set of a backdoored agent."""
MAD_FLOOR = 0.05
"""Smallest spread of a candidate's response across the population (shares of states)."""


def get_detector(name: str, **params: Any) -> Detector:
    """A new detector by registry name, with its constructor parameters (checked against its signature)."""
    if name not in DETECTORS:
        raise SpecError(f"unknown detector '{name}'; use one of {', '.join(DETECTORS)} (rlbd detect --list)")
    _check_params(name, params)
    return DETECTORS[name](**params)


def _check_params(name: str, params: dict[str, Any]) -> None:
    """Each parameter is one of the detector's constructor's, with a value of its annotated type: a positive
    integer for an ``int`` (``seed`` non-negative), a finite non-negative number for a ``float``, or ``None`` where allowed (other
    annotations are not checked here)."""
    hints = typing.get_type_hints(DETECTORS[name].__init__)
    hints.pop("return", None)
    for key, value in params.items():
        if key not in hints:
            raise SpecError(f"detector '{name}': bad parameters (unknown '{key}'); use {', '.join(hints)}")
        types = typing.get_args(hints[key]) or (hints[key],)
        if value is None and type(None) in types:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if int in types:
            low = 0 if key == "seed" else 1  # detect passes its own seed
            ok, want = number and isinstance(value, int) and value >= low, f"an integer >= {low}"
        elif float in types:
            ok, want = number and 0 <= value < math.inf, "a finite number >= 0"
        else:
            continue
        if not ok:
            raise SpecError(f"detector '{name}': bad parameters ({key}={value!r}); give {key} {want}")


@dataclass
class ModelResult:
    """One agent: model-level score and probability, population score, input-level metrics, CPU seconds."""

    path: str
    backdoored: bool | None
    score: float | None
    probability: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None
    population_score: float | None = None
    population_probability: float | None = None
    profile: tuple[list[str], np.ndarray] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (without the profile)."""
        return {
            "path": self.path,
            "backdoored": self.backdoored,
            "score": self.score,
            "probability": self.probability,
            "population_score": self.population_score,
            "population_probability": self.population_probability,
            "seconds": self.seconds,
            "details": self.details,
            "inputs": self.inputs,
        }


@dataclass
class DetectReport:
    """A detector over a target: per-model results and, for a zoo, model-level metrics."""

    detector: str
    target: str
    models: list[ModelResult]
    zoo: bool = False
    metrics: dict[str, Any] | None = None
    population: dict[str, Any] | None = None
    input_summary: dict[str, float | int] | None = None
    note: str = ""

    @property
    def auroc(self) -> float | None:
        return (self.metrics or {}).get("auroc")

    @property
    def cross_entropy(self) -> float | None:
        return (self.metrics or {}).get("cross_entropy")

    def to_json(self) -> dict[str, Any]:
        """``detector``, ``access``, ``models`` ({path, score, backdoored, ...}) and, for a zoo, ``auroc``,
        ``cross_entropy``, ``roc`` and the ``population`` comparison."""
        cls = DETECTORS[self.detector]
        return {
            "detector": self.detector,
            "access": [a.value for a in cls.access],
            "levels": list(cls.levels),
            "target": self.target,
            "zoo": self.zoo,
            "models": [m.to_json() for m in self.models],
            "auroc": self.auroc,
            "cross_entropy": self.cross_entropy,
            "roc": (self.metrics or {}).get("roc"),
            "population": self.population,
            "inputs": self.input_summary,
            "seconds_per_model": float(np.mean([m.seconds for m in self.models])),
            "note": self.note,
        }


# ---------------------------------------------------------------------------------------------- agents
def clean_observations(policy: Any, card: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """Up to ``n`` observations of the agent's own deterministic rollouts on its clean env."""
    from rlbackdoor.evaluation.envs import run_env
    from rlbackdoor.evaluation.rollouts import episode_seeds, rollout

    make = run_env(card).make
    chunks, total, batch = [], 0, 0
    while total < n and batch < 16:
        obs = rollout(policy, make, episode_seeds([seed, batch], 16)).obs
        chunks.append(obs)
        total += len(obs)
        batch += 1
    obs = np.concatenate(chunks)
    rng = np.random.default_rng(seed)
    return obs[np.sort(rng.choice(len(obs), size=min(n, len(obs)), replace=False))]


def _trigger(card: dict[str, Any]) -> Any:
    """The observation trigger of a run's attack (``None`` for clean runs and action-sequence triggers)."""
    from rlbackdoor.attack import Attack
    from rlbackdoor.evaluation.envs import run_env

    env = run_env(card)
    if env.attack is None:
        return None
    return Attack.for_env(env.attack, env.make()).obs_trigger


def evaluation_steps(held_out: np.ndarray, trigger: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out clean observations plus, with a trigger, triggered copies of some (:data:`POISONED_SHARE` of the
    set); returns the observations and which are triggered."""
    if trigger is None:
        return held_out, np.zeros(len(held_out), bool)
    n_trig = max(1, round(POISONED_SHARE * len(held_out) / (1 - POISONED_SHARE)))
    rows = np.random.default_rng(seed).choice(len(held_out), size=n_trig, replace=len(held_out) < n_trig)
    obs = np.concatenate([held_out, trigger.apply(held_out[rows]).astype(held_out.dtype)])
    return obs, np.r_[np.zeros(len(held_out), bool), np.ones(n_trig, bool)]


def input_metrics(detector: Detector, obs: np.ndarray, triggered: np.ndarray) -> dict[str, Any]:
    """Per-input scores and flags of ``obs``; AUROC, precision, recall and F1 when both kinds of steps are there."""
    threshold = detector.input_threshold()
    scores = detector.score_inputs(obs)
    flags = scores > threshold
    out: dict[str, Any] = {
        "n_clean": int((~triggered).sum()),
        "n_triggered": int(triggered.sum()),
        "threshold": float(threshold),
        "false_positive_rate": float(flags[~triggered].mean()) if (~triggered).any() else None,
    }
    if triggered.any() and (~triggered).any():
        precision, recall, f1, _ = precision_recall_fscore_support(triggered, flags, average="binary", zero_division=0)
        out.update(auroc=float(roc_auc_score(triggered, scores)), precision=float(precision), recall=float(recall))
        out["f1"] = float(f1)
    out.update(scores=np.round(scores, 4).tolist(), triggered=triggered.tolist())
    return out


def analyse(
    detector: Detector,
    run_dir: Path,
    backdoored: bool | None,
    n_clean: int = 1024,
    seed: int = 0,
    clean: np.ndarray | None = None,
    steps: Trajectories | None = None,
) -> ModelResult:
    """Fit and score ``detector`` on one run directory.

    :param backdoored: the label if known (a zoo's manifest); input-level evaluation of a run with an
        attack stamps its trigger unless the label says clean.
    :param clean: clean observations; default the agent's own rollouts (``n_clean``, twice as many
        for input-level detectors, which hold half out).
    :param steps: steps to score instead of the held-out set (e.g. trajectories of a possibly poisoned
        env), with their ``triggered`` flags as the truth.
    """
    from rlbackdoor.training.artifacts import load_policy

    start = time.process_time()
    policy, card = load_policy(run_dir)
    input_level = "input" in detector.levels
    if clean is None:
        clean = clean_observations(policy, card, 2 * n_clean if input_level else n_clean, seed)
    order = np.random.default_rng(seed).permutation(len(clean))
    fit_rows = order[: len(order) // 2] if input_level else order
    detector.fit(policy, clean[np.sort(fit_rows)])
    score = probability = None
    if "model" in detector.levels:
        score = detector.score_model()
        probability = detector.probability(score)
    inputs = None
    if input_level and steps is not None:
        inputs = input_metrics(detector, steps.observations, steps.triggered)
    elif input_level:
        held_out = clean[np.sort(order[len(order) // 2 :])]
        trigger = _trigger(card) if backdoored is not False else None
        inputs = input_metrics(detector, *evaluation_steps(held_out, trigger, seed))
    profile = detector.profile()
    seconds = round(time.process_time() - start, 3)
    return ModelResult(
        str(run_dir), backdoored, score, probability, seconds, detector.details(), inputs, profile=profile
    )


# ------------------------------------------------------------------------------------------------ zoo
def _targets(target: Path) -> tuple[list[tuple[Path, bool | None]], bool]:
    from rlbackdoor.training.artifacts import CARD
    from rlbackdoor.zoo import MANIFEST, read_manifest

    if (target / MANIFEST).is_file():
        return [(a.path, a.backdoored) for a in read_manifest(target)], True
    if (target / CARD).is_file():
        return [(target, None)], False
    if target.name in (MANIFEST, CARD) and target.is_file():
        raise ArtifactError(f"{target}: a file; pass its folder {target.parent}")
    raise ArtifactError(f"{target}: neither a run directory (card.json) nor a zoo (manifest.json); pass one of them")


def _check_steps(path: str | Path, steps: Trajectories, run: Path, card: dict[str, Any]) -> None:
    """Steps to score come from the run's clean env (when the file names its env) and have its observations."""
    from rlbackdoor.evaluation.envs import run_env
    from rlbackdoor.evaluation.evaluate import clean_env_id
    from rlbackdoor.training.artifacts import CARD, check_card_code
    from rlbackdoor.training.card_schema import card_entry

    check_card_code(run / CARD, card)  # before making the run's env: a hostile card may name any module
    card_entry(run / CARD, card, "env", str)
    ours = clean_env_id(card)
    if steps.env and clean_env_id({"env": steps.env}) != ours:
        raise SpecError(f"--inputs {path}: steps of {steps.env}, but {run} is a run of {ours}; record steps of {ours}")
    env = run_env(card, run / CARD).make()
    shape = env.observation_space.shape
    env.close()
    if steps.observations.shape[1:] != shape:
        raise SpecError(
            f"--inputs {path}: observations of shape {steps.observations.shape[1:]}, but {run} observes {shape}; "
            f"record steps of {ours}"
        )


def _check_family(cards: list[tuple[Path, dict[str, Any]]]) -> None:
    """Every card describes its policy and names its env, and the policies act in one env family."""
    from rlbackdoor.evaluation.envs import run_env
    from rlbackdoor.training.card_schema import CARD, card_entry

    for path, card in cards:
        card_entry(path / CARD, card, "policy", dict)
        run_env(card, path / CARD)
    first_path, first = cards[0]
    for path, card in cards[1:]:
        for key in ("observation_space", "action_space"):
            if card["policy"].get(key) != first["policy"].get(key):
                what = key.replace("_", " ")
                raise ArtifactError(
                    f"{path}: its {what} differs from {first_path}'s; a zoo holds agents of one env family"
                )


def zoo_metrics(labels: np.ndarray, scores: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Model-level AUROC, ROC points and cross-entropy; AUROC is ``None`` (with a note) for a one-class zoo."""
    out: dict[str, Any] = {
        "cross_entropy": float(log_loss(labels, np.clip(probs, 1e-6, 1 - 1e-6), labels=[False, True]))
    }
    if labels.all() or not labels.any():
        only = "backdoored" if labels.all() else "clean"
        return {**out, "auroc": None, "roc": None, "note": f"AUROC undefined: every agent is {only}"}
    fpr, tpr, thresholds = roc_curve(labels, scores)
    roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": np.nan_to_num(thresholds, posinf=1e300).tolist()}
    return {**out, "auroc": float(roc_auc_score(labels, scores)), "roc": roc, "note": ""}


def robust_z(values: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """``(x - median) / max(1.4826 MAD, floor)`` along the first axis (a tiny floor avoids division by zero)."""
    median = np.median(values, axis=0)
    mad = 1.4826 * np.median(np.abs(values - median), axis=0)
    return (values - median) / np.maximum(mad, max(floor, 1e-12))


def population_scores(profiles: list[tuple[list[str], np.ndarray]]) -> np.ndarray:
    """Each agent's mean robust z-score of its candidate responses against the population (aligned by key)."""
    keys = set(profiles[0][0]).intersection(*(set(k) for k, _ in profiles[1:]))
    if not keys:
        raise ArtifactError("the agents' probes share no candidate; a zoo holds agents of one env family")
    order = sorted(keys)
    rows = []
    for k, v in profiles:
        lookup = dict(zip(k, v, strict=True))
        rows.append([lookup[c] for c in order])
    table = np.array(rows, dtype=np.float64)
    return np.abs(robust_z(table, MAD_FLOOR)).mean(axis=1)


def _pooled(agents: list[tuple[Path, bool | None]], n: int, seed: int) -> tuple[np.ndarray, list[float]]:
    """``n`` clean observations pooled from every agent's own rollouts, and each agent's CPU seconds for them."""
    from rlbackdoor.training.artifacts import load_policy

    per_agent = max(64, -(-2 * n // len(agents)))
    chunks, seconds = [], []
    for path, _ in agents:
        start = time.process_time()
        policy, card = load_policy(path)
        chunks.append(clean_observations(policy, card, per_agent, seed))
        seconds.append(time.process_time() - start)
    pool = np.concatenate(chunks)
    rng = np.random.default_rng(seed)
    return pool[np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))], seconds


def detect(
    target: str | Path,
    name: str,
    params: dict[str, Any] | None = None,
    n_clean: int = 1024,
    seed: int = 0,
    inputs: str | Path | None = None,
    on_model: Any = None,
) -> DetectReport:
    """Run detector ``name`` on a run directory or on every agent of a zoo.

    :param target: a run directory (``card.json``) or a zoo directory (``manifest.json``).
    :param name: a key of :data:`DETECTORS`.
    :param params: the detector's constructor parameters.
    :param n_clean: clean observations the detector is fitted on (input-level detectors hold out as many).
    :param seed: seeds rollouts, subsets and the detector.
    :param inputs: a trajectory file (:class:`rlbackdoor.trajectories.Trajectories`) whose steps an
        input-level detector scores, for a run directory.
    :param on_model: called with each :class:`ModelResult` as it is ready (progress).
    """
    import torch

    from rlbackdoor.training.artifacts import read_card

    torch.set_num_threads(1)  # CPU-seconds per model are measured on one thread, as training runs
    target = Path(target)
    params = params or {}
    if "seed" in params:
        raise SpecError(f"detector '{name}': seed is set by detect's own seed (rlbd detect --seed), not a parameter")
    cls = DETECTORS[get_detector(name, **params).name]  # unknown names and bad parameters fail first
    agents, is_zoo = _targets(target)
    if inputs is not None and "input" not in cls.levels:
        inputs_level = ", ".join(n for n, c in DETECTORS.items() if "input" in c.levels)
        raise SpecError(f"--inputs: '{name}' scores models, not inputs; drop --inputs or use one of {inputs_level}")
    if inputs is not None and is_zoo:
        raise SpecError("--inputs gives the steps an input-level detector scores for one run; pass a run directory")
    cards = [(path, read_card(path)) for path, _ in agents]
    steps = None if inputs is None else Trajectories.load(inputs)
    if steps is not None:
        _check_steps(inputs, steps, *cards[0])
    _check_family(cards)
    size = 2 * n_clean if "input" in cls.levels else n_clean
    shared, collect_seconds = _pooled(agents, size, seed) if is_zoo else (None, [0.0])
    results = []
    for (path, backdoored), extra in zip(agents, collect_seconds if is_zoo else [0.0], strict=True):
        result = analyse(get_detector(name, seed=seed, **params), path, backdoored, n_clean, seed, shared, steps)
        result.seconds = round(result.seconds + extra, 3)
        results.append(result)
        if on_model is not None:
            on_model(result)
    report = DetectReport(name, str(target), results, zoo=is_zoo)
    labels = np.array([bool(r.backdoored) for r in results])
    if is_zoo and "model" in cls.levels:
        scores = np.array([r.score for r in results], dtype=np.float64)
        probs = np.array([r.probability for r in results], dtype=np.float64)
        report.metrics = zoo_metrics(labels, scores, probs)
        report.note = report.metrics["note"]
    if is_zoo and len(results) >= 3 and all(r.profile is not None for r in results):
        pop = population_scores([r.profile for r in results])
        probs = 1.0 / (1.0 + np.exp(-np.clip(robust_z(pop), -500, 500)))
        for r, s, p in zip(results, pop, probs, strict=True):
            r.population_score, r.population_probability = float(s), float(p)
        report.population = zoo_metrics(labels, pop, probs)
    if "input" in cls.levels:
        report.input_summary = _input_summary(results)
        if is_zoo and "model" not in cls.levels:
            report.note = "input-level detector: no model-level AUROC; see the input metrics"
    return report


def _input_summary(results: list[ModelResult]) -> dict[str, float | int] | None:
    rows = [r.inputs for r in results if r.inputs and "auroc" in r.inputs]
    if not rows:
        return None
    means = {k: float(np.mean([row[k] for row in rows])) for k in ("auroc", "precision", "recall", "f1")}
    return {**means, "models": len(rows)}


# -------------------------------------------------------------------------------------------- reports
def roc_image(curves: dict[str, dict[str, list[float]]], path: Path, size: int = 360) -> Path:
    """Draw ROC curves (``label -> {"fpr", "tpr"}``) with the chance diagonal into a PNG at ``path``."""
    from PIL import Image, ImageDraw

    margin = 40
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    side = size - 2 * margin

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * side, size - margin - tpr * side

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill="grey")
    for i, (label, roc) in enumerate(curves.items()):
        colour = ("#1f77b4", "#d62728", "#2ca02c")[i % 3]
        draw.line([xy(f, t) for f, t in zip(roc["fpr"], roc["tpr"], strict=True)], fill=colour, width=3)
        draw.text((margin + 6, margin + 6 + 14 * i), label, fill=colour)
    draw.text((size / 2 - 30, size - margin + 12), "false positive rate", fill="black")
    draw.text((4, margin - 20), "true positive rate", fill="black")
    image.save(path)
    return path


def log_report(report: DetectReport, config: dict[str, Any], mode: str | None = None) -> None:
    """Log a report to a W&B ``detect`` run: summary ``detect/...`` metrics, a per-model table, the ROC plot."""
    import tempfile

    from rlbackdoor import tracking

    summary: dict[str, Any] = {"seconds_per_model": float(np.mean([m.seconds for m in report.models]))}
    for prefix, metrics in (("", report.metrics), ("population_", report.population)):
        if metrics:
            summary[f"{prefix}auroc"] = metrics["auroc"]
            summary[f"{prefix}cross_entropy"] = metrics["cross_entropy"]
    for key, value in (report.input_summary or {}).items():
        summary[f"input_{key}"] = value
    name = f"detect-{report.detector}-{Path(report.target).name}"
    with tracking.wandb_run("detect", name, config, mode=mode) as tracker:
        tracker.summary(tracking.prefixed("detect", {k: v for k, v in summary.items() if v is not None}))
        columns = ["path", "backdoored", "score", "probability", "population_score", "seconds"]
        rows = [[getattr(m, c) for c in columns] for m in report.models]
        tracker.log_table("detect/models", columns, rows)
        curves = {
            f"{label} AUROC {metrics['auroc']:.3f}": metrics["roc"]
            for label, metrics in (("model", report.metrics), ("population", report.population))
            if metrics and metrics.get("roc")
        }
        if curves:
            with tempfile.TemporaryDirectory() as tmp:
                tracker.log_image("detect/roc", roc_image(curves, Path(tmp) / "roc.png"))
