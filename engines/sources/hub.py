"""Hugging Face hub ids (`org/name` or `name`), resolved through huggingface_hub and its cache.

    org/name  ->  $HF_HUB_CACHE/models--org--name/snapshots/<commit>/   (HF_HOME/hub by default)

The snapshot comes from the local cache when it is there, else it is downloaded (when the network
allows). HF_HUB_OFFLINE=1 forbids any download; HF_TOKEN (private or gated repos), HF_ENDPOINT
and the other variables work as huggingface_hub documents them. huggingface_hub is imported only
when a hub id is resolved; `looks_like_hub_id` needs nothing but the standard library.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engines.sources.errors import SourceError, is_archive_name

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's own spelling of a true variable
# huggingface_hub's rules (utils.validate_repo_id): [namespace/]name, each 1-96 of
# [A-Za-z0-9_.-], starting and ending with [A-Za-z0-9_], no "--" or "..", not ending in ".git".
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
_DOWNLOAD = "hf download"  # `huggingface-cli download` before huggingface_hub 1.0


def looks_like_hub_id(value: str) -> bool:
    """Whether `value` reads as a hub repo id rather than a path, an archive or a URL."""
    if "://" in value or is_archive_name(value):
        return False
    if not _REPO_ID.fullmatch(value) or "--" in value or ".." in value or value.endswith(".git"):
        return False
    return not Path(value).expanduser().exists()


def hub_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The hub cache huggingface_hub uses under `env`. Read at each call: huggingface_hub reads
    it once, when first imported, and a later change of HF_HOME would otherwise go unseen."""
    def expand(value: str) -> str:
        return os.path.expandvars(os.path.expanduser(value))

    if cache := env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(expand(cache))
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return Path(expand(home)) / "hub"


def is_offline(env: Mapping[str, str] = os.environ) -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to 1/true/yes/on, as huggingface_hub reads it."""
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def resolve_hub(repo_id: str, *, revision: str | None, source: str) -> Path:
    """The local snapshot dir of `repo_id` at `revision` (None: main), downloaded if needed.

    `source` is how the user named it (e.g. "HF_MODEL_ID"); every SourceError message starts
    with it and names the repo and the fix.
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise SourceError(f"{source}: {repo_id} is a Hugging Face hub id, which needs the "
                          f"huggingface_hub package: pip install huggingface_hub") from None
    cache = hub_cache_dir()
    # huggingface_hub also refuses the network when HF_HUB_OFFLINE was set at its import.
    offline = is_offline() or constants.HF_HUB_OFFLINE
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=offline)
    except (ValueError, OSError) as e:
        explained = _explain(e, _Where(repo_id, revision, cache, offline, source))
        if explained is None:
            raise
        raise explained from e
    return Path(path)


@dataclass(frozen=True, slots=True)
class _Where:
    """What a message needs to say about the lookup that failed."""

    repo_id: str
    revision: str | None
    cache: Path
    offline: bool
    source: str

    @property
    def rev(self) -> str:
        return self.revision or "main"

    @property
    def download(self) -> str:
        flag = f" --revision {self.revision}" if self.revision else ""
        return f"`HF_HOME=/some/dir {_DOWNLOAD} {self.repo_id}{flag}`"

    @property
    def populate(self) -> str:
        return (f"on a machine with network run {self.download} (`huggingface-cli download` "
                f"with huggingface_hub < 1.0), then mount /some/dir here and set HF_HOME to it "
                f"(or HF_HUB_CACHE to its hub/ folder)")


def _explain(e: Exception, w: _Where) -> SourceError | None:
    """The huggingface_hub error `e` as what to change; None for one we cannot explain."""
    from huggingface_hub import errors, utils

    head = f"{w.source}: the Hugging Face repo {w.repo_id}"
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # recent huggingface_hub only
    if isinstance(e, utils.HFValidationError):
        return SourceError(f"{w.source}: {w.repo_id!r} is not a valid Hugging Face repo id "
                           f"({e}); write it as on huggingface.co, org/name")
    if isinstance(e, incomplete):
        return SourceError(f"{head}: its cached snapshot (revision {w.rev}) in {w.cache} is "
                           f"missing files ({e}); complete it: {w.populate}")
    if isinstance(e, utils.LocalEntryNotFoundError):
        return SourceError(_not_cached(e, w, head))
    if isinstance(e, utils.GatedRepoError):
        return SourceError(f"{head} is gated: accept its conditions at "
                           f"https://huggingface.co/{w.repo_id} while logged in, then set "
                           f"HF_TOKEN to an access token of that account")
    if isinstance(e, utils.RepositoryNotFoundError):
        token = ("HF_TOKEN is set, but gives no access to it" if os.environ.get("HF_TOKEN")
                 else "if it is private, set HF_TOKEN to a token that can read it")
        return SourceError(f"{head} was not found on the hub: check the id; {token}")
    if isinstance(e, utils.RevisionNotFoundError):
        return SourceError(f"{head} has no revision {w.rev!r}: give a branch, tag or commit "
                           f"that exists (https://huggingface.co/{w.repo_id}/tree/main)")
    if isinstance(e, utils.HfHubHTTPError):
        return SourceError(f"{head}: the hub refused the request ({e}); for a private or gated "
                           f"repo set HF_TOKEN to a token that can read it")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SourceError(f"{head}: no space left on the device while downloading it into "
                           f"{w.cache}: free space there, or set HF_HOME (or HF_HUB_CACHE) to "
                           f"a directory on a larger volume")
    if isinstance(e, OSError):
        return SourceError(f"{head}: fetching it into {w.cache} failed: {e}")
    return None


def _not_cached(e: Exception, w: _Where, head: str) -> str:
    repo_dir = w.cache / f"models--{w.repo_id.replace('/', '--')}"
    if repo_dir.is_dir():
        missing = (f"is in the hub cache {w.cache}, but not its revision {w.rev!r} (cached: "
                   f"{_cached_revisions(repo_dir) or 'none complete'})")
        fix = f"ask for a cached revision, or download this one: {w.populate}"
    else:
        missing = f"is not in the hub cache {w.cache}"
        fix = w.populate
    if w.offline:
        return (f"{head} {missing}, and HF_HUB_OFFLINE=1 forbids downloading it. To fix: {fix}; "
                f"or unset HF_HUB_OFFLINE where the network allows")
    return (f"{head} {missing}, and the hub could not be reached ({e}). Give the container "
            f"network access to huggingface.co (or HF_ENDPOINT); or {fix}, and set "
            f"HF_HUB_OFFLINE=1")


def _cached_revisions(repo_dir: Path) -> str:
    """The refs (branches, tags) and snapshot commits of a cached repo, for a message."""
    refs = sorted(str(p.relative_to(repo_dir / "refs")) for p in (repo_dir / "refs").rglob("*")
                  if p.is_file())
    commits = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    parts = ([f"refs {', '.join(refs)}"] if refs else []) + (
        [f"commits {', '.join(c[:12] for c in commits)}"] if commits else [])
    return "; ".join(parts)
