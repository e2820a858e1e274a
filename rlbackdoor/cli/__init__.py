"""``rlbd``: the command-line shell over the library. Each command is a thin call into a library function.

Errors the project raises (:class:`rlbackdoor.errors.RlbdError`) print as one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import warnings

import typer

from rlbackdoor.cli import bench, cleanse, envs, sanitize, sweep, train
from rlbackdoor.cli import detect as detect_cli
from rlbackdoor.cli import eval as eval_cli
from rlbackdoor.cli import zoo as zoo_cli
from rlbackdoor.errors import RlbdError

app = typer.Typer(
    name="rlbd",
    help="rlbackdoor: backdoored RL environments, poisoned training, evaluation and defenses.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(envs.app, name="envs")
app.command("train", context_settings=train.CONTEXT)(train.train)
app.command("sanitize")(sanitize.sanitize)
app.command("eval")(eval_cli.eval_run)
app.command("zoo")(zoo_cli.zoo)
app.command("detect")(detect_cli.detect)
app.command("cleanse")(cleanse.cleanse)
app.command("bench", context_settings=train.CONTEXT)(bench.bench)
app.command("sweep")(sweep.sweep)


ERROR = 2
"""The exit code of a one-line error (the project's errors and click's usage errors)."""


def main(argv: list[str] | None = None) -> int:
    """Run ``rlbd``; return the exit code (:data:`ERROR` on a project error, with a one-line message).

    Python warnings raised in this process while a command runs (SB3's hyperparameter advice, gymnasium's) are held
    back until it ends. When it fails with a one-line error they are dropped, so that stderr holds that line only:
    they are about a run that never happens. Otherwise (success, a traceback) they print then, after the command's
    own output. Worker processes (``rlbd zoo``, ``bench``, ``sweep``) print their own as they come.
    """
    held: list[warnings.WarningMessage] = []
    code: int | None = None
    try:
        with warnings.catch_warnings(record=True) as held:
            code = _run(argv)
    finally:
        if code != ERROR:
            for w in held:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return code


def _run(argv: list[str] | None) -> int:
    """Run ``rlbd`` with ``argv``: the exit code, with project and usage errors printed as one line."""
    try:
        code = app(args=argv, standalone_mode=False)  # a command's typer.Exit(n) comes back as n
    except RlbdError as err:
        print(f"rlbd: error: {err}", file=sys.stderr)
        return ERROR
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        print("rlbd: aborted", file=sys.stderr)
        return 1
    except Exception as err:  # click usage errors carry their own exit code
        code = getattr(err, "exit_code", None)
        if code is None:
            raise
        show = getattr(err, "format_message", None)
        print(f"rlbd: error: {show() if show else err}", file=sys.stderr)
        return ERROR
    return code if isinstance(code, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
