"""Weights & Biases tracking: one W&B run per ``rlbd`` command that produces results.

Metric keys are ``<stage>/<metric>`` (``train/poison_rate``, ``eval/asr``, ``detect/auroc``); build them
with :func:`prefixed`. A W&B failure (no network, unwritable directory, a bad value) is warned about
once and turns the :class:`Tracker` into a no-op: tracking never kills training.

Mode: an explicit ``mode`` wins, else ``WANDB_MODE``, else ``online`` when an API key is configured
(``WANDB_API_KEY`` or a netrc entry for the W&B host), else ``offline``. Offline runs land under
``$WANDB_DIR/wandb/offline-run-*`` (``./wandb/`` by default); ``wandb sync`` uploads them.
"""

from __future__ import annotations

import netrc
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlbackdoor.errors import SpecError

MODES = ("online", "offline", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online"}


def prefixed(stage: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"<stage>/<metric>": value}`` for every entry of ``metrics``.

    :param stage: ``train``, ``eval``, ``detect``, ``sanitize``, ...
    :param metrics: metric name to value.
    """
    return {f"{stage}/{key}": value for key, value in metrics.items()}


def run_config(card: Mapping[str, Any], key: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B config of a command on a trained run: the run's experiment config, its resolved attack and
    hyperparameters (from its card), and the command's own ``settings`` under ``key``, a name no experiment field
    has."""
    return {
        **(card.get("config") or {}),
        "attack": card.get("attack"),
        "hyperparams": card.get("hyperparams"),
        key: dict(settings),
    }


def api_key_configured() -> bool:
    """Whether a W&B API key is set in ``WANDB_API_KEY`` or in the netrc file for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str | None = None) -> str:
    """The W&B mode to use: ``mode``, else ``WANDB_MODE``, else online iff an API key is configured.

    :param mode: ``online``, ``offline`` or ``disabled``; ``None`` to decide from the environment.
    """
    source, value = ("mode", mode) if mode is not None else ("WANDB_MODE", os.environ.get("WANDB_MODE"))
    if value is None or value == "":
        return "online" if api_key_configured() else "offline"
    value = _ALIASES.get(value, value)
    if value not in MODES:
        raise SpecError(f"{source} '{value}' is not a W&B mode; use one of {', '.join(MODES)}")
    return value


class Tracker:
    """Logs to one W&B run; every call is a no-op once W&B has failed or when tracking is disabled.

    :param run: the ``wandb`` run, or ``None`` for a no-op tracker.
    """

    def __init__(self, run: Any | None) -> None:
        self._run = run
        self.run_dir: Path | None = Path(run.settings.sync_dir) if run is not None else None
        """The run's local directory (``.../wandb/offline-run-*``), or ``None`` when not tracking."""

    @property
    def active(self) -> bool:
        """Whether calls reach W&B."""
        return self._run is not None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            _warn(f"W&B {what} failed ({type(err).__name__}: {err}); tracking is off for the rest of this run")
            self._run = None

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log a row of metrics (``<stage>/<metric>`` keys) at ``step``."""
        self._call("log", lambda: self._run.log(dict(metrics), step=step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Set final values in the run summary."""
        self._call("summary", lambda: self._run.summary.update(dict(metrics)))

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        """Log a file or directory as a W&B artifact.

        :param path: the file or directory.
        :param name: the artifact name (characters other than letters, digits, ``-_.`` become ``-``).
        :param type: the artifact type, e.g. ``card`` or ``model``.
        """

        def log() -> None:
            import wandb

            artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=type)
            if Path(path).is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            self._run.log_artifact(artifact)

        self._call("log_artifact", log)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a table under ``key``."""

        def log() -> None:
            import wandb

            self._run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

        self._call("log_table", log)

    def log_image(self, key: str, png_path: Path) -> None:
        """Log a PNG file as an image under ``key``."""

        def log() -> None:
            import wandb

            self._run.log({key: wandb.Image(str(png_path))})

        self._call("log_image", log)


def _warn(message: str) -> None:
    """Warn about a W&B failure; a failed run turns its tracker off, so each run warns at most once."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextmanager
def wandb_run(
    job_type: str,
    name: str,
    config: Mapping[str, Any],
    mode: str | None = None,
    project: str = "rlbackdoor",
    group: str | None = None,
) -> Iterator[Tracker]:
    """Open one W&B run for the ``with`` block and yield its :class:`Tracker`.

    :param job_type: ``train``, ``eval``, ``detect``, ...
    :param name: the run name (the experiment name).
    :param config: the fully resolved config, stored as the run config.
    :param mode: ``online``, ``offline`` or ``disabled``; ``None`` decides as the module docstring says.
    :param project: the W&B project.
    :param group: the W&B group; defaults to ``name``. ``WANDB_RUN_GROUP`` (set by ``rlbd sweep``) overrides it.
    """
    mode = resolve_mode(mode)
    run = None
    if mode != "disabled":
        try:
            import wandb

            settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
            run = wandb.init(
                project=project,
                name=name,
                group=os.environ.get("WANDB_RUN_GROUP") or group or name,  # a sweep's group wins
                job_type=job_type,
                config=dict(config),
                dir=os.environ.get("WANDB_DIR"),  # read per run: wandb caches its environment at first setup
                mode=mode,
                settings=settings,
                reinit="create_new",
            )
        except Exception as err:
            _warn(f"W&B init failed ({type(err).__name__}: {err}); continuing without tracking")
            run = None
    tracker = Tracker(run)
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        if run is not None:
            try:
                run.finish(exit_code=1 if failed else 0)
            except Exception as err:
                _warn(f"W&B finish failed ({type(err).__name__}: {err}); the run may be incomplete")
