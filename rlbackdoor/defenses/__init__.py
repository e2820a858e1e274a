"""Defenses: detectors (fit/score) and sanitizers (fit/transform, at run time or on trajectories)."""

from __future__ import annotations

from rlbackdoor.defenses.base import Access, SanitizedPolicy, SanitizeObservation, Sanitizer
from rlbackdoor.defenses.subspace import SubspaceSanitizer
from rlbackdoor.defenses.support import SupportSanitizer

__all__ = [
    "Access",
    "SanitizeObservation",
    "SanitizedPolicy",
    "Sanitizer",
    "SubspaceSanitizer",
    "SupportSanitizer",
]
