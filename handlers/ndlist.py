"""DJL's NDList binary encoding (content type `tensor/ndlist`), so clients that send or expect
DJL tensors keep working. Layout, all integers big-endian:

    i32 count, then per array:
      str "NDAR" | i32 version (3) | u8 has_name [str name] | str sparse format ("default")
      | str dtype ("FLOAT32") | i32 ndim | i64 dims... | i32 layout length | u16 chars...
      | u8 byte order ('<' or '>') | i32 data length | data
    where str is u16 length + UTF-8.

An input starting with "PK" is a zip, i.e. an .npz archive, which DJL accepts in the same place.
"""

from __future__ import annotations

import io
import struct

import numpy as np

_MAGIC = "NDAR"
_VERSION = 3
# DJL DataType names that are not simply numpy's name upper-cased.
_DJL_TO_NP = {"BOOLEAN": "bool"}
_NP_TO_DJL = {v: k for k, v in _DJL_TO_NP.items()}


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError("truncated tensor/ndlist payload")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        return self.take(self.unpack(">H")).decode()


def decode_ndlist(data: bytes) -> list[np.ndarray]:
    if data[:2] == b"PK":
        npz = np.load(io.BytesIO(data))
        return [npz[name] for name in npz.files]
    r = _Reader(data)
    arrays = []
    for _ in range(r.unpack(">i")):
        magic = r.string()
        if magic != _MAGIC:
            raise ValueError(f"not a DJL NDList: magic {magic!r}, expected {_MAGIC!r}")
        version = r.unpack(">i")
        if version != _VERSION:
            raise ValueError(f"unsupported NDList version {version}, expected {_VERSION}")
        if r.unpack(">B"):
            r.string()  # array name: numpy arrays have none
        r.string()  # sparse format: only dense ("default") is produced by DJL clients
        dtype = r.string()
        shape = tuple(r.unpack(">q") for _ in range(r.unpack(">i")))
        for _ in range(r.unpack(">i")):
            r.unpack(">H")  # layout characters carry no information numpy can use
        order = chr(r.unpack(">B"))
        raw = r.take(r.unpack(">i"))
        np_dtype = np.dtype(_DJL_TO_NP.get(dtype, dtype.lower())).newbyteorder(order)
        arrays.append(np.frombuffer(raw, dtype=np_dtype).reshape(shape))
    return arrays


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def encode_ndlist(arrays: np.ndarray | list[np.ndarray]) -> bytes:
    if not isinstance(arrays, list):
        arrays = [arrays]
    out = bytearray(struct.pack(">i", len(arrays)))
    for a in arrays:
        a = np.ascontiguousarray(a)
        name = a.dtype.name
        out += _string(_MAGIC) + struct.pack(">i", _VERSION) + b"\x00" + _string("default")
        out += _string(_NP_TO_DJL.get(name, name.upper()))
        out += struct.pack(">i", a.ndim) + b"".join(struct.pack(">q", d) for d in a.shape)
        out += struct.pack(">i", a.ndim) + b"".join(struct.pack(">H", ord("?")) for _ in a.shape)
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        out += b"<" + struct.pack(">i", len(data)) + data
    return bytes(out)
