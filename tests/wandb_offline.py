"""Read back what an offline W&B run wrote: its ``.wandb`` transaction log (a LevelDB-style record log).

wandb 0.31 writes no ``config.yaml`` / ``wandb-summary.json`` offline; the log is the only record. The
file starts with a 7-byte header (``:W&B``, magic, version); then come 32 KiB blocks of chunks, each
``crc32 of type + payload (4) | length (2) | type (1)`` (little endian) and the payload; a protobuf ``Record`` is one FULL
chunk or a FIRST, MIDDLE..., LAST series. Block tails shorter than a chunk header are zero padding.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline run recorded."""

    path: Path
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every protobuf record in a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER:  # not written yet
        return []
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if length == 0 and kind == 0:  # padding
            pos += room
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:  # the writer is still appending it
            break
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _finished_records(run_dir: Path, timeout: float) -> list[wandb_internal_pb2.Record]:
    """The log's records once it ends with the exit record: wandb-core may still be writing after ``finish``."""
    deadline = time.monotonic() + timeout
    while True:
        logs = list(Path(run_dir).glob("run-*.wandb"))
        found = records(logs[0]) if len(logs) == 1 else []
        if (found and found[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def read_run(run_dir: Path, timeout: float = 30.0) -> OfflineRun:
    """Replay a ``.../offline-run-*`` directory's log into config, history rows, summary and artifacts.

    :param run_dir: the run directory.
    :param timeout: seconds to wait for the writer to finish the log.
    """
    result = OfflineRun(path=Path(run_dir))
    for record in _finished_records(run_dir, timeout):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result.run = record.run
            result.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            result.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            result.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            result.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            result.artifacts.append(record.artifact)
        elif kind == "exit":
            result.exit_code = record.exit.exit_code
    return result


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``wandb_dir`` (the ``WANDB_DIR``), oldest first."""
    return [read_run(p) for p in sorted(Path(wandb_dir).glob("**/offline-run-*")) if p.is_dir()]
