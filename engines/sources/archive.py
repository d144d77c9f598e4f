"""Model archives (SageMaker's model.tar.gz, also .tgz and plain .tar), extracted safely, once.

    /x/model.tar.gz  ->  $LMC_CACHE/archives/<sha of path, size, mtime>/model[/<its one top dir>]

Each archive is extracted into a temp dir next to its cache entry, which is renamed into place
only when complete, with a marker beside the model tree; so a killed extraction never leaves a
half model that a later start would serve, and its temp dir is removed by the next extraction.
A later call with the same, unchanged archive returns the cached dir without reading it; an
archive changed on disk (size or mtime) gets a new entry.

Nothing is written outside the cache entry: every member is checked first, so the message names
the member and the reason (absolute path, `..`, a link leading outside, a device file or FIFO),
and tarfile's "data" filter checks again against what is already on disk (chains of links).
Torch-free and standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from engines.sources.errors import SourceError

# Beside the model tree rather than in it, so no archive member can clash with it.
COMPLETE_MARKER = ".lmc-complete"
_MODEL = "model"
# A dir holding one of these is a model dir as is; otherwise one lone top dir is looked into.
_MODEL_FILES = ("config.json", "model.py")
_END_OF_ARCHIVE = bytes(tarfile.BLOCKSIZE)
_GZIP_MAGIC = b"\x1f\x8b"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# tarfile's extraction filters (PEP 706) come with 3.11.4, and with distributions' patched 3.11
# (Debian bookworm's 3.11.2, the image's base, carries the backport). Without them the checks
# below stand alone, and also refuse any member reached through an earlier symlink.
_HAS_FILTERS = hasattr(tarfile, "data_filter")
_FilterError = getattr(tarfile, "FilterError", ())


def extract_archive(archive: Path, cache_root: Path, *, source: str) -> Path:
    """The model dir inside `archive`, extracted into `cache_root/archives` unless already there.

    `source` is how the user named the archive (e.g. "HF_MODEL_ID=/x/model.tar.gz"); every
    SourceError message starts with it.
    """
    archive = Path(archive)
    entry = _entry_dir(archive, Path(cache_root).expanduser(), source)
    if not _is_complete(entry):
        _extract_locked(archive, entry, source)
    return _model_root(entry / _MODEL)


def _entry_dir(archive: Path, cache_root: Path, source: str) -> Path:
    try:
        st = archive.stat()
        resolved = archive.resolve()
    except OSError as e:
        raise SourceError(f"{source}: cannot read the archive {archive}: {e.strerror}") from None
    # Size and mtime make a replaced archive (a new model version at the same path) a new entry.
    key = f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return cache_root / "archives" / hashlib.sha256(key).hexdigest()[:16]


def _is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARKER).is_file()


def _extract_locked(archive: Path, entry: Path, source: str) -> None:
    parent = entry.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = open(parent / f"{entry.name}.lock", "w")
    except OSError as e:
        raise _write_error(e, archive, parent, source) from e
    # Workers of one container may start together: all but one wait for the first extraction
    # rather than each extracting (and filling the disk with) its own copy.
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(entry):
            return
        try:
            _remove_leftovers(entry)
            _extract_into_place(archive, entry, source)
        except OSError as e:
            raise _write_error(e, archive, parent, source) from e


def _extract_into_place(archive: Path, entry: Path, source: str) -> None:
    # Same parent as the entry, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        _extract(archive, tmp / _MODEL, source)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"archive": str(archive)}) + "\n")
        # mkdtemp makes it owner-only; the cache may be shared with workers of another user.
        tmp.chmod(0o755)
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(entry: Path) -> None:
    """What a killed extraction of this archive left; we hold the lock, so none is running."""
    for tmp in entry.parent.glob(f".{entry.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if entry.exists():  # no marker: copied in by hand, maybe half-way
        shutil.rmtree(entry)


def _write_error(e: OSError, archive: Path, cache: Path, source: str) -> SourceError:
    if e.errno in _NO_SPACE:
        return SourceError(
            f"{source}: no space left on the device while extracting {archive} into {cache}: "
            f"free space there, or set LMC_CACHE to a directory on a larger volume (the model "
            f"needs about the archive's uncompressed size)")
    return SourceError(f"{source}: extracting {archive} into {cache} failed: {e}")


class _Recorder:
    """A file that remembers the last bytes read from it: tarfile takes an archive cut short at a
    member boundary (or a garbled header) for its end, so we look at what it read last."""

    def __init__(self, f) -> None:
        self._f = f
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        self.last = self._f.read(size)
        return self.last

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def _extract(archive: Path, dest: Path, source: str) -> None:
    dest.mkdir()
    members = _CheckedMembers(archive, source)
    try:
        with open(archive, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            # One pass, only forward: a gzip stream cannot seek back without decompressing again.
            stream = gzip.GzipFile(fileobj=raw) if compressed else raw
            recorder = _Recorder(stream)
            with tarfile.open(fileobj=recorder, mode="r:") as tar:
                members.tar = tar
                tar.extractall(dest, members=members,
                               **({"filter": "data"} if _HAS_FILTERS else {}))
            if recorder.last != _END_OF_ARCHIVE:
                raise tarfile.ReadError("it ends before tar's end-of-archive marker")
            # gzip checks its CRC and length only at the end of the stream.
            while recorder.read(1 << 20):
                pass
    except _FilterError as e:
        raise _unsafe(archive, source, e.tarinfo.name,
                      f"would be written outside the extraction dir ({e})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        last = f"; the last member read was {members.current!r}" if members.current else ""
        raise SourceError(
            f"{source}: {archive} is not a readable tar archive (truncated or corrupt: {e}"
            f"{last}); upload it again, and check it with `tar tf {archive.name}`") from None
    if not members.count:
        raise SourceError(f"{source}: the archive {archive} holds no files; put the model's "
                          f"files in it (e.g. `tar czf model.tar.gz -C /path/to/model .`)")


class _CheckedMembers:
    """The archive's members in order, each checked before tarfile extracts it."""

    def __init__(self, archive: Path, source: str) -> None:
        self.archive, self.source = archive, source
        self.tar: tarfile.TarFile | None = None
        self.current = ""
        self.count = 0
        self.symlinks: set[str] = set()  # used only without tarfile's filters

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        assert self.tar is not None
        for member in self.tar:
            self.current = member.name
            _check_member(member, self.archive, self.source)
            if not _HAS_FILTERS:
                self._check_chain(member)
            self.count += 1
            yield member

    def _check_chain(self, member: tarfile.TarInfo) -> None:
        """Without the data filter: nothing may be written or point through a symlink the
        archive made, since that is how chains of links lead outside."""
        name = posixpath.normpath(member.name)
        paths = [name]
        if member.issym() or member.islnk():
            base = posixpath.dirname(name) if member.issym() else ""
            paths.append(posixpath.normpath(posixpath.join(base, member.linkname)))
        for path in paths:
            parts = path.split("/")
            through = next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
                            if p in self.symlinks), None)
            if through is not None:
                raise _unsafe(self.archive, self.source, member.name,
                              f"goes through the symlink {through!r} the archive made")
        if member.issym():
            self.symlinks.add(name)


