"""``train``: one experiment from spec to run directory — env, model, poisoning, callbacks, W&B, checkpoints, artifacts."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from rlbackdoor import tracking
from rlbackdoor.defenses.filtering import FilterVecEnv, RolloutFilter, training_filter
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.evaluation.callback import EvalCallback
from rlbackdoor.specs import ExperimentSpec, parse
from rlbackdoor.training import presets
from rlbackdoor.training.artifacts import CARD, non_finite, versions, write_artifacts
from rlbackdoor.training.callbacks import PoisonCounter, PoisonRateLog, ProgressBar, TrackerOutput, poison_rate
from rlbackdoor.training.card_schema import describe_policy
from rlbackdoor.training.checkpoints import FOLDER, Checkpointer, counts_of, latest_checkpoint, restore
from rlbackdoor.training.envs import env_factory, make_train_env, preset_keys, run_attack
from rlbackdoor.training.outer import OuterLoopPoisoning
from rlbackdoor.training.selection import InnerValueSelection, uses_value_selection

LOG_EVERY = 1000
"""Steps between SB3 logger dumps (``train/...`` rows in W&B), rounded to whole rollouts."""


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """``runs/<name>/<timestamp>-<pid>`` (runs started in parallel never share one), suffixed when it exists."""
    stamp = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    candidate, n = root / name / stamp, 1
    while candidate.exists():
        candidate, n = root / name / f"{stamp}-{n}", n + 1
    return candidate


def _log_interval(model: BaseAlgorithm) -> int:
    if isinstance(model, OnPolicyAlgorithm):
        return max(1, LOG_EVERY // (model.n_steps * model.n_envs))
    return 4  # episodes, SB3's default for off-policy algorithms


def _train_summary(model: BaseAlgorithm, counter: PoisonCounter | None, clock: dict[str, float]) -> dict[str, Any]:
    returns = [float(info["r"]) for info in model.ep_info_buffer or []]
    lengths = [float(info["l"]) for info in model.ep_info_buffer or []]
    return {
        "steps": int(model.num_timesteps),
        "seconds": round(clock["seconds"], 3),
        "cpu_seconds": round(clock["cpu_seconds"], 3),
        "steps_per_s": round(model.num_timesteps / max(clock["seconds"], 1e-9), 1),
        "steps_per_cpu_s": round(model.num_timesteps / max(clock["cpu_seconds"], 1e-9), 1),
        "poison_rate": poison_rate(counter),
        "poison_counts": counts_of(counter),
        "ep_return_mean": float(np.mean(returns)) if returns else None,
        "ep_length_mean": float(np.mean(lengths)) if lengths else None,
    }


@contextmanager
def _run_directory(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` (and its missing parents) for the block; when the block fails before a checkpoint or the
    artifacts were written (nothing to resume or keep), remove what it created: ``run_dir``, then each parent it
    created that is still empty (a run started beside it in the meantime keeps its folders)."""
    created: list[Path] = []
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and not (run_dir / CARD).exists() and not any((run_dir / FOLDER).glob("*")):
            shutil.rmtree(run_dir, ignore_errors=True)
            for parent in created[1:]:
                try:
                    parent.rmdir()
                except OSError:  # not empty
                    break
        raise


def check_trainable(spec: ExperimentSpec) -> None:
    """Build the env and the model of ``spec`` and check its policy can be recorded, as :func:`train` does before
    it writes anything, and write nothing (e.g. one agent of a zoo, before the zoo starts)."""
    attack = run_attack(spec)
    hyperparams = presets.resolve(spec.algo, preset_keys(spec, attack), spec.hyperparams)
    venv, _ = make_train_env(spec, attack, spec.seed)
    try:
        describe_policy(presets.build_model(spec.algo, venv, hyperparams, spec.seed).policy)
    finally:
        venv.close()


def _check_finite(model: BaseAlgorithm) -> None:
    """Raise :class:`SpecError` when training diverged: the weights hold NaN or inf."""
    broken = non_finite(model.policy.state_dict())
    if broken:
        raise SpecError(
            f"training diverged: weights {broken} hold NaN or inf after {model.num_timesteps} steps; start a new run "
            "with a lower learning_rate, ent_coef or payload rewards"
        )


