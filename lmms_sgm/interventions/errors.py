"""The errors of glasses (their own module, so that the registry and the base share them without a cycle)."""
from __future__ import annotations


class GlassesError(ValueError):
    """Glasses files that are damaged, edited or unreadable; the message names the file."""


class UnverifiedGlassesWarning(UserWarning):
    """Glasses written in format 1, which carry no content digest to verify their files with."""


class GlassesMismatch(ValueError):
    """Glasses profiled on another model than the one they are applied to."""
