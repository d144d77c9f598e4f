"""The one table from exceptions to HTTP status codes and error types, and the one JSON error
body, shared by the front end and the worker.

Every error body goes through `error_body`, so clients always see
`{"code": N, "type": "...", "message": "..."}`, plus "field" when a request field is at fault,
and "error" (the message again) on a handler's failure, where LMI's clients read it. The same mistake has the same `type` on every route: an invalid JSON body is a
`ValidationError` whether the front end or the handler finds it.

    LmcError subclasses   status and type of errors we raise (front end or worker)
    ValidationError       400, a request value the client can fix (raised by parsers/engines)
    handler_error()       any exception out of a handler: LmcError as is, out of memory 507,
                          anything else 424 ModelError (SageMaker shows it as ModelError)
"""

from __future__ import annotations

import json
from collections.abc import Callable


class LmcError(Exception):
    """Base of every error a request can end with. Subclasses only set `status` and `type`."""

    status = 500
    type = "InternalServerError"
    headers: dict[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(LmcError):
    status, type = 400, "BadRequest"


class ValidationError(LmcError, ValueError):
    """A request value a user can fix; `field` names it so the 400 body can point at it."""

    status, type = 400, "ValidationError"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def invalid_json(exc: ValueError | RecursionError) -> ValidationError:
    """The error for a body that does not parse as JSON, on every route."""
    if isinstance(exc, RecursionError):
        return ValidationError("body", "the body's JSON is nested too deeply to parse")
    return ValidationError(
        "body", f'the body is not valid JSON ({exc}); send {{"inputs": "text", "parameters": '
                f'{{}}}} (or, on /v1/*, an OpenAI request), or use Content-Type: text/plain')


def parse_json(data: bytes | str):
    """A request body as JSON; a ValidationError (400) for anything that does not parse, also
    for nesting deep enough to exhaust the parser's recursion limit."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise invalid_json(e) from None


class UnsupportedMediaType(LmcError):
    status, type = 415, "UnsupportedMediaType"


class Forbidden(LmcError):
    status, type = 403, "Forbidden"


class ModelNotFound(LmcError):
    status, type = 404, "ModelNotFound"


class RouteNotFound(LmcError):
    status, type = 404, "ResourceNotFound"


class MethodNotAllowed(LmcError):
    status, type = 405, "MethodNotAllowed"


class Conflict(LmcError):
    status, type = 409, "Conflict"


class PayloadTooLarge(LmcError):
    status, type = 413, "PayloadTooLarge"


class ModelFailure(LmcError):
    """The handler or model raised; LMI answers 424 so SageMaker surfaces it as ModelError."""

    status, type = 424, "ModelError"


class WorkerDied(LmcError):
    status, type = 500, "WorkerDied"


class ServiceUnavailable(LmcError):
    status, type = 503, "ServiceUnavailable"
    headers = {"Retry-After": "1"}


class QueueFull(ServiceUnavailable):
    type = "QueueFull"


class ModelNotReady(ServiceUnavailable):
    type = "ModelNotReady"


class RequestTimeout(LmcError):
    """The client did not send its whole body in time (a stalled or lying Content-Length)."""

    status, type = 408, "RequestTimeout"


class ClientGone(LmcError):
    """The client closed its connection before the answer started (nobody reads the reply;
    499 is nginx's code for it, logged, never sent)."""

    status, type = 499, "ClientClosedRequest"


class PredictTimeout(LmcError):
    status, type = 504, "PredictTimeout"


class OutOfMemory(LmcError):
    status, type = 507, "OutOfMemory"


# ---- LoRA adapters ----------------------------------------------------------------------------


class AdapterNotFound(LmcError):
    """A request or management call named an adapter this model does not have."""

    status, type = 404, "AdapterNotFound"


class InvalidAdapter(ValidationError):
    """An adapter LMC cannot apply (DoRA, modules_to_save, a shape that does not fit the base
    model, ...): refused at registration, naming the field, never served as the base model."""

    type = "InvalidAdapter"


class NoAdapterSlot(OutOfMemory):
    """Every adapter slot is pinned (or the host cache is full of pinned adapters)."""

    type = "NoAdapterSlot"


# ---- SageMaker stateful sessions (handlers/sessions.py) ----------------------------------------


class SessionNotFound(LmcError, ValueError):
    """A request named a session (X-Amzn-SageMaker-Session-Id) that does not exist: never
    created, closed, or cleaned away after it expired. A ValueError, as DJL raises for it."""

    status, type = 404, "SessionNotFound"

    def __init__(self, session_id: str | None, message: str | None = None) -> None:
        super().__init__(message or f"session not found: {session_id}")
        self.session_id = session_id


class SessionExpired(SessionNotFound):
    """The session exists but its expiration time has passed; the message says when."""

    status, type = 410, "SessionExpired"


# HTTP status -> error type for errors that reach us as bare status codes (aiohttp's own
# HTTPException, or a worker response code). Kept next to the classes so the table is one place.
STATUS_TYPES: dict[int, str] = {
    400: BadRequest.type,
    403: Forbidden.type,
    404: RouteNotFound.type,
    405: MethodNotAllowed.type,
    408: RequestTimeout.type,
    409: Conflict.type,
    413: PayloadTooLarge.type,
    415: UnsupportedMediaType.type,
    424: ModelFailure.type,
    500: LmcError.type,
    503: ServiceUnavailable.type,
    504: PredictTimeout.type,
    507: OutOfMemory.type,
}


def status_type(status: int) -> str:
    return STATUS_TYPES.get(status, "ClientError" if 400 <= status < 500 else "ServerError")


def error_body(status: int, message: str, type_: str | None = None, *,
               field: str | None = None, lmi: bool = False) -> bytes:
    """`lmi`: also under "error", as LMI's handler failures carry it."""
    body = {"code": status, "type": type_ or status_type(status), "message": message}
    if field is not None:
        body["field"] = field
    if lmi:
        body["error"] = message
    return json.dumps(body, ensure_ascii=False).encode()


def exception_body(exc: LmcError) -> bytes:
    return error_body(exc.status, exc.message, exc.type, field=getattr(exc, "field", None))


# ---- exceptions out of a handler or engine ---------------------------------------------------


def _is_out_of_memory(exc: BaseException) -> bool:
    # By class name, so torch.cuda.OutOfMemoryError is recognised without importing torch.
    return isinstance(exc, MemoryError) or any(
        "OutOfMemory" in cls.__name__ for cls in type(exc).__mro__)


# (matches, status, type, HTTP reason), first match wins; the message is the exception's own.
_HANDLER_ERRORS: tuple[tuple[Callable[[BaseException], bool], int, str, str], ...] = (
    (lambda e: isinstance(e, ValidationError), 400, ValidationError.type, "Bad Request"),
    (lambda e: isinstance(e, AdapterNotFound), 404, AdapterNotFound.type, "Not Found"),
    (lambda e: isinstance(e, SessionExpired), 410, SessionExpired.type, "Gone"),
    (lambda e: isinstance(e, SessionNotFound), 404, SessionNotFound.type, "Not Found"),
    (lambda e: isinstance(e, NoAdapterSlot), 507, NoAdapterSlot.type, "no free adapter slot"),
    (lambda e: isinstance(e, Conflict), 409, Conflict.type, "Conflict"),
    (_is_out_of_memory, 507, OutOfMemory.type, "out of memory"),
)
_DEFAULT_HANDLER_ERROR = (424, ModelFailure.type, "prediction failure")


def handler_error(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, HTTP reason) for an exception raised by a handler or its engine."""
    for matches, status, type_, reason in _HANDLER_ERRORS:
        if matches(exc):
            # A subclass keeps its own type (InvalidAdapter is a ValidationError).
            return status, getattr(exc, "type", type_) if isinstance(exc, LmcError) else type_, reason
    return _DEFAULT_HANDLER_ERROR


# ---- the same table in TGI's terms -----------------------------------------------------------

# TGI's (and LoRAX's) routes answer errors as {"error": message, "error_type": t} with TGI's
# status codes; their clients pick their exception class from error_type (ValidationError,
# OverloadedError, GenerationError). Our status -> (TGI status, error_type).
_TGI_ERRORS: dict[int, tuple[int, str]] = {
    400: (422, "validation"),
    413: (413, "validation"),
    415: (415, "validation"),
    503: (429, "overloaded"),  # queue full, loading: retry later (Retry-After is kept)
    424: (424, "generation"),
    500: (500, "generation"),
    507: (507, "generation"),
}


def tgi_error(status: int, message: str, type_: str | None = None, *,
              field: str | None = None) -> tuple[int, bytes]:
    """(status, body) of our error in TGI's shape, keeping our `type` (and `field`) next to
    TGI's keys, so the same mistake still has the same type on every route. Statuses TGI has
    no error_type for (404, 405, 409, 504) keep their code, which the clients map by status."""
    tgi_status, error_type = _TGI_ERRORS.get(status, (status, None))
    body: dict = {"error": message, "type": type_ or status_type(status)}
    if error_type is not None:
        body["error_type"] = error_type
    if field is not None:
        body["field"] = field
    return tgi_status, json.dumps(body, ensure_ascii=False).encode()