def train(
    spec: ExperimentSpec | Mapping[str, Any],
    out: Path | None = None,
    *,
    resume: Path | None = None,
    wandb_mode: str | None = None,
    wandb_project: str = "rlbackdoor",
    checkpoint_every: int = 10_000,
    progress: bool = False,
    callbacks: Sequence[BaseCallback] = (),
    wandb_group: str | None = None,
) -> Path:
    """Train the agent an experiment describes; return its run directory (``model.zip``, ``policy.safetensors``, ``card.json``).

    Everything is checked (env, attack, hyperparameters, that the policy can be rebuilt safely)
    before the run directory is created. A killed run leaves its last checkpoint; ``resume`` it to
    train the remaining steps.

    :param spec: the experiment (:func:`~rlbackdoor.specs.load_experiment` reads one from YAML), or its mapping.
    :param out: the run directory (must be empty or absent); default ``runs/<name>/<timestamp>-<pid>``.
    :param resume: an interrupted run directory of the same experiment to continue (``out`` is ignored).
    :param wandb_mode: ``online``, ``offline`` or ``disabled``; ``None``: see :mod:`rlbackdoor.tracking`.
    :param wandb_project: the W&B project.
    :param checkpoint_every: steps between checkpoints (0: none).
    :param progress: show a progress bar on stderr.
    :param callbacks: more SB3 callbacks, called after the project's own.
    :param wandb_group: the W&B group (default: the experiment's name; a zoo groups its agents under its own).
    """
    spec = spec if isinstance(spec, ExperimentSpec) else parse(ExperimentSpec, spec, "experiment")
    torch.set_num_threads(1)
    config = spec.model_dump(mode="json")
    state: dict[str, Any] = {}
    folder: Path | None = None
    if resume is not None:
        run_dir = Path(resume)
        folder, state = latest_checkpoint(run_dir, config)
    else:
        run_dir = Path(out) if out is not None else default_run_dir(spec.name)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            if (run_dir / CARD).exists():
                raise ArtifactError(f"{run_dir}: a finished run is there; choose another --out")
            raise ArtifactError(f"{run_dir}: already exists and is not empty; choose another --out, or --resume it")
    start = int(state.get("model", {}).get("num_timesteps", 0))
    # a resumed run draws new env and attack randomness: replaying step 0's draws would repeat episodes
    seed = spec.seed if start == 0 else int(np.random.SeedSequence([spec.seed, start]).generate_state(1)[0])

    attack = run_attack(spec)
    hyperparams = presets.resolve(spec.algo, preset_keys(spec, attack), spec.hyperparams)
    venv, backdoor = make_train_env(spec, attack, seed)
    filt = training_filter(spec.sanitize, env_factory(spec, attack), seed) if spec.sanitize is not None else None
    defence: FilterVecEnv | RolloutFilter | None = None
    online: FilterVecEnv | None = None
    on_policy = issubclass(presets.ALGOS[spec.algo], OnPolicyAlgorithm)
    if filt is not None and spec.poisoning != "outer":  # the agent acts on repaired observations
        venv = defence = online = FilterVecEnv(venv, filt, rewards=not on_policy)
    model = presets.build_model(spec.algo, venv, hyperparams, seed)
    policy = describe_policy(model.policy)
    own: list[BaseCallback] = []
    counter: PoisonCounter | None = backdoor.attack if backdoor is not None else None
    if spec.poisoning == "outer" and attack is not None:
        poisoner = OuterLoopPoisoning(attack, spec.outer_reward, seed)
        poisoner.init_callback(model)  # checks the attack against the model before anything is written
        own.append(poisoner)
        counter = poisoner
        if filt is not None:
            compensated = spec.outer_reward == "dynamic"
            defence = RolloutFilter(filt, lambda: poisoner.last_poisoned, compensated, spec.sanitize.mode)
            own.append(defence)
    elif filt is not None and on_policy:
        defence = RolloutFilter(filt, mode=spec.sanitize.mode, online=online)
        own.append(defence)
    if backdoor is not None and attack is not None and uses_value_selection(attack, venv.action_space):
        own.append(InnerValueSelection(backdoor))
    if folder is not None:
        restore(model, folder, state, counter)

    before = {key: float(state.get(key, 0.0)) for key in ("seconds", "cpu_seconds")}
    t0 = c0 = 0.0
    resumed_at = [*state.get("resumed_at", []), start] if start else []

    def checkpoint_state() -> dict[str, Any]:
        return {"config": config, "poison": counts_of(counter), **clock(), "resumed_at": resumed_at}

    def clock() -> dict[str, float]:
        """Wall and CPU seconds of training, over every session of the run."""
        return {
            "seconds": before["seconds"] + time.monotonic() - t0,
            "cpu_seconds": before["cpu_seconds"] + time.process_time() - c0,
        }

    attack_json = attack.model_dump(mode="json") if attack is not None and spec.poisoning else None
    resolved = {**config, "attack": attack_json, "hyperparams": hyperparams}
    # a zoo's agent is named after its folder already (zoo-0-clean in zoo/agents/0-clean)
    run_name = spec.name if spec.name.endswith(f"-{run_dir.name}") else f"{spec.name}-{run_dir.name}"
    with (
        _run_directory(run_dir),
        tracking.wandb_run(
            "train",
            run_name,
            resolved,
            mode=wandb_mode,
            project=wandb_project,
            group=wandb_group or spec.name,
        ) as tracker,
    ):
        model.set_logger(Logger(folder=None, output_formats=[TrackerOutput(tracker)]))
        checkpointer = Checkpointer(run_dir, checkpoint_every, checkpoint_state)
        own.append(checkpointer)
        if counter is not None:
            own.append(PoisonRateLog(counter))
        evaluator = None
        if spec.eval_every:
            evaluator = EvalCallback(attack or spec.env, spec.eval_every, seed=spec.seed, tracker=tracker)
            own.append(evaluator)
        if progress:
            own.append(ProgressBar(spec.timesteps, counter))
        t0, c0 = time.monotonic(), time.process_time()
        try:
            model.learn(
                total_timesteps=max(0, spec.timesteps - start),
                callback=CallbackList([*own, *callbacks]),
                log_interval=_log_interval(model),
                reset_num_timesteps=start == 0,
            )
        except ValueError:  # torch's distributions refuse NaN parameters: tell divergence from other failures
            _check_finite(model)
            raise
        except KeyboardInterrupt:
            kept = checkpointer.saved if checkpointer.saved is not None else (start if folder is not None else None)
            if kept is not None:
                what = f"continue from step {kept} with --resume {run_dir}"
            else:
                what = "no checkpoint yet" if checkpoint_every else "checkpoints were off: nothing is kept"
            print(f"interrupted at step {model.num_timesteps}; {what}", file=sys.stderr)
            raise
        _check_finite(model)  # DQN's argmax plays on with NaN weights
        summary = _train_summary(model, counter, clock())
        if defence is not None:
            summary |= {f"sanitize_{key}": value for key, value in defence.stats().items()}
        card = {
            "name": spec.name,
            "algo": spec.algo,
            "env": spec.env,
            "attack": resolved["attack"],
            "poisoning": spec.poisoning,
            "outer_reward": spec.outer_reward if spec.poisoning == "outer" else None,
            "seed": spec.seed,
            "timesteps": spec.timesteps,
            "n_envs": spec.n_envs,
            "hyperparams": hyperparams,
            "policy": policy,
            "versions": versions(),
            "train": {**summary, "resumed_at": resumed_at, "eval": evaluator.history if evaluator else []},
            "metrics": {},
            "config": config,
        }
        write_artifacts(model, run_dir, card)
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        # the poison counts at the end, as the card has them (the last periodic log may be a rollout older)
        final = tracking.prefixed("train", {**scalars, **summary["poison_counts"]})
        tracker.log(final, step=model.num_timesteps)
        tracker.summary(final)
        tracker.log_artifact(run_dir / CARD, name=f"{spec.name}-card", type="card")
    venv.close()
    shutil.rmtree(run_dir / FOLDER, ignore_errors=True)
    return run_dir
