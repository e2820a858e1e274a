"""Defenses: detectors (fit/score) and sanitizers (fit/transform, at run time or on trajectories)."""

from __future__ import annotations

from rlbackdoor.defenses.base import Access, SanitizedPolicy, SanitizeObservation, Sanitizer
from rlbackdoor.defenses.subspace import SubspaceSanitizer
from rlbackdoor.defenses.support import SupportSanitizer

SANITIZERS: dict[str, type[Sanitizer]] = {"subspace": SubspaceSanitizer, "support": SupportSanitizer}

__all__ = [
    "SANITIZERS",
    "Access",
    "SanitizeObservation",
    "SanitizedPolicy",
    "Sanitizer",
    "SubspaceSanitizer",
    "SupportSanitizer",
]
