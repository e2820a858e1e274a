"""The project's exceptions. Each message names the problem and the fix; the CLI prints it on one line."""

from __future__ import annotations


class RlbdError(Exception):
    """Base class of every error ``rlbd`` reports as a one-line message with exit code 2."""


class SpecError(RlbdError, ValueError):
    """A YAML spec or config is malformed or does not fit the environment it names."""


class ArtifactError(RlbdError):
    """A run directory, model file or card is missing, corrupt or inconsistent."""


class ObservationError(RlbdError, ValueError):
    """An observation cannot be processed (NaN, wrong shape or dtype)."""


BAD_REWARD = "reward is NaN or inf; fix the environment or its reward function"
"""The message of the :class:`ObservationError` the wrappers raise on a NaN or inf reward."""


def detail(err: BaseException) -> str:
    """``err``'s message on one line (its class name when it has none, as a bare ``assert`` does): for quoting a
    third-party error inside an rlbd message."""
    return " ".join(str(err).split()) or type(err).__name__


def in_context(err: RlbdError, context: str) -> RlbdError:
    """``err``'s class and message with ``context`` (e.g. ``zoo z: agent 3``) before it: where a batch of runs
    reports one run's error. Built without the class's constructor, whose parameters may differ."""
    out = RlbdError.__new__(type(err))
    Exception.__init__(out, f"{context}: {err}")
    return out
