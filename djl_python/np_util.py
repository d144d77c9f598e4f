"""DJL's numpy <-> NDList helpers: `to_nd_list(arrays)` encodes numpy arrays as DJL's
`tensor/ndlist` bytes, `from_nd_list(data)` decodes them (an .npz archive, starting "PK", is
accepted too). The codec is handlers/ndlist.py, the one Input.get_as_numpy and
Output.add_as_numpy use; the small big-endian readers and writers DJL's module also exports are
here for code that builds or parses the format by hand (readers return (value, next index))."""

from __future__ import annotations

import struct

from handlers.ndlist import decode_ndlist, encode_ndlist

MAGIC_NUMBER = "NDAR"
VERSION = 3


def to_nd_list(np_list) -> bytearray:
    """One array or a list of arrays as NDList bytes (little-endian data, no names)."""
    return bytearray(encode_ndlist(np_list))


def from_nd_list(encoded) -> list:
    """NDList (or .npz) bytes as a list of numpy arrays."""
    return decode_ndlist(bytes(encoded))


def set_int(value: int) -> bytes:
    return struct.pack(">i", value)


def set_long(value: int) -> bytes:
    return struct.pack(">q", value)


def set_str(value: str) -> bytes:
    """int16 byte length, then the UTF-8 text."""
    raw = value.encode("utf-8")
    return struct.pack(">h", len(raw)) + raw


def set_char(value: str) -> bytes:
    return struct.pack(">h", ord(value))


def get_byte_as_int(encoded, idx: int) -> tuple:
    return encoded[idx], idx + 1


def get_bytes(encoded, idx: int, length: int) -> tuple:
    return encoded[idx:idx + length], idx + length


def get_char(encoded, idx: int) -> tuple:
    return chr(struct.unpack(">h", encoded[idx:idx + 2])[0]), idx + 2


def get_str(encoded, idx: int) -> tuple:
    (length,) = struct.unpack(">h", encoded[idx:idx + 2])
    start = idx + 2
    return bytes(encoded[start:start + length]).decode("utf-8"), start + length


def get_int(encoded, idx: int) -> tuple:
    return struct.unpack(">i", encoded[idx:idx + 4])[0], idx + 4


def get_long(encoded, idx: int) -> tuple:
    return struct.unpack(">q", encoded[idx:idx + 8])[0], idx + 8


__all__ = ["MAGIC_NUMBER", "VERSION", "from_nd_list", "get_byte_as_int", "get_bytes", "get_char",
           "get_int", "get_long", "get_str", "set_char", "set_int", "set_long", "set_str",
           "to_nd_list"]
