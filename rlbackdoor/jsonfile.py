"""Reading JSON that may be damaged or hostile (cards, zoo manifests, checkpoint states, bench results, trajectory
metadata): every problem is a ``ValueError`` its caller turns into its one-line error, never a ``RecursionError``
or gigabytes read into memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TooLargeError(ValueError):
    """A file holds more bytes than its reader allows."""


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them.

    :raises TooLargeError: the file is larger than ``limit`` bytes.
    :raises ValueError: ``path`` exists but is not a regular file (a FIFO would block the read).
    :raises OSError: the file cannot be opened or read.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError("not a regular file")
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"larger than {_size(limit)}")
    return data


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit:,} bytes"


def loads(text: str | bytes) -> Any:
    """``json.loads``, with nesting too deep for the parser (``[[[...``) a ``ValueError`` like invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ValueError(str(err)) from None


def read_json(path: str | Path, limit: int) -> Any:
    """The JSON value in ``path`` (see :func:`read_bytes` and :func:`loads` for what raises)."""
    return loads(read_bytes(path, limit))
