"""Frame codec: every message type round-trips, frames split anywhere reassemble, bad frames
are rejected with ProtocolError."""

import asyncio
import socket
import struct

import pytest

from engines.contracts import protocol as P

MESSAGES = [
    P.Init("m", "/models/m", {"model_dir": "/models/m", "dtype": "fp16"}),
    P.Ready(1234, {"engine": "hf"}),
    P.InitFailed("ImportError: no module named foo", 500),
    P.Request([P.RequestItem(1, {"Content-Type": "application/json"}, [("data", b'{"a":1}')]),
               P.RequestItem(2, {}, [("data", b"\x00\xff" * 10), ("q", "é".encode())]),
               P.RequestItem(3, {"x": "y"}, [])]),
    P.Response(7, 200, "OK", {"content-type": "text/plain"}, b"hello"),
    P.Response(8, 200, "OK", {}, b"", stream=True),
    P.Chunk(8, b'{"token": "a"}\n'),
    P.End(8, None),
    P.End(9, "CUDA error"),
    P.Abort([1, 2, 3]),
    P.Shutdown(drain=False),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frame = P.encode(msg)
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    assert P.decode_payload(frame[4:]) == msg


def test_decoder_reassembles_frames_split_at_every_byte():
    stream = b"".join(P.encode(m) for m in MESSAGES)
    dec = P.FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert out == MESSAGES


def test_decoder_many_frames_in_one_feed():
    stream = b"".join(P.encode(m) for m in MESSAGES) * 3
    assert P.FrameDecoder().feed(stream) == MESSAGES * 3


def test_binary_body_is_not_base64_encoded():
    body = bytes(range(256)) * 100
    frame = P.encode(P.Response(1, 200, "OK", {}, body))
    assert len(frame) < len(body) + 200  # raw bytes, header only adds a little
    assert body in frame


@pytest.mark.parametrize("payload, needle", [
    (b"\x00", "shorter"),
    (struct.pack(">H", 3) + b"{{{", "bad frame header"),
    (struct.pack(">H", 11) + b'{"t":"zz","b":[]}'[:11], "bad frame header"),
])
def test_bad_frames_raise(payload, needle):
    with pytest.raises(P.ProtocolError, match=needle):
        P.decode_payload(payload)


def test_unknown_type_and_length_mismatch():
    head = b'{"t":"nope","b":[]}'
    with pytest.raises(P.ProtocolError, match="unknown message type"):
        P.decode_payload(struct.pack(">H", len(head)) + head)
    head = b'{"t":"chunk","i":1,"b":[5]}'
    with pytest.raises(P.ProtocolError, match="length mismatch"):
        P.decode_payload(struct.pack(">H", len(head)) + head + b"abc")


def test_blocking_and_async_readers_agree():
    a, b = socket.socketpair()
    try:
        for m in MESSAGES:
            a.sendall(P.encode(m))
        got = [P.read_message_blocking(b) for _ in MESSAGES]
        assert got == MESSAGES
        a.close()
        assert P.read_message_blocking(b) is None  # clean EOF
    finally:
        b.close()

    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(P.encode(m) for m in MESSAGES))
        reader.feed_eof()
        return [await P.read_message(reader) for _ in MESSAGES]

    assert asyncio.run(run()) == MESSAGES
