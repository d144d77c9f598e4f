"""Local emulation of the SageMaker runtime API (InvokeEndpoint and
InvokeEndpointWithResponseStream), so the real boto3 client works with `endpoint_url` pointed
at this server.

Wire facts (botocore's sagemaker-runtime service model, rest-json protocol):
- errors: the `x-amzn-ErrorType` header names the error shape; the JSON body holds its members.
  A non-2xx answer from the model is `ModelError` (424) with OriginalStatusCode/OriginalMessage.
- the response stream is a sequence of AWS event-stream messages, one `PayloadPart` event per
  chunk the model produced, written with chunked encoding (without it botocore buffers the
  whole stream). A failure mid-stream is a `ModelStreamError` exception message.
- stateful sessions: the request's SessionId is the X-Amzn-SageMaker-Session-Id header (the
  container sees it as is); InvokeEndpoint accepts NEW_SESSION or a session id, the streaming
  call only an id. The container answers a NEW_SESSION request with
  `X-Amzn-SageMaker-Session-Id: <id>; Expires=<time>`, which the platform returns as
  X-Amzn-SageMaker-New-Session-Id (NewSessionId); its X-Amzn-SageMaker-Closed-Session-Id comes
  back as is (ClosedSessionId).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import AsyncIterator

from aiohttp import web

from engines.contracts import errors as E
from engines.contracts.names import ADAPTER_HEADER
from container import invoke
from container.jobs import StreamEnd
from container.wlm import Model

# The platform names the variant; a local server has exactly one.
VARIANT = "AllTraffic"
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"

# botocore rejects messages with a payload over 24 MiB; a model's chunk larger than this is
# split over several PayloadParts, which clients must reassemble anyway.
MAX_PART_BYTES = 1 << 20

# Request headers the platform forwards to the container. Everything else (SigV4 signature,
# SDK user agent, ...) is the platform's business and stops here.
_FORWARDED = ("content-type", "accept")
_FORWARDED_PREFIX = "x-amzn-sagemaker-"
# The streaming API spells Accept this way so it cannot clash with the event-stream framing;
# the container sees it as Accept.
_STREAM_ACCEPT = "x-amzn-sagemaker-accept"
_CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
_COMPONENT = "X-Amzn-SageMaker-Inference-Component"
_SESSION_ID = "X-Amzn-SageMaker-Session-Id"
_NEW_SESSION_ID = "X-Amzn-SageMaker-New-Session-Id"
_CLOSED_SESSION_ID = "X-Amzn-SageMaker-Closed-Session-Id"
_NEW_SESSION = "NEW_SESSION"
# botocore's SessionIdHeader shape: at most 256 characters of this pattern.
_SESSION_ID_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")

# ---------------------------------------------------------------------------------------------
# Event-stream codec
# ---------------------------------------------------------------------------------------------

_PRELUDE = struct.Struct(">II")
_CRC = struct.Struct(">I")
_STRING_HEADER = 7  # header value type: UTF-8 string with a u16 length


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    assert len(n) < 256 and len(v) < 65536
    return bytes([len(n)]) + n + bytes([_STRING_HEADER]) + struct.pack(">H", len(v)) + v


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, prelude CRC32),
    headers, payload, CRC32 of everything before it."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    prelude = _PRELUDE.pack(12 + len(head) + len(payload) + 4, len(head))
    prelude += _CRC.pack(zlib.crc32(prelude))
    message = prelude + head + payload
    return message + _CRC.pack(zlib.crc32(message))


def payload_parts(data: bytes) -> bytes:
    """`data` as PayloadPart events (usually one)."""
    return b"".join(
        encode_message({":message-type": "event", ":event-type": "PayloadPart",
                        ":content-type": "application/octet-stream"},
                       data[i:i + MAX_PART_BYTES])
        for i in range(0, len(data), MAX_PART_BYTES))


def model_stream_error(message: str, error_code: str = "ModelStreamError") -> bytes:
    payload = json.dumps({"Message": message, "ErrorCode": error_code}).encode()
    return encode_message({":message-type": "exception", ":exception-type": "ModelStreamError",
                           ":content-type": "application/json"}, payload)


# ---------------------------------------------------------------------------------------------
# Errors in the runtime API's shape
# ---------------------------------------------------------------------------------------------


def _error(status: int, error_type: str, body: dict) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type=invoke.JSON_TYPE, headers={"x-amzn-ErrorType": error_type})


def validation_error(message: str) -> web.Response:
    return _error(400, "ValidationError", {"Message": message})


def model_error(endpoint: str, status: int, body: bytes) -> web.Response:
    """The platform's answer when the container answered non-2xx: 424 ModelError carrying the
    container's status and body."""
    original = body.decode("utf-8", errors="replace")
    kind = "client" if 400 <= status < 500 else "server"
    return _error(424, "ModelError", {
        "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
        "OriginalStatusCode": status,
        "OriginalMessage": original,
        "Message": f"Received {kind} error ({status}) from {VARIANT} with message "
                   f"\"{original}\". See the LMC server log for more information.",
        "LogStreamArn": f"arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/"
                        f"{endpoint}",
    })


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


