"""Input / Output (djl_python compatible) and the Input built from wire RequestItems."""

import json

import numpy as np
import pytest

from engines.contracts.protocol import RequestItem
from handlers import Input, Output
from handlers.inputs import input_from_items, split_custom_attributes
from handlers.ndlist import decode_ndlist, encode_ndlist
from handlers.pair_list import PairList


def make_input(props: dict[str, str], content: list[tuple[str, bytes]]) -> Input:
    return Input(props, PairList(content))


# ---- Input -----------------------------------------------------------------------------------


def test_properties_are_case_insensitive():
    inp = make_input({"Content-Type": "application/json", "X-Trace": "t1"}, [])
    assert inp.get_property("content-type") == "application/json"
    assert inp.get_property("CONTENT-TYPE") == "application/json"
    assert inp.get_property("x-trace") == "t1"
    assert inp.get_property("missing") is None
    assert inp.get_properties() == {"Content-Type": "application/json", "X-Trace": "t1"}


def test_content_accessors_default_to_data_then_first_entry():
    inp = make_input({}, [("q", b"1"), ("data", b'{"inputs": "hi"}')])
    assert inp.get_as_bytes() == b'{"inputs": "hi"}'
    assert inp.get_as_string() == '{"inputs": "hi"}'
    assert inp.get_as_json() == {"inputs": "hi"}
    assert inp.get_as_string("q") == "1"
    assert inp.contains_key("q") and not inp.contains_key("nope")
    with pytest.raises(KeyError, match="nope"):
        inp.get_as_bytes("nope")
    only_params = make_input({}, [("a", b"x"), ("b", b"y")])
    assert only_params.get_as_string() == "x"


def test_content_pairlist_api():
    inp = make_input({}, [("data", b"body"), ("top_k", b"5")])
    c = inp.get_content()
    assert c.size() == 2 and not c.is_empty()
    assert c.get_keys() == ["data", "top_k"]
    assert c.key_at(1) == "top_k" and c.value_at(1) == b"5"
    assert c.get("data") == b"body" and c.get("x") is None
    c.add("extra", b"e")
    assert inp.get_as_string("extra") == "e"


def test_empty_input():
    inp = Input({"model_dir": "/m"})
    assert inp.is_empty()
    assert inp.get_as_bytes() is None
    assert not inp.is_batch() and inp.get_batch_size() == 1
    assert inp.get_batches() == [inp]
    with pytest.raises(ValueError, match="no content"):
        inp.get_as_json()


def test_get_data_dispatches_on_content_type():
    assert make_input({"Content-Type": "application/json; charset=utf-8"},
                      [("data", b"[1, 2]")]).get_data() == [1, 2]
    assert make_input({"content-type": "text/plain"}, [("data", b"hi")]).get_data() == "hi"
    assert make_input({}, [("data", b"\x00\x01")]).get_data() == b"\x00\x01"
    arrays = make_input({"Content-Type": "tensor/ndlist"},
                        [("data", encode_ndlist([np.arange(6, dtype=np.float32)
                                                 .reshape(2, 3)]))]).get_data()
    assert len(arrays) == 1 and arrays[0].shape == (2, 3) and arrays[0][1, 2] == 5.0


def test_get_as_csv():
    inp = make_input({}, [("data", b"question,context\nwho?,me\nwhy?,because\n")])
    assert inp.get_as_csv() == [{"question": "who?", "context": "me"},
                                {"question": "why?", "context": "because"}]


def test_ndlist_and_npz_round_trip():
    arrays = [np.array([[1, 2], [3, 4]], dtype=np.int64), np.array([True, False]),
              np.array([0.5], dtype=np.float16)]
    back = decode_ndlist(encode_ndlist(arrays))
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    out = Output().add_as_npz(arrays[:1])
    npz_in = make_input({}, [("data", out.content.value_at(0))])
    assert np.array_equal(npz_in.get_as_npz()[0], arrays[0])
    assert np.array_equal(npz_in.get_as_numpy()[0], arrays[0])  # ndlist reader accepts npz


