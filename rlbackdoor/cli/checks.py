"""Checks the commands run on their arguments before any work, so a bad argument fails in a second.

Output paths: a file option (``--json``) must not name a folder or lie under a file; a folder option
(``--out``) must not name a file or lie under one. Missing parent folders are fine: the write creates them. A path the
OS cannot look up (a name too long for the file system) is refused, an argument or a zoo manifest's entry alike.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Any

from rlbackdoor.errors import ArtifactError, SpecError


def _check_lookup(path: Path, where: str) -> None:
    """Refuse a path the OS cannot look up: a name longer than the file system allows, a folder it may not search
    (a missing path, or one holding a NUL byte, is only absent)."""
    try:
        path.exists()
    except OSError as err:
        raise ArtifactError(
            f"{where}: cannot look up {reprlib.repr(str(path))} ({err.strerror}); use a shorter or accessible path"
        ) from None


def _check_parents(path: Path, option: str, start: Path) -> None:
    """The nearest existing folder from ``start`` up (``start`` itself if it exists) is a writable folder."""
    parent = start
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"{option} {path}: {parent} is a file, not a folder; pick a path outside it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"{option} {path}: folder {parent} is not writable; pick another path")


def check_file_out(path: Path | None, option: str) -> None:
    """Refuse an output file ``path`` (given as ``option``) that names a folder or lies under a file."""
    if path is None:
        return
    _check_lookup(path, option)
    if path.is_dir():
        raise ArtifactError(f"{option} {path}: is a folder; name a file, in it or elsewhere")
    _check_parents(path, option, path.parent)


def check_out_dir(path: Path | None, option: str) -> None:
    """Refuse an output folder ``path`` (given as ``option``) that names a file or lies under one."""
    if path is None:
        return
    _check_lookup(path, option)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{option} {path}: is a file, not a folder; name a new or an existing folder")
    _check_parents(path, option, path)


def write_json_out(path: Path | None, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as JSON to ``path`` (checked by :func:`check_file_out`), creating its folders."""
    from rlbackdoor.training.artifacts import write_json

    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def check_single_agent(
    env_id: object, where: str, command: str, fix: str = "for multi-agent runs use rlbd cleanse"
) -> None:
    """Refuse a multi-agent env id: ``rlbd command`` handles single-agent envs (``fix`` ends the message)."""
    from rlbackdoor.multiagent.registry import is_multiagent

    if isinstance(env_id, str) and is_multiagent(env_id):
        raise SpecError(
            f"{where}: {env_id} is a multi-agent env id and rlbd {command} handles single-agent envs; {fix}"
        )


def check_single_agent_runs(target: Path, command: str) -> None:
    """Refuse a run directory, or a zoo holding a run, trained on a multi-agent env (see :func:`check_single_agent`)
    or at a path the OS cannot look up (an error naming the manifest's entry)."""
    from rlbackdoor.training.artifacts import CARD, read_card
    from rlbackdoor.zoo import MANIFEST, read_manifest

    manifest = target / MANIFEST
    _check_lookup(manifest, f"rlbd {command}")
    if manifest.is_file():
        runs = {f"{manifest}: agents.{i}.path": agent.path for i, agent in enumerate(read_manifest(target))}
    else:
        runs = {f"rlbd {command}": target}
    for where, run in runs.items():
        _check_lookup(run / CARD, where)
        if (run / CARD).is_file():
            check_single_agent(read_card(run).get("env"), str(run), command)