class _Validation(Exception):
    """A request the platform itself would reject (ValidationError), before any model runs."""


def _resolve(request: web.Request) -> Model:
    """The endpoint name is a model name; with one model served any name reaches it, as a
    local stand-in for whatever endpoint name the client's code was written against."""
    mgr = request.app["models"]
    name = request.match_info["name"]
    target = request.headers.get("X-Amzn-SageMaker-Target-Model")
    for candidate in (target, name):
        if candidate and candidate in mgr.models:
            return mgr.models[candidate]
    if target:
        raise _Validation(f"target model {target!r} is not served by endpoint {name!r}")
    if len(mgr.models) == 1:
        return next(iter(mgr.models.values()))
    if not mgr.models:
        raise E.ModelNotReady(f"endpoint {name!r} has no model loaded yet; retry later")
    raise _Validation(f"Endpoint {name} not found; served models: {', '.join(sorted(mgr.models))}")


def _properties(request: web.Request, *, stream: bool) -> dict[str, str]:
    props = {}
    for k, v in request.headers.items():
        low = k.lower()
        if stream and low == _STREAM_ACCEPT:
            props["Accept"] = v
        elif low in _FORWARDED or low.startswith(_FORWARDED_PREFIX):
            props[k] = v
    return props


def _with_component(model: Model, props: dict[str, str]) -> dict[str, str]:
    """InferenceComponentName (X-Amzn-SageMaker-Inference-Component): on SageMaker an adapter
    inference component serves one LoRA adapter on its base component; here a component named
    after an adapter selects it, one named after the model is the base model."""
    component = next((v for k, v in props.items() if k.lower() == _COMPONENT.lower()), None)
    if not component or component == model.name:
        return props
    if component not in model.adapters.adapters:
        known = ", ".join([model.name, *sorted(model.adapters.adapters)])
        raise _Validation(f"Inference component {component} not found on endpoint "
                          f"{model.name}; components: {known}")
    return {**props, ADAPTER_HEADER: component}


def _check_session_id(request: web.Request, *, stream: bool) -> None:
    """SessionId as the platform validates it; only InvokeEndpoint may create a session."""
    given = request.headers.get(_SESSION_ID)
    if given is None or (given == _NEW_SESSION and not stream):
        return
    if given == _NEW_SESSION:
        raise _Validation("SessionId=NEW_SESSION is for InvokeEndpoint only: "
                          "InvokeEndpointWithResponseStream cannot start a session; start it "
                          "with InvokeEndpoint, then stream with the id it returns")
    if len(given) > 256 or not _SESSION_ID_PATTERN.fullmatch(given):
        raise _Validation(f"1 validation error detected: Value {given!r} at 'sessionId' failed "
                          f"to satisfy constraint: Member must satisfy regular expression "
                          f"pattern: {_SESSION_ID_PATTERN.pattern} (at most 256 characters)")


