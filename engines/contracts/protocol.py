"""Wire protocol between the front end and worker processes.

One Unix domain socket per worker group; only rank 0 of a group is connected. Every message is
one frame:

    [u32 BE: length of the rest][u16 BE: header length][header: UTF-8 JSON][blob 0][blob 1]...

The JSON header carries the message type under "t", its scalar fields, and under "b" the byte
length of each blob that follows. Binary payloads (request bodies, response bodies, stream
chunks) travel as raw blobs, never base64 and never pickle.

Every request carries an id chosen by the front end, so one worker may have many requests in
flight (continuous batching), stream chunks of several requests interleaved, and abort any of
them. A `Request` frame may carry several items: that is one dynamic batch, handed to the
handler as one batch Input.

Messages (front end -> worker): Init, Request, Abort, Shutdown.
Messages (worker -> front end): Ready, InitFailed, Response, Chunk, End, Stats.

A request's engine statistics (token counts, time to first token, inter-token latency
histogram, finish reasons: engines/contracts/metrics.py) ride on its last frame: the Response of
a plain answer, the End of a stream. Engine-wide gauges and counters (running and waiting
requests, KV-cache use, prefix-cache hits, ...) come as a Stats message about once a second.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field

# A frame larger than this is a protocol error, not a request: max_request_size caps bodies long
# before they reach the worker, so this only guards against a corrupt length prefix.
MAX_FRAME_BYTES = 2**31 - 1

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class ProtocolError(Exception):
    """A frame that cannot be decoded: corrupt length, bad JSON, unknown message type."""


# ---------------------------------------------------------------------------------------------
# Message types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Init:
    """First message to a worker: what to load. `properties` are the handler's init properties
    (model_dir, every option.* key without its prefix, batch_size, ...), as strings because that
    is what a custom model.py gets in LMI. `llm`, when the default LLM handler serves the model,
    is the plan the front end parsed and chose at startup (engines.selection.LLMPlan.to_wire():
    typed JSON values), so the worker parses no option again."""

    model_name: str
    model_dir: str
    properties: dict[str, str]
    llm: dict | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker loaded its model and accepts requests. `info` is free-form (e.g. engine name)."""

    pid: int
    info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InitFailed:
    """Loading failed; the worker exits after sending this."""

    error: str
    code: int = 500


@dataclass(frozen=True, slots=True)
class RequestItem:
    """One client request. `properties` are HTTP headers (and split custom attributes); `content`
    is an ordered list of (key, bytes): the body under "data", then query parameters."""

    id: int
    properties: dict[str, str]
    content: list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Request:
    """One dispatch: a single request, or a dynamic batch of several."""

    items: list[RequestItem]


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to one request. With `stream=True` the body is the first chunk, more `Chunk`s
    may follow, and an `End` closes the stream."""

    id: int
    code: int
    message: str
    headers: dict[str, str]
    body: bytes
    stream: bool = False
    stats: dict | None = None  # engine statistics of a plain answer (None: none measured)


@dataclass(frozen=True, slots=True)
class Chunk:
    id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """Closes a stream. `error` set means the stream broke after its first byte."""

    id: int
    error: str | None = None
    stats: dict | None = None  # engine statistics of the stream


@dataclass(frozen=True, slots=True)
class Stats:
    """Engine-wide statistics of one worker group, cumulative since it started
    (engines/contracts/metrics.py names the keys)."""

    values: dict


@dataclass(frozen=True, slots=True)
class Abort:
    """The clients of these requests went away: stop work on them and free their resources."""

    ids: list[int]


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Finish what is in flight (or not, if `drain` is False) and exit."""

    drain: bool = True


Message = Init | Ready | InitFailed | Request | Response | Chunk | End | Stats | Abort | Shutdown


# ---------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------


def _frame(header: dict, blobs: list[bytes]) -> bytes:
    header["b"] = [len(b) for b in blobs]
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(head) > 0xFFFF:
        raise ProtocolError(f"frame header too large ({len(head)} bytes > 65535)")
    size = 2 + len(head) + sum(header["b"])
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame too large ({size} bytes)")
    return b"".join([_U32.pack(size), _U16.pack(len(head)), head, *blobs])


