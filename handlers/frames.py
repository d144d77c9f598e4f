"""Responses built from DJL's frames: the `Output.binary_encode({"data", "last", "code"?,
"error"?})` dicts that an async handler (option.async_mode) and a custom rolling-batch handler
return, one per request per step.

A request's frames become one ItemResult, as DJL's front end assembles them:
  - "data" is appended to the response; frames with empty data and not last add nothing;
  - the request ends at the first frame with "last" true (True, "true", any case);
  - a frame with a "code" >= 400 ends the request with that status and its "error" (before the
    first byte: that status and a JSON error body; after it: the stream ends with the error);
  - the properties of the frames seen before the first byte become the response headers.
When the first frame already ends the request the answer is a plain body; otherwise it streams,
chunk by chunk, as the frames arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from handlers.outputs import Frame, Output, decode_frame

# (the decoded frame, the properties that came with it)
FrameItem = tuple[dict[str, "str | None"], dict[str, str]]


class FrameError(Exception):
    """A frame that says the request failed (its "code" and "error"), or one that is not a frame
    at all. `status` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def output_frame(out: Output, *, strict: bool) -> dict[str, str | None] | None:
    """The frame an Output carries as its first content entry. None when it carries a plain body
    (a normal Output); with `strict`, an Output that is not a frame is a FrameError."""
    if out.content.is_empty():
        if strict:
            raise FrameError(424, "handler returned an Output without a frame; async and "
                                  "rolling-batch handlers add Output.binary_encode({'data': "
                                  "..., 'last': ...})")
        return None
    return value_frame(out.content.value_at(0), strict=strict)


def value_frame(value: bytes, *, strict: bool) -> dict[str, str | None] | None:
    """The frame `value` encodes (None, or with `strict` a FrameError, when it is not one)."""
    try:
        return decode_frame(bytes(value))
    except ValueError as e:
        if strict or isinstance(value, Frame):
            raise FrameError(424, f"handler output is not an Output.binary_encode frame: "
                                  f"{e}") from None
        return None


def is_last(frame: dict[str, str | None]) -> bool:
    return (frame.get("last") or "").strip().lower() == "true"


def _status(frame: dict[str, str | None]) -> int | None:
    code = frame.get("code")
    if code is None or code == "":
        return None
    try:
        status = int(code)
    except ValueError:
        raise FrameError(424, f"handler frame has code={code!r}; it must be an HTTP status "
                              "code") from None
    if not 100 <= status <= 599:
        raise FrameError(424, f"handler frame has code={status}; it must be 100-599")
    return status


def failed(frame: dict[str, str | None]) -> bool:
    """The frame ends its request with an error (a "code" >= 400, or one that is no status)."""
    try:
        status = _status(frame)
    except FrameError:
        return True
    return status is not None and status >= 400


def _check(frame: dict[str, str | None]) -> int | None:
    """The frame's status; a FrameError when it reports a failure."""
    status = _status(frame)
    if status is not None and status >= 400:
        raise FrameError(status, frame.get("error") or frame.get("data") or
                         f"handler reported status {status}")
    return status


@dataclass
class FrameStream:
    """What frames_result needs from its source: the frames in order, and how to stop the
    source early (the client went away)."""

    frames: Iterator[FrameItem]
    close: Callable[[], None]


def frames_result(source: FrameStream, clean_headers: Callable[[dict[str, str]], dict[str, str]]):
    """The ItemResult for one request's frames. Blocks until its first byte (or its end)."""
    from handlers.service import ItemResult, failed_result

    headers: dict[str, str] = {}
    status = 200
    first = b""
    try:
        for frame, props in source.frames:
            headers.update(props)
            status = _check(frame) or status
            data = (frame.get("data") or "").encode("utf-8")
            if is_last(frame):
                source.close()
                return ItemResult(status, "OK", clean_headers(headers), data)
            if data:
                first = data
                break
        else:  # the handler stopped without a last frame: what it sent is the answer
            return ItemResult(status, "OK", clean_headers(headers), b"")
    except FrameError as e:
        source.close()
        return failed_result(e.status, "Prediction failed", str(e), "ModelError")
    except BaseException:
        source.close()
        raise
    return ItemResult(status, "OK", clean_headers(headers), b"",
                      _chunks(first, source))


def _chunks(first: bytes, source: FrameStream) -> Iterator[bytes]:
    try:
        yield first
        for frame, _ in source.frames:
            _check(frame)
            data = frame.get("data")
            if data:
                yield data.encode("utf-8")
            if is_last(frame):
                return
    except FrameError as e:
        raise RuntimeError(str(e)) from None
    finally:
        source.close()
