"""``rlbd sanitize``: run-time sanitization of a run (ASR and CTP before and after), or offline filtering
of a trajectory dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import typer
from rich.console import Console
from rich.table import Table

from rlbackdoor.cli.checks import check_file_out, check_single_agent, check_single_agent_runs, write_json_out
from rlbackdoor.cli.train import WANDB_MODE_HELP, WandbMode
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import MAX_CLEAN, MAX_EPISODES, MAX_SEED_COUNT, SanitizeSpec, parse

if TYPE_CHECKING:
    import numpy as np

console = Console()


def _ci(m: dict[str, Any], key: str) -> str:
    value = m.get(key)
    if value is None:
        return "-"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{value:.3g}" + (f" [{low:.3g}, {high:.3g}]" if low is not None and high is not None else "")


EPISODES, SEEDS, N_CLEAN = 10, 3, 200
"""A run's sanitization when not given: evaluation episodes per seed, seeds, clean observations (a dataset's filter
takes :class:`~rlbackdoor.specs.SanitizeSpec`'s defaults instead)."""

FilterMode = Enum(  # type: ignore[misc]
    "FilterMode", [(m, m) for m in get_args(SanitizeSpec.model_fields["mode"].annotation)], type=str
)
"""The choices of ``--mode``: what :class:`~rlbackdoor.specs.SanitizeSpec` does with flagged transitions."""