def test_custom_attributes_split_into_properties():
    props = split_custom_attributes({
        "X-Amzn-SageMaker-Custom-Attributes": "session=abc; trace_id = 42;flag;x=a=b",
        "Content-Type": "application/json",
    })
    assert props["session"] == "abc"
    assert props["trace_id"] == "42"
    assert props["x"] == "a=b"
    assert "flag" not in props
    assert props["X-Amzn-SageMaker-Custom-Attributes"].startswith("session=abc")
    # An attribute cannot override a real header.
    assert split_custom_attributes({"content-type": "text/plain",
                                    "x-amzn-sagemaker-custom-attributes": "Content-Type=evil"}
                                   ) == {"content-type": "text/plain",
                                         "x-amzn-sagemaker-custom-attributes":
                                             "Content-Type=evil"}


def test_single_item_input_has_headers_and_query_params():
    item = RequestItem(7, {"Content-Type": "application/json",
                           "X-Amzn-SageMaker-Custom-Attributes": "k=v"},
                       [("data", b'{"a": 1}'), ("verbose", b"true")])
    inp = input_from_items([item])
    assert not inp.is_batch()
    assert inp.get_as_json() == {"a": 1}
    assert inp.get_as_string("verbose") == "true"
    assert inp.get_property("K") == "v"


def test_batch_build_and_get_batches_round_trip():
    items = [
        RequestItem(1, {"Content-Type": "application/json", "X-Id": "one"},
                    [("data", b'{"n": 1}')]),
        RequestItem(2, {"Content-Type": "text/plain",
                        "X-Amzn-SageMaker-Custom-Attributes": "tenant=blue"},
                    [("data", b"two"), ("temperature", b"0.5")]),
        RequestItem(3, {}, [("data", b"\xff\x00")]),
    ]
    inp = input_from_items(items)
    assert inp.is_batch() and inp.get_batch_size() == 3
    assert inp.get_property("batch_size") == "3"
    assert inp.get_properties()["batch_001_tenant"] == "blue"
    assert inp.get_content().get_keys() == ["batch_000_data", "batch_001_data",
                                            "batch_001_temperature", "batch_002_data"]

    b0, b1, b2 = inp.get_batches()
    assert b0.get_data() == {"n": 1} and b0.get_property("x-id") == "one"
    assert b1.get_data() == "two" and b1.get_as_string("temperature") == "0.5"
    assert b1.get_property("tenant") == "blue" and b1.get_property("x-id") is None
    assert b2.get_as_bytes() == b"\xff\x00" and b2.get_properties() == {}
    assert not b0.is_batch()


def test_unprefixed_batch_properties_reach_every_item():
    inp = make_input({"batch_size": "2", "model_dir": "/m", "batch_000_a": "1"},
                     [("batch_000_data", b"x"), ("batch_001_data", b"y")])
    b0, b1 = inp.get_batches()
    assert b0.get_properties() == {"model_dir": "/m", "a": "1"}
    assert b1.get_properties() == {"model_dir": "/m"}
    assert (b0.get_as_string(), b1.get_as_string()) == ("x", "y")


# ---- Output ----------------------------------------------------------------------------------


def test_output_defaults_and_setters():
    out = Output()
    assert (out.code, out.message) == (200, "OK")
    assert out.set_code(201).set_message("Created") is out
    assert (out.code, out.message) == (201, "Created")
    out.add_property("X-Request-Id", "r1")
    assert out.get_properties() == {"X-Request-Id": "r1"}


def test_output_add_raw_and_json():
    out = Output()
    out.add("héllo").add(b"\x00\x01").add(bytearray(b"ba")).add({"a": [1, 2]}, key="j")
    out.add(np.float32(1.5), key="np").add(np.arange(3), key="arr")
    c = out.get_content()
    assert c.value_at(0) == "héllo".encode()
    assert c.value_at(1) == b"\x00\x01"
    assert c.value_at(2) == b"ba"
    assert c.key_at(3) == "j" and json.loads(c.value_at(3)) == {"a": [1, 2]}
    assert json.loads(c.get("np")) == 1.5
    assert json.loads(c.get("arr")) == [0, 1, 2]
    assert c.key_at(0) is None


