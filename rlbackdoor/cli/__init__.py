"""``rlbd``: the command-line shell over the library. Each command is a thin call into a library function.

Errors the project raises (:class:`rlbackdoor.errors.RlbdError`) print as one line on stderr and exit 2.
"""

from __future__ import annotations

import sys

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


def main(argv: list[str] | None = None) -> int:
    """Run ``rlbd``; return the exit code (2 on a project error, with a one-line message)."""
    try:
        code = app(args=argv, standalone_mode=False)  # a command's typer.Exit(n) comes back as n
    except RlbdError as err:
        print(f"rlbd: error: {err}", file=sys.stderr)
        return 2
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
        return 2
    return code if isinstance(code, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
