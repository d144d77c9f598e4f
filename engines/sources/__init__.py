"""Model sources: where a model (or, later, an adapter) comes from, made a local directory.

    /path/to/dir                  used in place
    /path/model.tar.gz, .tgz      extracted safely into the cache       (archive.py)
    s3://bucket/prefix/           every object mirrored into the cache  (s3.py)
    s3://bucket/model.tar.gz      downloaded, then extracted
    org/name (a hub id)           huggingface_hub's cache, or a download (hub.py)

`fetch` blocks (downloads can take minutes): the front end runs it on a thread, so /ping keeps
answering 503 meanwhile. Every failure is a SourceError naming the source and the fix.
Torch-free; boto3 and huggingface_hub are imported only when a source needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from engines.sources.errors import ARCHIVE_SUFFIXES, SourceError
from engines.sources.errors import is_archive_name as _is_archive

__all__ = ["ARCHIVE_SUFFIXES", "SourceError", "fetch", "is_remote"]


def _local(value: str) -> str:
    return value[len("file://"):] if value.startswith("file://") else value


def is_remote(value: str) -> bool:
    """Whether `value` needs fetching (anything but a local directory)."""
    if value.startswith("s3://"):
        return True
    path = Path(_local(value)).expanduser()
    if path.is_dir():
        return False
    if _is_archive(value) and path.is_file():
        return True
    from engines.sources.hub import looks_like_hub_id

    return looks_like_hub_id(value)


def fetch(value: str, *, cache_dir: str | Path, source: str,
          revision: str | None = None) -> Path:
    """A local directory holding the model `value` names. `source` says where the user wrote
    it (e.g. "HF_MODEL_ID"), for messages."""
    cache = Path(cache_dir).expanduser()
    try:
        if value.startswith("s3://"):
            return _fetch_s3(value, cache, source)
        path = Path(_local(value)).expanduser()
        if path.is_dir():
            return path.resolve()
        if _is_archive(value) and path.is_file():
            from engines.sources.archive import extract_archive

            return extract_archive(path.resolve(), cache, source=f"{source}={value}")
        from engines.sources.hub import looks_like_hub_id, resolve_hub

        if looks_like_hub_id(value):
            try:
                return resolve_hub(value, revision=revision, source=source)
            except SourceError as e:
                if "/" in value:
                    raise
                # A bare name may have been meant as a directory.
                raise SourceError(f"{e} ({value!r} is not a local directory either)") from None
    except SourceError as e:
        message = str(e)
        if message.startswith(source):
            raise
        if message.startswith(value):  # said once is enough
            message = message[len(value):].lstrip(": ")
        raise SourceError(f"{source}={value}: {message}") from None
    raise SourceError(f"{source}={value!r} is not a directory, a .tar.gz archive, an s3:// URL "
                      f"or a Hugging Face hub id")


def _fetch_s3(url: str, cache: Path, source: str) -> Path:
    from engines.sources import s3

    if _is_archive(url):
        from engines.sources.archive import extract_archive

        folder = s3.fetch_prefix(url, cache, single=True)  # the one object, cached like a prefix
        archive = folder / os.path.basename(url)
        return extract_archive(archive, cache, source=f"{source}={url}")
    return s3.fetch_prefix(url, cache)