def test_output_batch_index_keys():
    out = Output()
    out.add("a", batch_index=0)
    out.add_as_json({"b": 1}, batch_index=1)
    out.add("c", key="extra", batch_index=12)
    assert out.content.get_keys() == ["batch_000_data", "batch_001_data", "batch_012_extra"]
    assert json.loads(out.content.value_at(1)) == {"b": 1}


def test_output_rejects_nan_json():
    with pytest.raises(ValueError):
        Output().add_as_json(float("nan"))


def test_output_error():
    out = Output().error("the prompt is too long")
    assert out.code == 424 and out.message == "prediction failure"
    assert out.properties["content-type"] == "application/json"
    assert json.loads(out.content.value_at(0)) == {
        "code": 424, "message": "prediction failure", "error": "the prompt is too long"}
    out = Output().error("nope", code=400, message="bad request")
    assert json.loads(out.content.value_at(0))["code"] == 400


def test_output_numpy_round_trips_through_input():
    out = Output().add_as_numpy([np.ones((2, 2), dtype=np.float32)])
    back = make_input({"content-type": "tensor/ndlist"}, [("data", out.content.value_at(0))])
    assert np.array_equal(back.get_data()[0], np.ones((2, 2), dtype=np.float32))


def test_stream_formatting_is_lazy_and_typed():
    pulled = []

    def gen():
        for item in [b"raw", "text", {"token": "é"}, [1], ""]:
            pulled.append(item)
            yield item

    out = Output().add_stream_content(gen())
    chunks = out.iter_stream()
    assert pulled == []  # nothing runs until the worker pulls
    assert next(chunks) == b"raw"
    assert pulled == [b"raw"]
    assert list(chunks) == [b"text", '{"token":"é"}\n'.encode(), b"[1]\n"]  # "" is skipped
    assert Output().iter_stream() is None


def test_stream_formatter_applies_before_encoding():
    out = Output().add_stream_content(iter([1, 2]), output_formatter=lambda x: {"n": x * 10})
    assert list(out.iter_stream()) == [b'{"n":10}\n', b'{"n":20}\n']
    out = Output().add_stream_content(iter(["a"]), output_formatter=lambda s: f"data: {s}\n\n")
    assert list(out.iter_stream()) == [b"data: a\n\n"]


# ---- djl_python alias ------------------------------------------------------------------------


def test_djl_python_aliases_are_the_same_objects():
    import djl_python
    import handlers
    from djl_python.encode_decode import decode, encode
    from djl_python.input_parser import input_formatter
    from djl_python.inputs import Input as I2
    from djl_python.output_formatter import output_formatter
    from djl_python.outputs import Output as O2

    assert djl_python.Input is I2 is handlers.Input
    assert djl_python.Output is O2 is handlers.Output
    assert input_formatter is handlers.input_formatter
    assert output_formatter is handlers.output_formatter

    inp = make_input({"Content-Type": "application/json"}, [("data", b'{"inputs": "x"}')])
    assert decode(inp, "application/json") == {"inputs": "x"}
    assert decode(make_input({}, [("data", b"hi")]), "text/plain") == {"inputs": ["hi"]}
    assert decode(make_input({}, [("data", b"")]), None) == {"inputs": ""}
    out = encode(Output(), {"y": 1}, "application/json")
    assert json.loads(out.content.value_at(0)) == {"y": 1}
    assert out.properties["Content-Type"] == "application/json"
    out = encode(Output(), [{"a": "1", "b": "2"}], "text/csv")
    assert out.content.value_at(0).decode().splitlines() == ["a,b", "1,2"]


def test_formatter_decorators_tag_and_return_the_function():
    from handlers import input_formatter, output_formatter

    @input_formatter
    def fin(payload, **kwargs):
        return payload

    @output_formatter
    def fout(o):
        return str(o)

    assert fin.is_input_formatter is True and fout.is_output_formatter is True
    assert fin({"a": 1}) == {"a": 1} and fout(3) == "3"
