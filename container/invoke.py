"""Job plumbing shared by every inference route: read the body, submit one job, and hand back
the worker's answer as a plain response or as a stream of chunks.

Routes differ only in which properties they add and how they frame the answer (as is for
/invocations, AWS event-stream messages for the SageMaker runtime emulation), so the framing is
a parameter here, not a copy of this loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from engines.contracts import errors as E
from engines.contracts import protocol as P
from engines.contracts.names import FUNCTION_PROPERTY
from engines.logs import REQUEST_ID_PROPERTY, TRACE_ID_PROPERTY
from container.jobs import Job, StreamEnd, new_request_item, stream_chunks
from container.observe import JOB_KEY, MODEL_KEY, worker_properties
from container.wlm import Model

JSON_TYPE = "application/json"

# Headers a client may use to pick the model on /invocations.
MODEL_HEADERS = ("X-Amzn-SageMaker-Target-Model", "X-Model-Name")


def select_model(request: web.Request) -> Model:
    """The model named by ?model_name= or a model header, else the only one served."""
    mgr = request.app["models"]
    name = request.query.get("model_name")
    if name is None:
        for h in MODEL_HEADERS:
            name = request.headers.get(h)
            if name:
                break
    return mgr.get(name) if name else mgr.default()


def _too_large(limit: int) -> E.PayloadTooLarge:
    return E.PayloadTooLarge(f"request body is larger than max_request_size ({limit} bytes); "
                             f"raise SAGEMAKER_MAX_REQUEST_SIZE to accept it")


async def read_body(request: web.Request) -> bytes:
    """The whole body, within max_request_size (413, from the Content-Length at once) and
    within LMC_BODY_TIMEOUT (408): a client that announces more than it sends, or trickles it,
    must not hold a request open forever."""
    server = request.app["server_config"]
    if request.content_length is not None and request.content_length > server.max_request_size:
        raise _too_large(server.max_request_size)
    try:
        async with asyncio.timeout(server.body_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise _too_large(server.max_request_size) from e
    except TimeoutError:
        raise E.RequestTimeout(f"the request body did not arrive within {server.body_timeout_s:g}"
                               f" s (LMC_BODY_TIMEOUT)") from None


@dataclass(slots=True)
class Invocation:
    """A submitted job and the worker's first response frame."""

    model: Model
    job: Job
    response: P.Response

    @property
    def ok(self) -> bool:
        return 200 <= self.response.code < 300

    def content_type(self) -> str:
        for k, v in self.response.headers.items():
            if k.lower() == "content-type":
                return v
        # Handlers that set no content type mostly return JSON; sniff rather than mislabel it.
        body = self.response.body
        if body[:1] in (b"{", b"["):
            return JSON_TYPE
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:  # tensors, images, audio: bytes, not text
            return "application/octet-stream"
        return "text/plain; charset=utf-8"

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.response.headers.items() if k.lower() == name), None)

    async def chunks(self) -> AsyncIterator[bytes | StreamEnd]:
        """Every byte of the answer in order; a stream ends with its StreamEnd."""
        if self.response.body:
            yield self.response.body
        if self.response.stream:
            async for chunk in stream_chunks(self.job):
                yield chunk

    async def collect(self) -> bytes:
        """The whole answer as one body; a broken stream ends with the error line."""
        parts = []
        async for chunk in self.chunks():
            if isinstance(chunk, StreamEnd):
                if chunk.error is not None:
                    parts.append(stream_error_line(chunk.error))
                break
            parts.append(chunk)
        return b"".join(parts)


_NOT_FORWARDED = frozenset({FUNCTION_PROPERTY, REQUEST_ID_PROPERTY, TRACE_ID_PROPERTY})


async def submit(request: web.Request, model: Model, properties: dict[str, str], *,
                 body: bytes | None = None) -> Invocation:
    """Send the request to `model` and wait (bounded by predict_timeout) for its first frame.
    Query parameters travel as extra content entries, as DJL passes them to handlers."""
    if body is None:
        body = await read_body(request)
    # A client's "handler" header must not reach the worker as DJL's function selector (only
    # the management API calls register_adapter and friends), nor its own spelling of the ids
    # the worker logs with: the request id decided on arrival (and the trace id) replace them.
    properties = {k: v for k, v in properties.items() if k.lower() not in _NOT_FORWARDED}
    properties.update(worker_properties(request))
    content = [("data", body)]
    for k, v in request.query.items():
        if k != "model_name":
            content.append((k, v.encode()))
    request[MODEL_KEY] = model.name
    job = model.submit(new_request_item(properties, content))
    request[JOB_KEY] = job
    return Invocation(model, job, await _first_frame(request, model, job))


# How often a request waiting for its first frame checks that its client is still there.
DISCONNECT_POLL_S = 0.1


async def _first_frame(request: web.Request, model: Model, job) -> P.Response:
    """The job's first frame. aiohttp does not cancel a handler whose client went away, so a
    request still queued would wait for a worker, which would then generate for nobody; a
    client that disconnects while waiting is dropped from the queue (or its worker is told)
    within DISCONNECT_POLL_S instead."""
    waiter = asyncio.ensure_future(model.result(job))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise E.ClientGone("the client disconnected before the first byte")
    finally:
        if not waiter.done():
            waiter.cancel()  # Model.result aborts the job when cancelled
            await asyncio.gather(waiter, return_exceptions=True)


def stream_error_line(error: str) -> bytes:
    """What a stream that broke after its first byte ends with (DESIGN §5)."""
    return json.dumps({"finish_reason": "error", "error": error}).encode() + b"\n"


def plain_response(inv: Invocation) -> web.Response:
    resp = inv.response
    if resp.code == 204:
        return web.Response(status=204, headers=resp.headers)
    headers = dict(resp.headers)
    if inv.header("content-type") is None:
        headers["Content-Type"] = inv.content_type()
    return web.Response(status=resp.code, body=resp.body, headers=headers)


async def send_stream(request: web.Request, inv: Invocation, out: web.StreamResponse,
                      frames: AsyncIterator[bytes]) -> web.StreamResponse:
    """Write `frames` with chunked encoding as they are produced. If the client goes away, the
    worker is told to stop generating for it."""
    out.enable_chunked_encoding()
    try:
        await out.prepare(request)
        async for data in frames:
            await out.write(data)
        await out.write_eof()
    except ConnectionResetError:
        # The client went away mid-stream (aiohttp's ClientConnectionResetError is one): stop
        # the generation, and nothing to log, since nobody is there to read an error.
        inv.model.abort(inv.job)
    except asyncio.CancelledError:
        inv.model.abort(inv.job)
        raise
    return out


async def raw_frames(inv: Invocation,
                     on_error: Callable[[str], bytes] = stream_error_line) -> AsyncIterator[bytes]:
    """The answer's bytes unchanged; a broken stream ends with `on_error(message)`."""
    async for chunk in inv.chunks():
        if isinstance(chunk, StreamEnd):
            if chunk.error is not None:
                yield on_error(chunk.error)
            return
        yield chunk


async def respond(request: web.Request, inv: Invocation) -> web.StreamResponse:
    """The worker's answer as is: plain, or chunked with the handler's own headers."""
    if not inv.response.stream:
        return plain_response(inv)
    out = web.StreamResponse(status=inv.response.code, headers=inv.response.headers)
    return await send_stream(request, inv, out, raw_frames(inv))
