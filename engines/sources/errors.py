"""The error type of model sources, and the archive names every source module recognises."""

from __future__ import annotations


# What names a model archive (engines/sources/archive.py), and so is no hub id.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_archive_name(value: str) -> bool:
    return value.lower().endswith(ARCHIVE_SUFFIXES)


class SourceError(ValueError):
    """A model source problem found while fetching it; the message names the source and the
    fix."""