def sanitize(
    run_dir: Path | None = typer.Argument(None, help="a run directory (card.json, policy.safetensors)"),
    method: str = typer.Option("support", "--method", "-m", help="sanitizer: see --list"),
    n_clean: int | None = typer.Option(
        None,
        "--n-clean",
        max=MAX_CLEAN,
        help=f"clean observations to fit on: a run's own rollouts \\[default: {N_CLEAN}], or with --trajectories "
        f"random-policy steps \\[default: {SanitizeSpec.model_fields['n_clean'].default}, as in training]",
    ),
    dim: int | None = typer.Option(None, "--dim", min=1, help="subspace dimension (default: the clean data's rank)"),
    baseline: Path | None = typer.Option(None, "--baseline", help="a clean run of the same config, for ctp_ratio"),
    episodes: int | None = typer.Option(
        None, "--episodes", min=1, max=MAX_EPISODES, help=f"evaluation episodes per seed \\[default: {EPISODES}]"
    ),
    seeds: int | None = typer.Option(
        None, "--seeds", min=1, max=MAX_SEED_COUNT, help=f"evaluation seeds \\[default: {SEEDS}]"
    ),
    curve: str | None = typer.Option(None, "--curve", help="comma-separated other n values to report (e.g. 8,16,32)"),
    trajectories: Path | None = typer.Option(None, "--trajectories", help="filter this .npz dataset instead"),
    out: Path | None = typer.Option(None, "--out", help="with --trajectories: where to write the filtered dataset"),
    mode: FilterMode | None = typer.Option(
        None, "--mode", help="with --trajectories: drop or repair flagged transitions \\[default: drop]"
    ),
    margin: float | None = typer.Option(
        None,
        "--margin",
        min=1.0,
        help="with --trajectories: widen the flagging threshold \\[default: 5, as in training]",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the results as JSON"),
    wandb_mode: WandbMode | None = typer.Option(None, "--wandb-mode", help=WANDB_MODE_HELP),
    list_methods: bool = typer.Option(False, "--list", help="print the methods and exit"),
) -> None:
    """Sanitize a backdoored agent at run time and report ASR/CTP before and after (with CIs and the
    curve against n), or filter poisoned transitions out of a trajectory dataset."""
    from rlbackdoor.defenses.sanitize import METHODS

    if list_methods:
        table = Table("method", "what it does")
        for name, what in METHODS.items():
            table.add_row(name, what)
        console.print(table)
        return
    check_file_out(json_out, "--json")
    check_file_out(out, "--out")
    if trajectories is not None:
        run_options = {"RUN_DIR": run_dir, "--baseline": baseline, "--episodes": episodes, "--seeds": seeds}
        run_options["--curve"] = curve
        for option, value in run_options.items():
            if value is not None:
                raise SpecError(f"sanitize: {option} applies to a run, not to --trajectories; drop one of them")
        results = _filter_dataset(
            trajectories,
            method,
            n_clean,
            dim,
            out,
            mode.value if mode else "drop",
            margin,
            wandb_mode.value if wandb_mode else None,
        )
    elif run_dir is not None:
        for option, value in (("--mode", mode), ("--out", out), ("--margin", margin)):
            if value is not None:
                raise SpecError(
                    f"sanitize: {option} applies to --trajectories only; drop {option} or give --trajectories FILE"
                )
        check_single_agent_runs(run_dir, "sanitize")
        sizes = _curve(curve or "")
        results = _sanitize_run(
            run_dir,
            method,
            N_CLEAN if n_clean is None else n_clean,
            dim,
            baseline,
            episodes or EPISODES,
            seeds or SEEDS,
            sizes,
            wandb_mode.value if wandb_mode else None,
        )
    else:
        raise SpecError("sanitize: give a RUN_DIR, or --trajectories FILE, or --list")
    write_json_out(json_out, results)


def _curve(curve: str) -> list[int]:
    """The values of n in ``--curve`` (comma-separated, each in ``1..MAX_CLEAN``)."""
    values = [v.strip() for v in curve.split(",") if v.strip()]
    if not all(v.isdigit() and len(v) <= len(str(MAX_CLEAN)) and 0 < int(v) <= MAX_CLEAN for v in values):
        raise SpecError(
            f"sanitize: --curve '{curve}' is not a comma-separated list of integers in 1..{MAX_CLEAN}; e.g. 8,16,32"
        )
    return [int(v) for v in values]


def _sanitize_run(
    run_dir: Path,
    method: str,
    n_clean: int,
    dim: int | None,
    baseline: Path | None,
    episodes: int,
    seeds: int,
    sizes: list[int],
    wandb_mode: str | None,
) -> dict[str, Any]:
    from rlbackdoor import tracking
    from rlbackdoor.defenses.sanitize import sanitize_run
    from rlbackdoor.training.artifacts import CARD, read_card

    results = sanitize_run(run_dir, method, n_clean, dim, baseline, episodes, seeds, sizes)
    table = Table("", "ASR", "CTP", "ctp_ratio", title=f"{run_dir}: {method} sanitizer, n={n_clean}")
    for when in ("before", "after"):
        table.add_row(when, *(_ci(results, f"{k}_{when}") for k in ("asr", "ctp", "ctp_ratio")))
    console.print(table)
    if len(results["curve"]) > 1:
        points = Table("n_clean", "ASR after", "CTP after", title="against n")
        for p in results["curve"]:
            points.add_row(str(p["n_clean"]), _ci(p, "asr_after"), _ci(p, "ctp_after"))
        console.print(points)
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    card = read_card(run_dir)  # checked by sanitize_run
    name = str(card.get("name", Path(run_dir).name))
    settings = {"run_dir": str(run_dir), "method": method, "n_clean": n_clean, "dim": dim, "baseline": str(baseline)}
    config = tracking.run_config(card, "sanitizer", settings)  # "sanitize" is the training-time sanitizer's field
    run_name = f"{name}-sanitize-{method}-{Path(run_dir).name}"
    with tracking.wandb_run("sanitize", run_name, config, mode=wandb_mode, group=name) as tracker:
        tracker.summary(tracking.prefixed("sanitize", scalars))
        columns = ["n_clean", "asr_after", "ctp_after"]
        tracker.log_table("sanitize/curve", columns, [[p.get(c) for c in columns] for p in results["curve"]])
        tracker.log_artifact(Path(run_dir) / CARD, name=f"{name}-card", type="card")
    return results


def _check_actions(path: Path, actions: np.ndarray, env: str, n_actions: int) -> None:
    """Every action of a dataset of a Discrete(``n_actions``) env is one of its actions."""
    import numpy as np

    if actions.ndim != 1:
        raise SpecError(
            f"{path}: actions of shape {actions.shape[1:]} do not come from {env} (Discrete({n_actions})); "
            "filter trajectories of that env"
        )
    outside = np.flatnonzero(~np.isin(actions, np.arange(n_actions)))
    if outside.size:
        i = int(outside[0])
        raise SpecError(
            f"{path}: action {actions[i]} of transition {i} is not in {env}'s Discrete({n_actions}); "
            "drop or repair those transitions"
        )


def _filter_dataset(
    path: Path,
    method: str,
    n_clean: int | None,
    dim: int | None,
    out: Path | None,
    mode: str,
    margin: float | None,
    wandb_mode: str | None,
) -> dict[str, Any]:
    from rlbackdoor import tracking
    from rlbackdoor.attack import make_base_env
    from rlbackdoor.defenses.filtering import n_discrete_actions, training_filter
    from rlbackdoor.evaluation.envs import run_env
    from rlbackdoor.trajectories import Trajectories

    data = Trajectories.load(path)
    if not data.env:
        raise SpecError(f"{path}: the dataset does not name its env; save it with env=<id>")
    check_single_agent(data.env, str(path), "sanitize", "filter steps of a single-agent env")
    clean_env = run_env(data.env)
    probe = clean_env.make()
    if probe.observation_space.shape != data.observations.shape[1:]:
        raise SpecError(
            f"{path}: observations of shape {data.observations.shape[1:]} do not come from {data.env} "
            f"(shape {probe.observation_space.shape}); filter trajectories of that env"
        )
    n_actions = n_discrete_actions(probe.action_space)
    if n_actions is not None:
        _check_actions(path, data.actions, data.env, n_actions)
    given = {"n_clean": n_clean, "margin": margin}
    fields = {"method": method, "mode": mode} | {k: v for k, v in given.items() if v is not None}
    spec = parse(SanitizeSpec, fields, "sanitize --trajectories")  # a run's sanitize: block, its defaults
    filt = training_filter(spec, lambda: probe if clean_env.attack is None else make_base_env(clean_env.attack), 0, dim)
    kept, report = filt.filter(data, mode)
    target = out or path.with_name(path.stem + ".sanitized.npz")
    kept.save(target)
    results = {"trajectories": str(path), "out": str(target), "method": method, "mode": mode, "n_clean": spec.n_clean}
    results |= {"margin": spec.margin, "dim": dim}
    results |= report.as_dict()
    precision, recall = ("n/a" if value is None else f"{value:.3f}" for value in (report.precision, report.recall))
    console.print(
        f"{path}: flagged {report.flagged} of {report.n} transitions (precision {precision}, "
        f"recall {recall} against the recorded poisoned flags); wrote {len(kept)} to {target}"
    )
    scalars = {k: v for k, v in report.as_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    settings = {k: v for k, v in results.items() if k in ("trajectories", "out", "method", "mode", "n_clean", "margin")}
    with tracking.wandb_run(
        "sanitize", f"{target.stem}-filter", {"sanitizer": settings}, mode=wandb_mode, group=data.env
    ) as tracker:
        tracker.summary(tracking.prefixed("sanitize", scalars))
    return results
