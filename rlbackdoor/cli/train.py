"""``rlbd train CONFIG.yaml``: train one experiment (clean, inner- or outer-loop poisoned) into a run directory.

Overrides come as ``--set a.b=value`` (repeatable) or in any form ``wandb agent`` passes (``--a.b=value``,
``a.b=value``, ``--a.b value``), so a W&B sweep can run ``rlbd train CONFIG.yaml ${args}`` (or the
``${args_no_hyphens}`` / ``${args_no_equals}`` macros). Values are parsed as YAML.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Collection
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import typer

from rlbackdoor.errors import SpecError
from rlbackdoor.jsonfile import loads
from rlbackdoor.specs import ExperimentSpec, SanitizeSpec, load_experiment, locate, override_key

CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


WANDB_MODE_HELP = "W&B mode \\[default: WANDB_MODE, else online iff logged in]"
"""The help of every --wandb-mode (the backslash keeps rich from reading "[default: ...]" as a markup tag)."""


SanitizeMethod = Enum(  # type: ignore[misc]
    "SanitizeMethod", [(m, m) for m in get_args(SanitizeSpec.model_fields["method"].annotation)], type=str
)
"""The choices of ``--sanitize``: :class:`~rlbackdoor.specs.SanitizeSpec`'s methods."""


def sweep_overrides(args: list[str], fields: Collection[str]) -> list[str]:
    """The arguments left over by the option parser, as ``a.b=value`` overrides.

    Accepts every form ``wandb agent`` builds: ``--a.b=value`` (``${args}``), ``a.b=value`` (``${args_no_hyphens}``),
    ``--a.b value`` (``${args_no_equals}``), a bare ``--a.b`` for true (``${args_no_boolean_flags}``: when nothing
    or another ``--`` option follows) and one JSON object of them all (``${args_json}``).

    :param args: the leftover arguments.
    :param fields: the config's top-level fields: an override of anything else is a mistyped option.
    """
    out = []
    for i, arg in enumerate(args):
        if i and args[i - 1].startswith("--") and "=" not in args[i - 1] and not arg.startswith("--"):
            continue  # the value of ``--a.b value``, taken with it
        if arg.startswith("{"):
            words = [f"{key}={json.dumps(value)}" for key, value in _json_object(arg).items()]
        elif "=" in arg and (arg.startswith("--") or not arg.startswith("-")):
            words = [arg.removeprefix("--")]
        elif arg.startswith("--") and len(arg) > 2:
            flag = i + 1 == len(args) or args[i + 1].startswith("--")
            words = [f"{arg[2:]}={'true' if flag else args[i + 1]}"]
        else:
            raise SpecError(
                f"unexpected argument '{arg}'; write overrides as --set key.path=value, --key.path=value or key.path=value"
            )
        for word in words:
            if word.split("=", 1)[0].split(".", 1)[0] not in fields:
                raise SpecError(f"'{arg}' is neither an option (see --help) nor a config field; fix its spelling")
        out += words
    return out


def _json_object(arg: str) -> dict[str, Any]:
    """The overrides of a ``${args_json}`` argument."""
    try:
        data = loads(arg)
    except ValueError as err:
        raise SpecError(
            f"'{reprlib.repr(arg)}': not a JSON object of overrides ({err}); fix the sweep's command"
        ) from None
    if not (isinstance(data, dict) and all(isinstance(key, str) for key in data)):
        raise SpecError(f"'{reprlib.repr(arg)}': not a JSON object of overrides; fix the sweep's command")
    return data


def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="experiment YAML (see configs/experiments/)"),
    set_: list[str] = typer.Option([], "--set", help="override key.path=value (repeatable)"),
    out: Path | None = typer.Option(None, help="run directory \\[default: runs/<name>/<timestamp>-<pid>]"),
    resume: Path | None = typer.Option(None, help="continue this interrupted run directory"),
    wandb_mode: WandbMode | None = typer.Option(None, help=WANDB_MODE_HELP),
    wandb_project: str = typer.Option("rlbackdoor", help="W&B project"),
    checkpoint_every: int = typer.Option(10_000, min=0, help="steps between checkpoints (0: none)"),
    progress: bool = typer.Option(True, help="show a progress bar on stderr"),
    sanitize: SanitizeMethod | None = typer.Option(
        None, help="train under trajectory sanitization (sets sanitize.method)"
    ),
) -> None:
    """Train an agent as CONFIG describes; print the run directory."""
    from rlbackdoor.cli.checks import check_out_dir
    from rlbackdoor.training.loop import train as run

    check_out_dir(out, "--out")
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise SpecError(f"--out {out}: a resumed run goes on in its own directory, {resume}; drop --out")
    overrides = [*set_, *sweep_overrides(ctx.args, ExperimentSpec.model_fields)]
    if sanitize is not None:
        clash = next((o for o in overrides if override_key(o) in ("sanitize", "sanitize.method")), None)
        if clash is not None:
            raise SpecError(f"--sanitize {sanitize.value} and --set {clash} both set the sanitizer; keep one")
        overrides.append(f"sanitize.method={sanitize.value}")
    spec = load_experiment(config, overrides)
    try:
        run_dir = run(
            spec,
            out,
            resume=resume,
            wandb_mode=wandb_mode.value if wandb_mode else None,
            wandb_project=wandb_project,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
    except SpecError as err:  # a check against the env: name the config and the attack block
        raise locate(err, str(config), "attack." if spec.attack is not None else "") from None
    typer.echo(str(run_dir))
