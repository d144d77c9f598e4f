"""s3:// model sources: every object under a prefix, mirrored into a local cache directory.

    s3://bucket/prefix[/]   -> $LMC_CACHE/s3/<name>-<sha of the URL>/  (keys relative to prefix)

The cache keeps a manifest of each object's ETag and size. A later start lists the prefix (one
LIST, no GET) and reuses the cache when nothing changed; otherwise it builds the new copy in a
temp directory next to the cache, taking unchanged files from the old copy and downloading only
changed or new objects, and renames it into place when complete, so a killed download never
leaves a half model that a later start would serve.

Downloads run concurrently: several objects at once, each through boto3's transfer manager
(multipart ranged GETs above `MULTIPART_THRESHOLD`), with a progress bar on a terminal and a
log line every few seconds (bytes, MB/s). Credentials, region and the endpoint come from the
standard AWS chain, including AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible stores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engines.sources.errors import SourceError

log = logging.getLogger("lmc.sources")

MANIFEST = ".lmc-manifest.json"  # {relative path: {"etag", "size"}}, written last
CONCURRENT_OBJECTS = 8
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
LOG_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class S3Object:
    key: str
    path: str  # relative to the prefix, POSIX separators
    etag: str
    size: int


def parse_url(url: str, *, single: bool = False) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix; the prefix is "" or ends with "/". With
    `single`, the URL names one object and the "prefix" is its key."""
    m = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if not m:
        raise SourceError(f"{url!r} is not an s3:// URL (s3://bucket/prefix)")
    bucket, prefix = m.group(1), m.group(2)
    if prefix and not prefix.endswith("/") and not single:
        prefix += "/"
    return bucket, prefix


def client():
    """An S3 client from the standard AWS chain (env, profile, role; AWS_ENDPOINT_URL[_S3])."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                            max_pool_connections=2 * CONCURRENT_OBJECTS))


def _explain(url: str, e: Exception) -> SourceError:
    """The boto error as what to change."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return SourceError(f"{url}: no AWS credentials found; give the container a role or set "
                           f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(e, EndpointConnectionError):
        return SourceError(f"{url}: cannot reach the S3 endpoint ({e}); check the network, "
                           f"AWS_REGION and AWS_ENDPOINT_URL_S3")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return SourceError(f"{url}: bucket {parse_url(url)[0]!r} does not exist; check the "
                               f"bucket name and region")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return SourceError(f"{url}: access denied ({code}); the credentials need "
                               f"s3:ListBucket on the bucket and s3:GetObject on the prefix")
        return SourceError(f"{url}: S3 error {code}: {e}")
    return SourceError(f"{url}: {type(e).__name__}: {e}")


def list_objects(s3: Any, url: str, *, single: bool = False) -> list[S3Object]:
    bucket, prefix = parse_url(url, single=single)
    objects = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", ()):
                key = o["Key"]
                if key.endswith("/") or (single and key != prefix):
                    continue  # a "folder" marker, or another object sharing the name's start
                path = key.rsplit("/", 1)[-1] if single else key[len(prefix):]
                objects.append(S3Object(key, _relative(url, path), o["ETag"].strip('"'),
                                        o["Size"]))
    except Exception as e:
        raise _explain(url, e) from None
    if not objects:
        raise SourceError(f"{url}: no objects under this prefix; check the path (it is "
                          f"case-sensitive) and that the upload finished")
    return objects