def _check_member(member: tarfile.TarInfo, archive: Path, source: str) -> None:
    """Raise if `member` could write outside the extraction dir. Purely on names: nothing on
    disk is looked at, so no symlink is followed."""
    name = member.name
    reason = _name_problem(name)
    if reason is None and (member.issym() or member.islnk()):
        reason = _link_problem(member)
    if reason is None and not (member.isreg() or member.isdir() or member.issym()
                               or member.islnk()):
        reason = f"is {_KINDS.get(member.type, f'of tar type {member.type!r}')}, not a file"
    if reason is not None:
        raise _unsafe(archive, source, name, reason)


_KINDS = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
          tarfile.FIFOTYPE: "a FIFO (named pipe)"}


def _name_problem(name: str) -> str | None:
    if name.startswith("/"):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "has a '..' component"
    return None


def _link_problem(member: tarfile.TarInfo) -> str | None:
    kind = "symlink" if member.issym() else "hardlink"
    target = member.linkname
    if target.startswith("/"):
        return f"is a {kind} to the absolute path {target!r}"
    # A symlink's target is relative to its own dir, a hardlink's to the archive's root.
    base = posixpath.dirname(member.name) if member.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        return f"is a {kind} to {target!r}, outside the archive's directory"
    return None


def _unsafe(archive: Path, source: str, member: str, reason: str) -> SourceError:
    return SourceError(
        f"{source}: refusing to extract {archive}: member {member!r} {reason}. Build the archive "
        f"from inside the model directory, with relative paths and links that stay in it "
        f"(e.g. `tar czf model.tar.gz -C /path/to/model .`)")


def _model_root(root: Path) -> Path:
    """`root`, or the one top dir an archive made with `tar czf model.tar.gz model/` has."""
    if any((root / name).is_file() for name in _MODEL_FILES):
        return root
    # Hidden entries do not count: macOS tar adds ._* files beside the dir.
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(visible) == 1 and visible[0].is_dir() and not visible[0].is_symlink():
        return visible[0]
    return root