def _success_headers(request: web.Request, inv: invoke.Invocation) -> dict[str, str]:
    headers = {"x-Amzn-Invoked-Production-Variant": VARIANT}
    attrs = inv.header(_CUSTOM_ATTRIBUTES)
    if attrs is not None:
        headers[_CUSTOM_ATTRIBUTES] = attrs
    new_session = inv.header(_SESSION_ID)
    if new_session and request.headers.get(_SESSION_ID) == _NEW_SESSION:
        headers[_NEW_SESSION_ID] = new_session  # "<id>; Expires=<time>", as the model set it
    closed = inv.header(_CLOSED_SESSION_ID)
    if closed:
        headers[_CLOSED_SESSION_ID] = closed
    return headers


async def _start(request: web.Request, *, stream: bool) -> invoke.Invocation | web.Response:
    """Submit the request; an early failure comes back as the runtime API's error response."""
    name = request.match_info["name"]
    try:
        _check_session_id(request, stream=stream)
        model = _resolve(request)
        return await invoke.submit(request, model, _with_component(
            model, _properties(request, stream=stream)))
    except _Validation as e:
        return validation_error(str(e))
    except E.LmcError as e:
        # Our own refusals (queue full, too large, timeout) are what the container would have
        # answered, so the platform reports them as ModelError with the container's status.
        return model_error(name, e.status, E.error_body(e.status, e.message, e.type))


async def invoke_endpoint(request: web.Request) -> web.StreamResponse:
    inv = await _start(request, stream=False)
    if isinstance(inv, web.Response):
        return inv
    body = await inv.collect()  # InvokeEndpoint has no streaming: a streamed answer is buffered
    if not inv.ok:
        return model_error(request.match_info["name"], inv.response.code, body)
    headers = _success_headers(request, inv)
    headers["Content-Type"] = inv.content_type()
    return web.Response(status=200, body=body, headers=headers)


async def invoke_endpoint_with_response_stream(request: web.Request) -> web.StreamResponse:
    inv = await _start(request, stream=True)
    if isinstance(inv, web.Response):
        return inv
    if not inv.ok:
        return model_error(request.match_info["name"], inv.response.code, await inv.collect())
    headers = _success_headers(request, inv)
    headers["X-Amzn-SageMaker-Content-Type"] = inv.content_type()
    headers["Content-Type"] = EVENT_STREAM_TYPE
    out = web.StreamResponse(status=200, headers=headers)
    return await invoke.send_stream(request, inv, out, _events(inv))


async def _events(inv: invoke.Invocation) -> AsyncIterator[bytes]:
    """One PayloadPart per chunk as the model produces it; a failure becomes ModelStreamError."""
    failed = False
    async for chunk in inv.chunks():
        if isinstance(chunk, StreamEnd):
            if chunk.error is not None and not failed:
                yield model_stream_error(chunk.error)
            return
        if failed:  # nothing may follow the exception message; wait for the End quietly
            continue
        head, error = split_error_line(chunk)
        if head:
            yield payload_parts(head)
        if error is not None:
            yield model_stream_error(error)
            failed = True


def split_error_line(chunk: bytes) -> tuple[bytes, str | None]:
    """(bytes before, message) when the chunk ends with the handler's final error item (DESIGN
    §5: a JSON line with finish_reason "error" or an "error" member, bare or as an SSE `data:`
    event, possibly followed by `data: [DONE]`), else (chunk, None)."""
    if b"error" not in chunk:  # cheap test first: this runs on every token
        return chunk, None
    lines = chunk.splitlines(keepends=True)
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if not line or line == b"data: [DONE]":
            continue
        if line.startswith(b"data:"):
            line = line[5:].strip()
        try:
            obj = json.loads(line)
        except ValueError:
            return chunk, None
        if not isinstance(obj, dict):
            return chunk, None
        details = obj.get("details") if isinstance(obj.get("details"), dict) else {}
        err = obj.get("error")
        if not err and "error" not in (obj.get("finish_reason"), details.get("finish_reason")):
            return chunk, None
        if isinstance(err, dict):
            err = err.get("message")
        message = err or details.get("error") or "the model's stream failed"
        return b"".join(lines[:i]), str(message)
    return chunk, None


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/endpoints/{name}/invocations", invoke_endpoint)
    router.add_post("/endpoints/{name}/invocations-response-stream",
                    invoke_endpoint_with_response_stream)
