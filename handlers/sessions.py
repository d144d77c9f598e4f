"""SageMaker stateful sessions with DJL's API (`djl_python.session_manager`,
`djl_python.session_utils` and `from djl_python import SessionManager` are this module).

A session is a directory `<sessions_path>/<uuid>` holding one file per key (pickled values, or a
raw array for `get_as_numpy`), plus `.expiration_ts`, the time it expires. Everything a session
is lives on disk, so every worker process of a model sees every session: one worker creates it,
another serves the next request that names it, a third closes it. The in-process dict is only a
cache of Session objects; whether a session exists is always asked of the directory.

What differs from DJL, keeping its API:
  - a session created by another worker (or process) is found: looked up on disk, not only in
    this process's dict; a session closed elsewhere is gone here too;
  - a session appears atomically (built under a staging name, then renamed), so a concurrent
    cleaner never sees one half made; values are written to a temp file and renamed in;
  - an id that is not a UUID is "not found" (never used as a path);
  - "not found" is `SessionNotFound` (a ValueError carrying `session_id`, 404), an expired
    session the default LLM handler is asked to use is `SessionExpired` (410), and a close
    without an id is a ValidationError (400) whose message says "invalid session_id";
  - no S3 backup (option.sessions_s3url is accepted and ignored, with a warning).

The default LLM handler's use of it (requestType NEW_SESSION / CLOSE, the session header on
other requests) is `LLMSessions` at the bottom.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from engines.contracts.errors import LmcError, SessionExpired, SessionNotFound, ValidationError
from handlers.inputs import Input, batch_key
from handlers.outputs import Output

logger = logging.getLogger(__name__)

HEADER_SAGEMAKER_SESSION_ID = "X-Amzn-SageMaker-Session-Id"
HEADER_SAGEMAKER_CLOSED_SESSION_ID = "X-Amzn-SageMaker-Closed-Session-Id"
# The session id a client sends (SessionId="NEW_SESSION") to ask for a new session.
NEW_SESSION = "NEW_SESSION"
CLOSE = "CLOSE"
REQUEST_TYPES = (NEW_SESSION, CLOSE)

DEFAULT_EXPIRATION_S = 20 * 60
_EXPIRATION_KEY = ".expiration_ts"
_UUID = re.compile(r"[0-9a-f-]{36}")
# Prefixes of directories that are not (yet, or any more) sessions.
_STAGING, _CLOSING = ".creating-", ".closing-"
# A staging or closing directory older than this was left by a process that died mid-way.
_STALE_S = 60.0

__all__ = ["HEADER_SAGEMAKER_CLOSED_SESSION_ID", "HEADER_SAGEMAKER_SESSION_ID", "Session",
           "SessionExpired", "SessionManager", "SessionNotFound", "close_session",
           "create_session", "get_session", "session_non_stream_output_formatter"]


def default_sessions_path() -> str:
    """DJL's default: shared memory when the machine has it, else the temp dir."""
    if os.path.isdir("/dev/shm"):
        return "/dev/shm/djl_sessions"
    return os.path.join(tempfile.gettempdir(), "djl_sessions")


def session_id_of(value: str | None) -> str | None:
    """The id in a session header value: the header a container answers with is
    `<id>; Expires=<time>`, and a client may send it back whole."""
    if value is None:
        return None
    return value.split(";", 1)[0].strip()


