"""Damaged and tampered files for tests: seeded byte corruption, so every run damages a file the same way."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path


def damaged(data: bytes, seed: int) -> bytes:
    """``data`` with 1 to ``len(data) // 4`` bytes overwritten and, for one seed in five, cut short."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(rng.choice([1, 3, 10, max(1, len(out) // 4)])):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out[: rng.randrange(len(out))] if rng.random() < 0.2 else out)


def reseal(run: Path) -> None:
    """Record the run's current ``policy.safetensors`` in its card, as a producer of tampered weights would."""
    card = json.loads((run / "card.json").read_text())
    card["weights_sha256"] = hashlib.sha256((run / "policy.safetensors").read_bytes()).hexdigest()
    (run / "card.json").write_text(json.dumps(card))
