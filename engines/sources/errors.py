"""The one error type of model sources."""

from __future__ import annotations


class SourceError(ValueError):
    """A model source problem found while fetching it; the message names the source and the
    fix."""