def expires_text(expiration_ts: float) -> str:
    """The Expires= time SageMaker's session header carries (UTC, ISO 8601, seconds)."""
    return datetime.fromtimestamp(expiration_ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def session_header(session: Session) -> str:
    return f"{session.session_id}; Expires={expires_text(session.expiration_ts)}"


def _read_pickle(path: str, default: Any = None) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return default


def _write_pickle(path: str, value: Any) -> None:
    """Write-then-rename, so a reader in another worker sees the old value or the new one."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(value, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Session:
    """One session's files. `put`/`get` store any picklable value under a key; `get_as_numpy`
    maps a key's file as an array, which a handler updates in place."""

    def __init__(self, session_id: str, session_root: str,
                 expiration_ts: float | None = None) -> None:
        self.session_id = session_id
        self.files_path = os.path.join(session_root, session_id)
        self.expiration_ts = expiration_ts
        if self.expiration_ts is None:
            self.expiration_ts = self.get(_EXPIRATION_KEY)

    def put(self, key: str, value: Any) -> None:
        self._require_dir()
        _write_pickle(self._path(key), value)

    def get(self, key: str, d: Any = None) -> Any:
        return _read_pickle(self._path(key), d)

    def get_as_numpy(self, key: str, shape, dtype=None, create: bool = False):
        """The key's file as a writable numpy memmap of `shape` (float32 unless `dtype`);
        `create` starts it zero-filled."""
        import numpy as np

        path = self._path(key)
        if create:
            self._require_dir()
            open(path, "wb").close()
        return np.memmap(path, dtype=np.float32 if dtype is None else dtype, mode="r+",
                         shape=shape)

    def is_expired(self, now: float | None = None) -> bool:
        return self.expiration_ts is not None and (now or time.time()) > self.expiration_ts

    def exists(self) -> bool:
        return os.path.isdir(self.files_path)

    def remove(self) -> bool:
        """Delete the session's files. The directory is renamed away first, so other workers
        stop seeing the session at once, and two closes racing cannot both succeed."""
        root, name = os.path.split(self.files_path)
        doomed = os.path.join(root, f"{_CLOSING}{name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.files_path, doomed)
        except FileNotFoundError:
            raise SessionNotFound(self.session_id) from None
        logger.info("closing session: %s", self.session_id)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _require_dir(self) -> None:
        if not self.exists():
            raise SessionNotFound(self.session_id)

    def _path(self, key: str) -> str:
        return os.path.join(self.files_path, key.replace("/", "-"))

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, expiration_ts={self.expiration_ts!r})"


class SessionManager:
    """DJL's SessionManager. `properties`: the handler's init properties, of which it reads
    sessions_path (default /dev/shm/djl_sessions, or <tmp>/djl_sessions) and
    sessions_expiration (seconds, default 1200)."""

    def __init__(self, properties: dict) -> None:
        self.expiration = float(properties.get("sessions_expiration", DEFAULT_EXPIRATION_S))
        if self.expiration.is_integer():
            self.expiration = int(self.expiration)
        self.sessions_path = str(properties.get("sessions_path") or default_sessions_path())
        self.sessions_s3url = properties.get("sessions_s3url")
        if self.sessions_s3url:
            logger.warning("sessions_s3url=%s is ignored: LMC keeps sessions in %s only (no S3 "
                           "backup or restore)", self.sessions_s3url, self.sessions_path)
        # A cache: a session is whatever the directory holds (other workers add and remove).
        self.sessions: dict[str, Session] = {}
        os.makedirs(self.sessions_path, exist_ok=True)

    def create_session(self) -> Session:
        """A new session (cleaning expired ones first, as DJL does)."""
        self._clean_expired_session()
        session_id = str(uuid.uuid4())
        expiration_ts = time.time() + self.expiration
        staging = os.path.join(self.sessions_path, _STAGING + session_id)
        os.makedirs(staging)
        _write_pickle(os.path.join(staging, _EXPIRATION_KEY), expiration_ts)
        session = Session(session_id, self.sessions_path, expiration_ts)
        os.rename(staging, session.files_path)
        self.sessions[session_id] = session
        logger.info("created session %s (expires %s)", session_id, expires_text(expiration_ts))
        return session

    def get_session(self, session_id: str | None) -> Session | None:
        """The live session named by `session_id`; None for no id, NEW_SESSION, or a session
        that has expired (DJL's contract). An id no session has: SessionNotFound."""
        session_id = session_id_of(session_id)
        if not session_id or session_id == NEW_SESSION:
            return None
        session = self.find(session_id)
        if session.is_expired():
            logger.info("session expired: %s", session_id)
            return None
        return session

    def find(self, session_id: str) -> Session:
        """The session with this id, expired or not (LMC); SessionNotFound when there is none,
        in this worker or any other."""
        session_id = session_id_of(session_id) or ""
        if not _UUID.fullmatch(session_id):
            raise SessionNotFound(session_id)
        if not os.path.isdir(os.path.join(self.sessions_path, session_id)):
            self.sessions.pop(session_id, None)  # closed or cleaned by another worker
            raise SessionNotFound(session_id)
        session = self.sessions.get(session_id)
        if session is None:  # created by another worker
            session = self.sessions[session_id] = Session(session_id, self.sessions_path)
        return session

    def close_session(self, session_id: str | None) -> None:
        session_id = session_id_of(session_id)
        if not session_id:
            raise ValidationError(HEADER_SAGEMAKER_SESSION_ID,
                                  f"invalid session_id: {session_id!r}; name the session to "
                                  f"close in the {HEADER_SAGEMAKER_SESSION_ID} header")
        session = self.find(session_id)
        try:
            session.remove()
        finally:
            self.sessions.pop(session.session_id, None)

    def _clean_expired_session(self) -> None:
        """Remove every expired session in the directory (whoever created it), and what a
        process that died while creating or closing one left behind."""
        now = time.time()
        try:
            names = os.listdir(self.sessions_path)
        except FileNotFoundError:
            os.makedirs(self.sessions_path, exist_ok=True)
            return
        for name in names:
            path = os.path.join(self.sessions_path, name)
            if name.startswith((_STAGING, _CLOSING)):
                try:
                    if now - os.path.getmtime(path) > _STALE_S:
                        shutil.rmtree(path, ignore_errors=True)
                except OSError:
                    pass
                continue
            if not _UUID.fullmatch(name) or not os.path.isdir(path):
                continue
            session = self.sessions.get(name) or Session(name, self.sessions_path)
            if session.expiration_ts is None or session.is_expired(now):
                try:
                    session.remove()
                except SessionNotFound:
                    pass  # another worker cleaned it first
                self.sessions.pop(name, None)


# ---- djl_python.session_utils: the request-level helpers LMI's async handlers use ----------


def _error_code(exc: BaseException) -> int:
    return exc.status if isinstance(exc, LmcError) else 424


async def create_session(request) -> dict:
    """`request` is (session_manager, inputs). A dict for session_non_stream_output_formatter:
    "data" and "properties" (the session header), or "error" and "code"."""
    session_manager, _inputs = request
    try:
        session = session_manager.create_session()
    except Exception as e:
        logger.exception("creating a session failed")
        return {"error": f"Failed to create session: {e}", "code": _error_code(e)}
    return {"data": {"result": f"Session {session.session_id} created"},
            "properties": {HEADER_SAGEMAKER_SESSION_ID: session_header(session)}}


async def close_session(request) -> dict:
    """`request` is (session_manager, inputs); closes the session the inputs' header names."""
    session_manager, inputs = request
    session_id = session_id_of(inputs.get_property(HEADER_SAGEMAKER_SESSION_ID))
    try:
        session_manager.close_session(session_id)
    except Exception as e:
        return {"error": f"Failed to close session: {e}", "code": _error_code(e)}
    logger.info("session %s closed", session_id)
    return {"data": {"result": f"Session {session_id} closed"},
            "properties": {HEADER_SAGEMAKER_CLOSED_SESSION_ID: session_id}}


def get_session(session_manager: SessionManager | None, request: Input) -> Session | None:
    """The session a request's header names (SessionManager.get_session); with sessions off
    (no manager), a request that names one is refused."""
    session_id = request.get_property(HEADER_SAGEMAKER_SESSION_ID)
    if session_manager is None:
        if session_id is not None:
            raise ValidationError(HEADER_SAGEMAKER_SESSION_ID,
                                  f"stateful sessions are not enabled, so the "
                                  f"{HEADER_SAGEMAKER_SESSION_ID} header is not supported")
        return None
    return session_manager.get_session(session_id)


def session_non_stream_output_formatter(response: dict, **_: Any) -> Output:
    """create_session's or close_session's dict as the Output an async handler returns: one
    last frame (Output.binary_encode) with the JSON data, the session headers as properties."""
    out = Output()
    out.add_property("Content-Type", "application/json")
    if "error" in response:
        frame = {"data": "\n", "last": True, "error": response["error"],
                 "code": response.get("code") or 424}
    else:
        for key, value in (response.get("properties") or {}).items():
            out.add_property(key, value)
        frame = {"data": json.dumps(response["data"], ensure_ascii=False) + "\n", "last": True}
    out.add(Output.binary_encode(frame))
    return out


# ---- the default LLM handler's sessions ------------------------------------------------------


@dataclass
class SessionAnswer:
    """The answer to a NEW_SESSION or CLOSE request: a JSON body and the session headers."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def add_to(self, output: Output, index: int | None) -> None:
        """Add this answer to `output`, as batch item `index` (None: the only request)."""
        output.add_as_json(self.body, batch_index=index)
        headers = {"content-type": "application/json", **self.headers}
        for key, value in headers.items():
            output.add_property(key if index is None else batch_key(index, key), value)


class LLMSessions:
    """Stateful sessions for the default LLM handler (option.enable_stateful_sessions, on by
    default as in LMI). A body {"requestType": "NEW_SESSION"} creates a session, answered with
    `X-Amzn-SageMaker-Session-Id: <id>; Expires=<time>`; {"requestType": "CLOSE"} closes the
    session its header names, answered with X-Amzn-SageMaker-Closed-Session-Id. Any other
    request that names a session must name a live one: unknown is a 404, expired a 410. A
    request without the header is not looked at. The manager (and its directory) is made on
    the first request that needs it."""

    def __init__(self, enabled: bool = True, sessions_path: str | None = None,
                 sessions_expiration: float = DEFAULT_EXPIRATION_S) -> None:
        self.enabled = enabled
        self._properties = {"sessions_path": sessions_path,
                            "sessions_expiration": sessions_expiration}
        self._manager: SessionManager | None = None

    @classmethod
    def from_options(cls, options: Any) -> LLMSessions:
        """From the handler's options (engines.options.HandlerOptions)."""
        return cls(getattr(options, "enable_stateful_sessions", True),
                   getattr(options, "sessions_path", None),
                   getattr(options, "sessions_expiration", DEFAULT_EXPIRATION_S))

    @property
    def manager(self) -> SessionManager:
        if self._manager is None:
            self._manager = SessionManager(self._properties)
        return self._manager

    def answer(self, item: Input, *, lmi: bool = True) -> SessionAnswer | None:
        """For one request: its SessionAnswer when it is NEW_SESSION or CLOSE (only on LMI's
        own schema, `lmi`), else None once its session header (if any) checks out. Raises
        SessionNotFound (404), SessionExpired (410) or ValidationError (400)."""
        request_type = _request_type(item) if lmi else None
        header = item.get_property(HEADER_SAGEMAKER_SESSION_ID)
        session_id = session_id_of(header)
        if not self.enabled:
            if request_type is not None or header is not None:
                what = f"requestType {request_type}" if request_type is not None \
                    else f"the {HEADER_SAGEMAKER_SESSION_ID} header"
                raise ValidationError(
                    "requestType" if request_type is not None else HEADER_SAGEMAKER_SESSION_ID,
                    f"stateful sessions are disabled (option.enable_stateful_sessions=false), "
                    f"so {what} is not supported")
            return None
        if request_type == NEW_SESSION:
            session = self.manager.create_session()
            return SessionAnswer(
                {"result": f"Session {session.session_id} created",
                 "session_id": session.session_id,
                 "expires": expires_text(session.expiration_ts)},
                {HEADER_SAGEMAKER_SESSION_ID: session_header(session)})
        if request_type == CLOSE:
            self.manager.close_session(session_id)
            return SessionAnswer({"result": f"Session {session_id} closed",
                                  "session_id": session_id},
                                 {HEADER_SAGEMAKER_CLOSED_SESSION_ID: session_id})
        if session_id and session_id != NEW_SESSION:
            self.require(session_id)
        return None

    def require(self, session_id: str) -> Session:
        """The live session `session_id`; SessionNotFound or SessionExpired otherwise."""
        session = self.manager.find(session_id)
        if session.is_expired():
            raise SessionExpired(session_id, (
                f"session {session_id} expired at {expires_text(session.expiration_ts)} "
                f"(sessions last {self.manager.expiration} s, option.sessions_expiration); "
                f'start a new one with {{"requestType": "{NEW_SESSION}"}}'))
        return session


def _request_type(item: Input) -> str | None:
    """The body's "requestType", when the body is a JSON object that has one. A request type
    other than NEW_SESSION or CLOSE is a ValidationError."""
    raw = item.get_as_bytes()
    if not raw or b"requestType" not in raw:  # cheap test first: this runs on every request
        return None
    content_type = (item.get_property("content-type") or "").lower()
    if content_type.startswith("text/"):
        return None
    try:
        body = json.loads(bytes(raw))
    except (ValueError, RecursionError):
        return None  # the handler's own parser reports the bad JSON
    # As LMI: a body with a prompt is a generation request whatever else it holds.
    if not isinstance(body, dict) or "requestType" not in body or \
            any(k in body for k in ("prompt", "inputs", "messages")):
        return None
    value = body["requestType"]
    if value not in REQUEST_TYPES:
        raise ValidationError("requestType", f"requestType must be one of "
                                             f"{', '.join(REQUEST_TYPES)}, got {value!r}")
    return value