def _json_blob(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _from_json_blob(blob: bytes) -> dict:
    try:
        value = json.loads(blob)
    except ValueError as e:
        raise ProtocolError(f"bad statistics blob: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError("statistics blob is not an object")
    return value


def encode(msg: Message) -> bytes:
    """One message -> one frame (length prefix included)."""
    t = type(msg)
    if t is Response:
        header = {"t": "response", "i": msg.id, "c": msg.code, "m": msg.message,
                  "h": msg.headers, "s": msg.stream}
        if msg.stats is None:
            return _frame(header, [msg.body])
        # Statistics travel as a second blob: they may outgrow the 64 KiB header.
        return _frame(header, [msg.body, _json_blob(msg.stats)])
    if t is Chunk:
        return _frame({"t": "chunk", "i": msg.id}, [msg.data])
    if t is End:
        return _frame({"t": "end", "i": msg.id, "e": msg.error},
                      [] if msg.stats is None else [_json_blob(msg.stats)])
    if t is Stats:
        return _frame({"t": "stats"}, [_json_blob(msg.values)])
    if t is Request:
        items, blobs = [], []
        for it in msg.items:
            items.append({"i": it.id, "p": it.properties, "k": [k for k, _ in it.content]})
            blobs.extend(v for _, v in it.content)
        return _frame({"t": "request", "items": items}, blobs)
    if t is Abort:
        return _frame({"t": "abort", "ids": msg.ids}, [])
    if t is Init:
        return _frame({"t": "init", "name": msg.model_name, "dir": msg.model_dir,
                       "p": msg.properties, "llm": msg.llm}, [])
    if t is Ready:
        return _frame({"t": "ready", "pid": msg.pid, "info": msg.info}, [])
    if t is InitFailed:
        return _frame({"t": "init_failed", "e": msg.error, "c": msg.code}, [])
    if t is Shutdown:
        return _frame({"t": "shutdown", "drain": msg.drain}, [])
    raise ProtocolError(f"cannot encode {t.__name__}")


def decode_payload(payload: bytes | memoryview) -> Message:
    """Decode one frame without its 4-byte length prefix."""
    view = memoryview(payload)
    if len(view) < 2:
        raise ProtocolError("frame shorter than its header length field")
    (hlen,) = _U16.unpack_from(view, 0)
    try:
        h = json.loads(bytes(view[2:2 + hlen]))
        kind = h["t"]
        lengths = h["b"]
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"bad frame header: {e}") from None
    blobs, pos = [], 2 + hlen
    for n in lengths:
        blobs.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != len(view):
        raise ProtocolError(f"frame length mismatch: header says {pos} bytes, frame has {len(view)}")
    try:
        if kind == "response":
            stats = _from_json_blob(blobs[1]) if len(blobs) > 1 else None
            return Response(h["i"], h["c"], h["m"], h["h"], blobs[0], h["s"], stats)
        if kind == "chunk":
            return Chunk(h["i"], blobs[0])
        if kind == "end":
            return End(h["i"], h["e"], _from_json_blob(blobs[0]) if blobs else None)
        if kind == "stats":
            return Stats(_from_json_blob(blobs[0]))
        if kind == "request":
            items, b = [], 0
            for it in h["items"]:
                keys = it["k"]
                items.append(RequestItem(it["i"], it["p"], list(zip(keys, blobs[b:b + len(keys)]))))
                b += len(keys)
            return Request(items)
        if kind == "abort":
            return Abort(h["ids"])
        if kind == "init":
            return Init(h["name"], h["dir"], h["p"], h.get("llm"))
        if kind == "ready":
            return Ready(h["pid"], h["info"])
        if kind == "init_failed":
            return InitFailed(h["e"], h["c"])
        if kind == "shutdown":
            return Shutdown(h["drain"])
    except (KeyError, IndexError, TypeError) as e:
        raise ProtocolError(f"bad {kind!r} frame: missing {e}") from None
    raise ProtocolError(f"unknown message type {kind!r}")


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _U32.unpack_from(buf, pos)
            if size > MAX_FRAME_BYTES:
                raise ProtocolError(f"frame length {size} exceeds limit")
            if len(buf) - pos - 4 < size:
                break
            out.append(decode_payload(memoryview(buf)[pos + 4:pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out


async def read_message(reader: asyncio.StreamReader) -> Message:
    """Read one message from an asyncio stream; raises asyncio.IncompleteReadError at EOF."""
    (size,) = _U32.unpack(await reader.readexactly(4))
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {size} exceeds limit")
    return decode_payload(await reader.readexactly(size))


def read_message_blocking(sock) -> Message | None:
    """Read one message from a blocking socket; None at a clean EOF (peer closed)."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (size,) = _U32.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {size} exceeds limit")
    payload = _recv_exact(sock, size)
    if payload is None:
        raise ProtocolError("connection closed in the middle of a frame")
    return decode_payload(payload)


def _recv_exact(sock, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError("connection closed in the middle of a frame")
        got += k
    return bytes(buf)