def _relative(url: str, path: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or any(p in ("..", "") for p in parts) or path.startswith("/"):
        raise SourceError(f"{url}: object key {path!r} would land outside the model directory")
    return path


def cache_dir_for(url: str, cache_root: Path) -> Path:
    name = re.sub(r"[^\w.-]", "_", url.rstrip("/").rsplit("/", 1)[-1]) or "bucket"
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    return cache_root / "s3" / f"{name}-{digest}"


def _manifest(objects: list[S3Object]) -> dict[str, dict[str, Any]]:
    return {o.path: {"etag": o.etag, "size": o.size} for o in objects}


def _read_manifest(target: Path) -> dict[str, dict[str, Any]] | None:
    try:
        return json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def fetch_prefix(url: str, cache_root: Path, *, s3: Any | None = None,
                 single: bool = False) -> Path:
    """The local copy of every object under `url` (with `single`: of the one object `url`
    names), downloading only what changed."""
    s3 = s3 or client()
    objects = list_objects(s3, url, single=single)
    target = cache_dir_for(url, cache_root)
    wanted = _manifest(objects)
    old = _read_manifest(target)
    if old == wanted:
        log.info("%s: cached copy in %s is current (%d objects)", url, target, len(objects))
        return target
    _remove_stale_temps(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        _build(url, s3, objects, old or {}, target, tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SourceError(f"{url}: disk full while downloading into {target.parent}; free "
                              f"space or point LMC_CACHE at a larger volume") from None
        raise
    _swap_into_place(tmp, target)
    return target


def _build(url: str, s3: Any, objects: list[S3Object], old: dict[str, dict[str, Any]],
           target: Path, tmp: Path) -> None:
    tmp.mkdir(parents=True)
    fetch = []
    for o in objects:
        dest = tmp / o.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        kept = target / o.path
        if old.get(o.path) == {"etag": o.etag, "size": o.size} and kept.is_file():
            _keep(kept, dest)  # unchanged: no GET
        else:
            fetch.append(o)
    reused = len(objects) - len(fetch)
    log.info("%s: downloading %d of %d objects (%.1f MB) into %s%s", url, len(fetch),
             len(objects), sum(o.size for o in fetch) / 1e6, target,
             f", {reused} unchanged kept" if reused else "")
    _download(url, s3, fetch, tmp)
    # Written last: its presence says every object arrived.
    (tmp / MANIFEST).write_text(json.dumps(_manifest(objects), indent=1, sort_keys=True))


def _keep(kept: Path, dest: Path) -> None:
    try:
        os.link(kept, dest)  # same inode: no copy
    except OSError:
        shutil.copy2(kept, dest)


def _download(url: str, s3: Any, objects: list[S3Object], tmp: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    bucket = parse_url(url)[0]
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                            multipart_chunksize=MULTIPART_CHUNK, max_concurrency=4)
    progress = _Progress(url, sum(o.size for o in objects))

    def one(o: S3Object) -> None:
        try:
            s3.download_file(bucket, o.key, str(tmp / o.path), Config=config,
                             Callback=progress.add)
        except OSError:
            raise
        except Exception as e:
            raise _explain(f"s3://{bucket}/{o.key}", e) from None

    try:
        with ThreadPoolExecutor(CONCURRENT_OBJECTS, thread_name_prefix="lmc-s3") as pool:
            for _ in pool.map(one, objects):
                pass
    finally:
        progress.close()


class _Progress:
    """Bytes so far: a bar on a terminal, a log line every LOG_EVERY_S seconds."""

    def __init__(self, url: str, total: int) -> None:
        self.url, self.total, self.done = url, total, 0
        self.start = self.last_log = time.monotonic()
        self._lock = threading.Lock()
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="downloading model")

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            now = time.monotonic()
            if now - self.last_log >= LOG_EVERY_S:
                self.last_log = now
                self._log(now)

    def _log(self, now: float) -> None:
        mb = self.done / 1e6
        log.info("%s: %.1f of %.1f MB (%.1f MB/s)", self.url, mb, self.total / 1e6,
                 mb / max(now - self.start, 1e-9))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.total:
            self._log(time.monotonic())


def _remove_stale_temps(target: Path) -> None:
    """Temp copies left by a process that died mid-download (never by a live one)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Replace `target` by the finished `tmp`; the old copy moves aside first, so at every
    instant the target is either the old complete copy, absent, or the new complete copy."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
