"""The one table from exception types to HTTP status codes, and the JSON error body.

Every error the front end returns goes through `error_body`, so clients always see
`{"code": N, "type": "...", "message": "..."}`.
"""

from __future__ import annotations

import json


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


class UnsupportedMediaType(LmcError):
    status, type = 415, "UnsupportedMediaType"


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


class PredictTimeout(LmcError):
    status, type = 504, "PredictTimeout"


class OutOfMemory(LmcError):
    status, type = 507, "OutOfMemory"


# HTTP status -> error type for errors that reach us as bare status codes (aiohttp's own
# HTTPException, or a worker response code). Kept next to the classes so the table is one place.
STATUS_TYPES: dict[int, str] = {
    400: BadRequest.type,
    404: RouteNotFound.type,
    405: MethodNotAllowed.type,
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


def error_body(status: int, message: str, type_: str | None = None) -> bytes:
    return json.dumps(
        {"code": status, "type": type_ or status_type(status), "message": message},
        ensure_ascii=False,
    ).encode()
