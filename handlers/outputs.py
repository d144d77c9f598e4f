"""`Output`: what a model.py `handle(inputs)` returns (djl_python compatible).

Content entries are bytes. For a batch, entry i answers item i, or entries are keyed
"batch_%03d_<key>" (what `add(..., batch_index=i)` does). Properties become response headers;
"batch_%03d_<header>" sets a header on one item only. `add_stream_content` makes the response a
stream: the generator is not touched here, the worker pulls from it as it sends.
"""

from __future__ import annotations

import datetime
import io
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from handlers.inputs import batch_key
from handlers.pair_list import PairList

if TYPE_CHECKING:
    import numpy as np


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays are what models usually hand back; json can't encode them.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("utf-8", errors="replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def to_json_bytes(value: Any) -> bytes:
    # allow_nan=False: NaN is not JSON and would break strict clients later, so fail here.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default,
                      separators=(",", ":")).encode("utf-8")


def stream_chunk(item: Any) -> bytes:
    """One streamed item as bytes: bytes as-is, str as UTF-8, anything else as a JSON line."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    return to_json_bytes(item) + b"\n"


class Output:
    def __init__(self, code: int = 200, message: str = "OK") -> None:
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content = PairList()
        self.stream_content: Iterable[Any] | None = None
        self.stream_formatter: Callable[[Any], Any] | None = None
        self.finalize_function: Callable[..., Any] | None = None
        self.finalize_args: tuple[Any, ...] = ()
        # Engine statistics per request (engines/contracts/metrics.py), by batch index (None:
        # a single request): a dict, or for a stream a function called once it has ended.
        self.stats: dict[int | None, dict | Callable[[], dict | None]] = {}

    def set_code(self, code: int) -> Output:
        self.code = code
        return self

    def set_message(self, message: str) -> Output:
        self.message = message
        return self

    def add_property(self, key: str, val: str) -> Output:
        self.properties[key] = val
        return self

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_content(self) -> PairList:
        return self.content

    def _key(self, key: str | None, batch_index: int | None) -> str | None:
        if key is not None and not isinstance(key, str):
            key = str(key)
        if batch_index is None:
            return key
        return batch_key(batch_index, key or "data")

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """str/bytes/bytearray as raw bytes; anything else as JSON."""
        if isinstance(value, str):
            self.content.add(self._key(key, batch_index), value.encode("utf-8"))
        elif isinstance(value, Frame):
            self.content.add(self._key(key, batch_index), value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            self.content.add(self._key(key, batch_index), bytes(value))
        else:
            self.add_as_json(value, key=key, batch_index=batch_index)
        return self

    def get_property(self, key: str) -> str | None:
        return self.properties.get(key)

    def add_as_string(self, value: str, key: str | None = None,
                      batch_index: int | None = None) -> Output:
        self.content.add(self._key(key, batch_index), value.encode("utf-8"))
        return self

    def add_as_json(self, val: Any, key: str | None = None,
                    batch_index: int | None = None) -> Output:
        self.content.add(self._key(key, batch_index), to_json_bytes(val))
        return self

    def add_as_numpy(self, np_list: np.ndarray | list[np.ndarray], key: str | None = None,
                     batch_index: int | None = None) -> Output:
        """As a DJL `tensor/ndlist` body."""
        from handlers.ndlist import encode_ndlist

        self.content.add(self._key(key, batch_index), encode_ndlist(np_list))
        self._default_type("tensor/ndlist", batch_index)
        return self

    def _default_type(self, content_type: str, batch_index: int | None) -> None:
        """Label a tensor body the handler left unlabelled (it is bytes, not text)."""
        key = "Content-Type" if batch_index is None else batch_key(batch_index, "Content-Type")
        if not any(k.lower() == key.lower() for k in self.properties):
            self.properties[key] = content_type

    def add_as_npz(self, np_list: np.ndarray | list[np.ndarray], key: str | None = None,
                   batch_index: int | None = None) -> Output:
        import numpy as np

        if not isinstance(np_list, list):
            np_list = [np_list]
        buf = io.BytesIO()
        np.savez(buf, *np_list)
        self.content.add(self._key(key, batch_index), buf.getvalue())
        self._default_type("tensor/npz", batch_index)
        return self

    def add_stream_content(self, stream_generator: Iterable[Any],
                           output_formatter: Callable[[Any], Any] | None = None) -> Output:
        """Stream the generator's items as the response body. Each item (after
        `output_formatter`, if given) becomes bytes per `stream_chunk`."""
        self.stream_content = stream_generator
        self.stream_formatter = output_formatter
        return self

    def iter_stream(self) -> Iterator[bytes] | None:
        """The stream as bytes chunks, lazily; None when this Output does not stream."""
        if self.stream_content is None:
            return None
        return _format_stream(self.stream_content, self.stream_formatter)

    def set_stats(self, stats: dict | Callable[[], dict | None],
                  batch_index: int | None = None) -> Output:
        """LMC: the request's engine statistics, for the server's metrics; not sent."""
        self.stats[batch_index] = stats
        return self

    def finalize(self, finalize_function: Callable[..., Any], *args: Any) -> Output:
        """Call `finalize_function(*args)` once this answer has been sent (DJL: e.g. to free
        what the request held); an exception it raises is logged."""
        self.finalize_function = finalize_function
        self.finalize_args = args
        return self

    @staticmethod
    def binary_encode(data: dict[str, Any]) -> bytes:
        """One frame of DJL's async / rolling-batch contract: a dict of strings ({"data": ...,
        "last": ...} and optionally "code" and "error"), as DJL's wire format: a big-endian
        int16 count, then each key and value as an int32 length and UTF-8 bytes (-1: None).
        Values are sent as str(value), so True arrives as "True"."""
        out = bytearray(struct.pack(">h", len(data)))
        for key, value in data.items():
            for text in (key, None if value is None else str(value)):
                if text is None:
                    out += struct.pack(">i", -1)
                else:
                    raw = text.encode("utf-8")
                    out += struct.pack(">i", len(raw)) + raw
        return Frame(out)

    def error(self, error: str, code: int = 424, message: str = "prediction failure") -> Output:
        self.code = code
        self.message = message
        self.add_property("content-type", "application/json")
        self.add_as_json({"code": code, "message": message, "error": error})
        return self

    def __repr__(self) -> str:
        return (f"Output(code={self.code}, message={self.message!r}, "
                f"properties={self.properties!r}, content_keys={self.content.get_keys()!r}, "
                f"stream={self.stream_content is not None})")


class Frame(bytes):
    """What Output.binary_encode returns: bytes that say they are a frame, so a handler's output
    is told apart from a plain body without guessing."""


def decode_frame(data: bytes) -> dict[str, str | None]:
    """The dict Output.binary_encode encoded. ValueError if `data` is not exactly one frame."""
    try:
        (count,) = struct.unpack_from(">h", data, 0)
        pos = 2
        frame: dict[str, str | None] = {}
        for _ in range(count):
            pair = []
            for _ in range(2):
                (size,) = struct.unpack_from(">i", data, pos)
                pos += 4
                if size < 0:
                    pair.append(None)
                    continue
                if pos + size > len(data):
                    raise ValueError("truncated")
                pair.append(bytes(data[pos:pos + size]).decode("utf-8"))
                pos += size
            if pair[0] is None:
                raise ValueError("a key is null")
            frame[pair[0]] = pair[1]
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not an Output.binary_encode frame: {e}") from None
    if count < 0 or pos != len(data):
        raise ValueError("not an Output.binary_encode frame: trailing bytes")
    return frame


def _format_stream(items: Iterable[Any], formatter: Callable[[Any], Any] | None) -> Iterator[bytes]:
    for item in items:
        if formatter is not None:
            item = formatter(item)
        chunk = stream_chunk(item)
        if chunk:  # an empty chunk would read as end-of-stream to chunked HTTP clients
            yield chunk
