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

    Python warnings raised in this process while a command runs are held back until it ends, then printed after the
    command's own output. When it fails with a one-line error, only ``RuntimeWarning``s print, above that line:
    numeric trouble such as numpy's overflow, which locates the NaN or inf an error may report. The others (SB3's
    hyperparameter advice, gymnasium's) are dropped with the run they were about. Worker processes (``rlbd zoo``,
    ``bench``, ``sweep``) print their own as they come.
    """
    held: list[warnings.WarningMessage] = []
    error: str | None = None
    try:
        with warnings.catch_warnings(record=True) as held:
            code, error = _run(argv)
    finally:  # a traceback keeps every warning
        for w in held:
            if error is None or issubclass(w.category, RuntimeWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if error is not None:
        print(f"rlbd: error: {error}", file=sys.stderr)
    return code


def _run(argv: list[str] | None) -> tuple[int, str | None]:
    """Run ``rlbd`` with ``argv``: the exit code, and the one-line message of a project or usage error."""
    try:
        code = app(args=argv, standalone_mode=False)  # a command's typer.Exit(n) comes back as n
    except RlbdError as err:
        return ERROR, str(err)
    except typer.Exit as ex:
        return ex.exit_code, None
    except typer.Abort:
        print("rlbd: aborted", file=sys.stderr)
        return 1, None
    except Exception as err:  # click usage errors carry their own exit code
        if getattr(err, "exit_code", None) is None:
            raise
        show = getattr(err, "format_message", None)
        message = show() if show else str(err)
        return (ERROR, message) if message else (0, None)  # no message: a group called bare, its help shown
    return (code if isinstance(code, int) else 0), None


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
