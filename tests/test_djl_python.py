"""The djl_python import surface LMI handlers use: request_io, the formatter and handler
decorators, encode_decode (CSV included), np_util, async_utils, Input/Output tensors and frames,
and test_model (DJL's local harness) as a library and as `python -m djl_python.test_model`."""

import asyncio
import csv
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import djl_python
from djl_python import async_utils, np_util
from djl_python import test_model as tm
from djl_python.encode_decode import decode, decode_csv, encode, encode_csv
from djl_python.request_io import (RequestInput, RequestOutput, Sequence, TextGenerationOutput,
                                   TextInput, Token)
from handlers.outputs import Frame, decode_frame
from handlers.pair_list import PairList

REPO = Path(__file__).resolve().parent.parent


def make_input(props, content):
    return djl_python.Input(props, PairList(content))


# ---- import surface --------------------------------------------------------------------------


def test_reexports_are_the_handlers_objects():
    import djl_python.input_parser as ip
    import djl_python.output_formatter as of
    import djl_python.request_io as rio
    import handlers.encode_decode
    import handlers.formatters
    import handlers.harness
    import handlers.request_io

    assert rio.Token is handlers.request_io.Token
    assert rio.TextGenerationOutput is handlers.request_io.TextGenerationOutput
    assert of.TextGenerationOutput is handlers.request_io.TextGenerationOutput
    assert of.RequestOutput is handlers.request_io.RequestOutput
    assert of.output_formatter is handlers.output_formatter
    assert ip.input_formatter is handlers.input_formatter
    assert ip.prediction_handler is handlers.formatters.prediction_handler
    assert ip.init_handler is handlers.formatters.init_handler
    assert ip.SAGEMAKER_ADAPTER_IDENTIFIER_HEADER == "X-Amzn-SageMaker-Adapter-Identifier"
    assert async_utils.SAGEMAKER_ADAPTER_IDENTIFIER_HEADER == ip.SAGEMAKER_ADAPTER_IDENTIFIER_HEADER
    assert decode_csv is handlers.encode_decode.decode_csv
    assert tm.TestHandler is handlers.harness.TestHandler
    assert djl_python.PairList is PairList
    assert issubclass(TextGenerationOutput, RequestOutput)
    assert issubclass(TextInput, RequestInput)


def test_request_io_and_async_utils_import_neither_torch_nor_numpy():
    code = ("import sys, djl_python.request_io, djl_python.output_formatter, "
            "djl_python.input_parser, djl_python.async_utils, djl_python.encode_decode\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_decorators_tag_and_return_the_same_function():
    from djl_python.input_parser import init_handler, input_formatter, prediction_handler
    from djl_python.output_formatter import output_formatter

    def f(x, model=None, **kwargs):
        return ("f", x, model)

    assert prediction_handler(f) is f and f.is_prediction_handler is True
    assert init_handler(f) is f and f.is_init_handler is True
    assert input_formatter(f) is f and f.is_input_formatter is True
    assert output_formatter(f) is f and f.is_output_formatter is True
    assert f(1, 2) == ("f", 1, 2)

    def g():
        pass

    assert not hasattr(g, "is_prediction_handler") and not hasattr(g, "is_init_handler")


# ---- request_io ------------------------------------------------------------------------------


def test_token_dicts():
    plain = Token(7, "hi", -0.25)
    assert plain.as_dict() == {"id": 7, "text": "hi", "log_prob": -0.25}
    assert plain.as_tgi_dict() == {"id": 7, "text": "hi", "logprob": -0.25}
    special = Token(2, "</s>", -0.5, special_token=True, error_msg="boom")
    assert special.as_dict() == {"id": 2, "text": "</s>", "log_prob": -0.5,
                                 "special_token": True, "error_msg": "boom"}
    assert special.as_tgi_dict() == {"id": 2, "text": "</s>", "logprob": -0.5, "special": True}
    assert Token(1, "a").as_dict() == {"id": 1, "text": "a", "log_prob": None}
    assert special.request_id is None
    assert repr(plain) == "Token({'id': 7, 'text': 'hi', 'log_prob': -0.25})"


def test_sequence_cursor_first_last_and_top_tokens():
    seq = Sequence()
    assert seq.tokens == [] and seq.top_tokens == [] and seq.cumulative_log_prob == 0.0
    assert seq.finish_reason is None and seq.stop_reason is None
    assert not seq.has_next_token()
    assert seq.get_next_token() == (None, 0, False, False)
    assert seq.get_last_token() is None
    a, b, c = Token(1, "a"), Token(2, "b"), Token(3, "c")
    seq.set_next_token(a)
    seq.set_next_token(b)
    assert seq.get_next_token() == (a, 0, True, False)
    assert seq.get_next_token() == (b, 1, False, False)
    assert not seq.has_next_token() and seq.get_last_token() is None
    seq.set_next_token(c, is_last_token=True)
    assert seq.has_next_token()
    assert seq.get_next_token() == (c, 2, False, True)
    assert seq.get_next_token() == (None, 0, False, False)
    assert seq.get_last_token() is c

    top = [Token(5, "x"), Token(6, "y")]
    seq.set_next_top_tokens(top)
    assert seq.has_next_top_tokens() and seq.get_next_top_tokens() is top
    assert not seq.has_next_top_tokens() and seq.get_next_top_tokens() is None

    only = Sequence()
    only.set_next_token(a, is_last_token=True)
    assert only.get_next_token() == (a, 0, True, True)

    # dataclass defaults are per instance
    assert Sequence().tokens == [] and Sequence().tokens is not Sequence().tokens


def test_request_inputs_defaults():
    ri = RequestInput()
    assert (ri.request_id, ri.client_request_id, ri.output_formatter) == (None, None, None)
    assert ri.parameters == {} and ri.server_parameters == {} and ri.tgi_compat is False
    ti = TextInput(request_id=3, input_text="hello", parameters={"max_new_tokens": 4})
    assert (ti.request_id, ti.input_text, ti.adapters, ti.tokenizer) == (3, "hello", None, None)
    assert ti.parameters == {"max_new_tokens": 4}
    assert TextInput().parameters is not TextInput().parameters


def test_text_generation_output():
    out = TextGenerationOutput(request_id=9, input=TextInput(input_text="p"))
    assert out.finished is False and out.best_sequence_index == 0
    assert list(out.sequences) == [0] and out.sequences[0].tokens == []
    assert out.prompt_tokens_details == [] and out.other_sequences_indices == []

    out.set_next_token(Token(1, "a", -0.1))
    out.set_next_token(Token(2, "b", -0.2), is_last_token=True, finish_reason="length")
    out.set_next_token(Token(3, "z", -1.0), sequence_index=2, finish_reason="eos_token")
    assert sorted(out.sequences) == [0, 2]
    assert out.sequences[0].finish_reason == "length"
    assert out.sequences[2].finish_reason == "eos_token"
    assert out.sequences[0].get_last_token().text == "b"
    assert out.get_tokens_as_dict() == [{"id": 1, "text": "a", "log_prob": -0.1},
                                        {"id": 2, "text": "b", "log_prob": -0.2}]
    assert out.get_tokens_as_dict(2) == [{"id": 3, "text": "z", "log_prob": -1.0}]

    out.set_finish_reason("stop_sequence", sequence_index=2)
    assert out.sequences[2].finish_reason == "stop_sequence"
    out.set_finish_reason("eos_token")
    assert out.sequences[0].finish_reason == "eos_token"

    out.prompt_tokens_details = [Token(10, "p", None)]
    assert out.get_prompt_tokens_as_dict() == [{"id": 10, "text": "p", "log_prob": None}]
    out.set_next_top_tokens([Token(1, "a", -0.1), Token(4, "c", -2.0)], 0)
    assert out.get_top_tokens_as_dict() == [[{"id": 1, "text": "a", "log_prob": -0.1},
                                             {"id": 4, "text": "c", "log_prob": -2.0}]]
    assert out.get_top_tokens_as_dict(2) == []

    out.set_best_sequence_index(2)
    out.other_sequences_indices.append(0)
    assert out.best_sequence_index == 2 and out.other_sequences_indices == [0]

    out.input.tgi_compat = True
    assert out.get_tokens_as_dict(2) == [{"id": 3, "text": "z", "logprob": -1.0}]
    assert out.get_prompt_tokens_as_dict() == [{"id": 10, "text": "p", "logprob": None}]
    assert out.get_top_tokens_as_dict()[0][1] == {"id": 4, "text": "c", "logprob": -2.0}

    # the best sequence exists from the start, whatever its index
    other = TextGenerationOutput(request_id=1, input=TextInput(), best_sequence_index=3)
    assert list(other.sequences) == [3]


# ---- Input / Output: tensors and frames ------------------------------------------------------


INT32_NDLIST = bytes.fromhex(
    "00000001" "00044e444152" "00000003" "00" "000764656661756c74" "0005494e543332"
    "00000001" "0000000000000002" "00000001" "003f" "3c" "00000008" "0100000002000000")


def test_ndlist_bytes_match_djl_layout():
    assert bytes(np_util.to_nd_list(np.array([1, 2], dtype=np.int32))) == INT32_NDLIST
    assert isinstance(np_util.to_nd_list([np.zeros(1)]), bytearray)
    [back] = np_util.from_nd_list(bytearray(INT32_NDLIST))
    assert back.dtype == np.int32 and back.tolist() == [1, 2]


def test_numpy_round_trips_through_input_and_output():
    arrays = [np.arange(6, dtype=np.float32).reshape(1, 3, 2),
              np.array([[True, False]]), np.array([-1, 7], dtype=np.int64)]
    for request in (tm.create_numpy_request(arrays), tm.create_npz_request(arrays)):
        got = request.get_as_numpy() if request.get_property("content-type") == \
            "tensor/ndlist" else request.get_as_npz()
        assert [a.dtype for a in got] == [np.float32, np.bool_, np.int64]
        assert [a.shape for a in got] == [(1, 3, 2), (1, 2), (2,)]
        assert got[0].tolist() == [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]]
        assert got[1].tolist() == [[True, False]] and got[2].tolist() == [-1, 7]
    assert tm.create_numpy_request(arrays).properties == {"device_id": "-1",
                                                          "content-type": "tensor/ndlist"}
    # an .npz body is accepted where an NDList is expected
    assert tm.create_npz_request(arrays).get_as_numpy()[2].tolist() == [-1, 7]
    assert decode(tm.create_numpy_request(arrays[2]), "tensor/ndlist")["inputs"][0].tolist() \
        == [-1, 7]

    out = (djl_python.Output().add_as_json({"Key": "Value"}, "dict")
           .add_as_numpy(arrays, "ndlist").add_as_npz(arrays, "npz"))
    assert json.loads(tm.extract_output_as_string(out, "dict")) == {"Key": "Value"}
    assert tm.extract_output_as_numpy(out, "ndlist")[0].tolist() == arrays[0].tolist()
    assert tm.extract_output_as_npz(out, "npz")[1].tolist() == [[True, False]]
    assert tm.extract_output_as_bytes(out, "dict") == b'{"Key":"Value"}'
    assert tm.extract_output_as_bytes(out) == b'{"Key":"Value"}'  # no "data": the first entry
    assert np_util.from_nd_list(tm.extract_output_as_bytes(out, "ndlist"))[2].tolist() == [-1, 7]


def test_binary_encode_frame_bytes_and_decoders():
    frame = djl_python.Output.binary_encode({"data": "x\n", "last": True})
    assert isinstance(frame, Frame)
    assert frame == bytes.fromhex("0002" "00000004" "64617461" "00000002" "780a"
                                  "00000004" "6c617374" "00000004" "54727565")
    assert decode_frame(frame) == {"data": "x\n", "last": "True"}
    assert tm.decode_encoded_output_binary(bytearray(frame)) == {"data": "x\n", "last": "True"}
    with_none = djl_python.Output.binary_encode({"data": None, "code": 424})
    assert decode_frame(with_none) == {"data": None, "code": "424"}
    assert tm.retrieve_short(frame, 0) == (2, 2)
    assert tm.retrieve_int(frame, 2) == (4, 6)
    assert tm.retrieve_utf8(frame, 2) == ("data", 10)
    assert tm.retrieve_utf8(bytes.fromhex("ffffffff"), 0) == (None, 4)


def test_np_util_byte_helpers():
    assert np_util.set_int(3) == b"\x00\x00\x00\x03" and np_util.set_long(2) == b"\0" * 7 + b"\2"
    assert np_util.set_str("NDAR") == b"\x00\x04NDAR" and np_util.set_char("?") == b"\x00?"
    buf = np_util.set_str("héllo") + np_util.set_int(-5) + np_util.set_long(1 << 40) \
        + np_util.set_char("<") + b"\x07abc"
    s, i = np_util.get_str(buf, 0)
    assert (s, i) == ("héllo", 8)
    v, i = np_util.get_int(buf, i)
    assert (v, i) == (-5, 12)
    v, i = np_util.get_long(buf, i)
    assert (v, i) == (1 << 40, 20)
    v, i = np_util.get_char(buf, i)
    assert (v, i) == ("<", 22)
    assert np_util.get_byte_as_int(buf, i) == (7, 23)
    assert np_util.get_bytes(buf, 23, 3) == (b"abc", 26)
    assert (np_util.MAGIC_NUMBER, np_util.VERSION) == ("NDAR", 3)


# ---- encode_decode ---------------------------------------------------------------------------


def csv_input(text):
    return make_input({"content-type": "text/csv"}, [("data", text.encode())])


def test_decode_csv_with_headers():
    inputs = csv_input("inputs,other\ntest input 1,value1\ntest input 2,value2")
    assert decode_csv(inputs) == {"inputs": ["test input 1", "test input 2"]}
    assert decode(inputs, "text/csv") == {"inputs": ["test input 1", "test input 2"]}
    qa = csv_input("question,context\nWhat is AI?,Tech\nWhat is ML?,Learning")
    assert decode_csv(qa) == {"inputs": [{"question": "What is AI?", "context": "Tech"},
                                         {"question": "What is ML?", "context": "Learning"}]}
    assert decode_csv(csv_input("Question,x\nq,1")) == {"inputs": [{"Question": "q", "x": "1"}]}
    for bad in ("invalid,header\nvalue1,value2", ""):
        with pytest.raises(ValueError, match="correct CSV with Header columns"):
            decode_csv(csv_input(bad))
    keyed = make_input({}, [("data", b"x"), ("rows", b"inputs\nr1\nr2")])
    assert decode(keyed, "text/csv", key="rows") == {"inputs": ["r1", "r2"]}


def test_decode_csv_numeric_without_headers():
    matrix = decode_csv(csv_input("1,2,3\n4.5,5,6"), require_headers=False)
    assert isinstance(matrix, np.ndarray) and matrix.tolist() == [[1, 2, 3], [4.5, 5, 6]]
    row = decode(csv_input("1,2"), "text/csv", require_csv_headers=False)
    assert row.shape == (2,) and row.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="non-numeric"):
        decode_csv(csv_input("1,a\n2,3"), require_headers=False)


def test_encode_csv_and_encode():
    rows = [{"name": "Axl", "age": "30"}, {"name": "Fiona", "age": "25"}]
    assert encode_csv(rows) == "name,age\r\nAxl,30\r\nFiona,25\r\n"
    assert encode_csv(iter(rows[:1])) == "name,age\r\nAxl,30\r\n"
    assert list(csv.DictReader(io.StringIO(encode_csv(rows)))) == rows
    out = encode(djl_python.Output(), rows, "text/csv")
    assert out.properties == {"Content-Type": "text/csv"}
    assert out.content.value_at(0) == b"name,age\r\nAxl,30\r\nFiona,25\r\n"
    out = encode(djl_python.Output(), {"y": [1, 2]}, None, key="k")
    assert out.content.key_at(0) == "k" and json.loads(out.content.value_at(0)) == {"y": [1, 2]}
    assert out.properties == {"Content-Type": "application/json"}
    out = encode(djl_python.Output(), [np.array([1, 2], dtype=np.int32)], "tensor/ndlist")
    assert out.content.value_at(0) == INT32_NDLIST
    assert out.properties == {"Content-Type": "tensor/ndlist"}
    out = encode(djl_python.Output(), [np.array([3.0])], "tensor/npz")
    assert out.properties == {"Content-Type": "tensor/npz"}
    assert tm.extract_output_as_npz(out)[0].tolist() == [3.0]


def test_decode_by_content_type():
    body = make_input({}, [("data", b"key1=v1&key2=v2")])
    assert decode(body, "application/x-www-form-urlencoded") == {"inputs": "key1=v1&key2=v2"}
    assert decode(body, "audio/wav") == {"inputs": b"key1=v1&key2=v2"}
    assert decode(body, "application/octet-stream") == {"inputs": b"key1=v1&key2=v2"}
    assert decode(body, "text/plain; charset=utf-8") == {"inputs": ["key1=v1&key2=v2"]}
    assert decode(make_input({}, []), None) == {"inputs": ""}
    assert decode(make_input({}, [("data", b'{"a": 1}')]), "") == {"a": 1}
    assert decode(make_input({}, [("data", b"x"), ("j", b"[1]")]), "application/json",
                  key="j") == [1]


# ---- async_utils -----------------------------------------------------------------------------


def only_frame(output):
    assert output.content.size() == 1
    value = output.content.value_at(0)
    assert isinstance(value, Frame)
    return decode_frame(value)


def test_non_stream_and_stream_chunk_outputs():
    out = async_utils.create_non_stream_output({"generated_text": "héllo"},
                                               properties={"X-Extra": "1"})
    assert out.code == 200
    assert out.properties == {"Content-Type": "application/json", "X-Extra": "1"}
    assert only_frame(out) == {"data": '{"generated_text": "héllo"}\n', "last": "True"}

    err = async_utils.create_non_stream_output("", error="bad input", code=400)
    assert only_frame(err) == {"data": "\n", "last": "True", "error": "bad input", "code": "400"}

    chunk = async_utils.create_stream_chunk_output("tok", False)
    assert chunk.properties == {"Content-Type": "application/jsonlines"}
    assert only_frame(chunk) == {"data": "tok\n", "last": "False"}
    end = async_utils.create_stream_chunk_output({"t": 1}, True)
    assert only_frame(end) == {"data": '{"t": 1}\n', "last": "True"}


async def agen(items):
    for item in items:
        await asyncio.sleep(0)
        yield item


async def collect(aiter):
    return [only_frame(o) async for o in aiter]


def test_handle_streaming_response():
    def fmt(chunk, suffix=""):
        return chunk.upper() + suffix, chunk == "c"

    frames = asyncio.run(collect(async_utils.handle_streaming_response(
        agen(["a", "b", "c", "never"]), fmt, suffix="!")))
    assert frames == [{"data": "A!\n", "last": "False"}, {"data": "B!\n", "last": "False"},
                      {"data": "C!\n", "last": "True"}]

    seen = []

    def accumulate(chunk, history):
        seen.append(list(history))
        history = history + [chunk]
        return "".join(history), False, history

    frames = asyncio.run(collect(async_utils.handle_streaming_response(
        agen(["x", "y"]), accumulate, accumulate_chunks=True)))
    assert frames == [{"data": "x\n", "last": "False"}, {"data": "xy\n", "last": "False"}]
    assert seen == [[], ["x"]]

    def failing(chunk):
        if chunk == "bad":
            raise RuntimeError("cannot format")
        return chunk, False

    frames = asyncio.run(collect(async_utils.handle_streaming_response(
        agen(["ok", "bad", "after"]), failing)))
    assert frames == [{"data": "ok\n", "last": "False"},
                      {"data": "\n", "last": "True", "error": "cannot format", "code": "424"}]


def test_extract_lora_adapter():
    header = "X-Amzn-SageMaker-Adapter-Identifier"
    payload = {"inputs": "x", "adapters": "from-payload"}
    req = make_input({header: "from-header"}, [])
    assert async_utils._extract_lora_adapter(req, payload) == "from-header"
    assert payload == {"inputs": "x", "adapters": "from-payload"}  # untouched
    lower = make_input({header.lower(): "lower"}, [])
    assert async_utils._extract_lora_adapter(lower, {}) == "lower"
    assert async_utils._extract_lora_adapter(make_input({}, []), payload) == "from-payload"
    assert payload == {"inputs": "x"}  # popped
    assert async_utils._extract_lora_adapter(make_input({}, []), payload) is None


# ---- test_model: requests and properties -----------------------------------------------------


def test_request_builders(tmp_path):
    assert tm.create_json_request({"a": 1}).properties == {"device_id": "-1",
                                                           "content-type": "application/json"}
    assert tm.create_json_request({"a": 1}, key="k").get_as_json("k") == {"a": 1}
    text = tm.create_text_request("Hello World")
    assert text.get_as_string() == "Hello World"
    assert text.properties["content-type"] == "text/plain"
    with pytest.raises(KeyError):
        text.get_as_string("not-exist-key")
    p3 = tm.create_3p_request({"inputs": "x"}, stream=True)
    assert p3.get_property("X-Amzn-SageMaker-Forwarded-Api") == "InvokeEndpointWithResponseStream"
    assert tm.create_3p_request({}).get_property("X-Amzn-SageMaker-Forwarded-Api") == \
        "InvokeEndpoint"

    (tmp_path / "in.json").write_bytes(b'{"inputs": "file"}')
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    req = tm.create_request([str(tmp_path / "in.json")], ["temperature=0.5", "a=b=c"])
    assert req.properties == {"device_id": "-1", "temperature": "0.5", "a": "b=c",
                              "content-type": "application/json"}
    assert req.get_as_json() == {"inputs": "file"}
    req = tm.create_request(['{"inputs": "literal"}'])
    assert req.properties["content-type"] == "application/json"
    assert req.content.get_keys() == [None] and req.get_as_json() == {"inputs": "literal"}
    req = tm.create_request(["hello", f"data={tmp_path / 'img.png'}"])
    assert req.content.get_keys() == [None, "data"]
    assert req.get_as_bytes() == b"\x89PNG" and req.properties["content-type"] == "image/png"
    assert req.content.value_at(0) == b"hello"  # "data" is the body, not the first entry
    with pytest.raises(ValueError, match="Invalid model parameter: nokey"):
        tm.create_request(["x"], ["nokey"])


def test_concurrent_batch_request():
    inputs = [{"inputs": "who?", "parameters": {"max_new_tokens": 256}}, {"inputs": "b"}]
    props = [{"eula": "true", "Content-type": "application/json"}, {"x": "1"}]
    serving = {"engine": "Python", "option.rolling_batch": "auto"}
    req = tm.create_concurrent_batch_request(inputs, props, serving)
    assert req.properties["batch_size"] == 2 and req.function_name == "handle"
    assert req.properties["option.rolling_batch"] == "auto"
    assert req.content.get_keys() == ["batch_000_data", "batch_001_data"]
    first, second = req.get_batches()
    assert first.get_as_json() == inputs[0] and second.get_as_json() == inputs[1]
    assert first.properties == {"eula": "true", "Content-type": "application/json",
                                "engine": "Python", "option.rolling_batch": "auto"}
    assert second.properties == {"x": "1", "engine": "Python", "option.rolling_batch": "auto"}
    named = tm.create_concurrent_batch_request([{}], serving_properties={"handler": "other"})
    assert named.function_name == "other"


def test_properties_file_and_environment(tmp_path):
    (tmp_path / "serving.properties").write_text(textwrap.dedent("""\
        # comment
        engine=Python
        option.model_id = /models/x
        option.greeting: hi \\
          there
        ! another comment
        batch_size=4
    """))
    assert tm.load_properties(str(tmp_path)) == {"engine": "Python", "model_id": "/models/x",
                                                 "greeting": "hi there", "batch_size": "4"}
    assert tm.load_properties(None) == {} and tm.load_properties(str(tmp_path / "no")) == {}
    env = {"OPTION_ROLLING_BATCH": "auto", "OPTION_ENTRYPOINT": "m.py", "HF_MODEL_ID": "org/m",
           "OPTION_GREETING": "env", "PATH": "/bin", "SERVING_UNKNOWN_THING": "1"}
    got = tm.update_properties_with_env_vars({"greeting": "kept"}, env)
    assert got == {"greeting": "kept", "rolling_batch": "auto", "entryPoint": "m.py",
                   "model_id": "org/m"}
    props = tm.model_properties(str(tmp_path), env)
    assert props["greeting"] == "hi there" and props["model_id"] == "/models/x"  # file wins
    assert props["rolling_batch"] == "auto" and props["batch_size"] == "4"
    assert props["model_dir"] == str(tmp_path) and props["model_name"] == tmp_path.name
    assert props["engine"] == "Python"


# ---- test_model: running handlers ------------------------------------------------------------


ECHO_HANDLER = """
from djl_python import Input, Output

init = {}

def handle(inputs: Input):
    if inputs.is_empty():
        init.update(inputs.get_properties())
        return None
    outputs = Output()
    for i, item in enumerate(inputs.get_batches()):
        data = item.get_as_json()
        if data.get("fail"):
            raise ValueError("asked to fail")
        outputs.add_as_json({"echo": data, "greeting": init.get("greeting"),
                             "model_dir_seen": init.get("model_dir") is not None,
                             "temperature": item.get_property("temperature")},
                            batch_index=i if inputs.is_batch() else None)
        outputs.add_property("X-Item" if not inputs.is_batch() else f"batch_{i:03d}_X-Item",
                             str(i))
    return outputs
"""

STREAM_HANDLER = """
from djl_python import Output

def handle(inputs):
    if inputs.is_empty():
        return None
    words = inputs.get_as_string().split()
    return Output().add_property("Content-Type", "text/plain").add_stream_content(
        iter(words), output_formatter=lambda w: w.upper() + "|")
"""

# DJL's rolling-batch handler shape: the active requests are known by position; new requests
# join at the end with their body, the others come back with {"inputs": ""}; every call returns
# one frame per active request, and a request whose frame is last leaves.
ROLLING_HANDLER = """
from djl_python import Output

active = []

def handle(inputs):
    if inputs.is_empty():
        return None
    batch = inputs.get_batches()
    if inputs.get_property("reset_rollingbatch"):
        active.clear()
    for item in batch[len(active):]:
        active.append(list(item.get_as_json()["inputs"]))
    outputs = Output()
    for i, remaining in enumerate(active):
        outputs.add(Output.binary_encode({"data": remaining.pop(0), "last": not remaining}),
                    batch_index=i)
    active[:] = [r for r in active if r]
    return outputs
"""


def model_dir(tmp_path, name, source, properties="option.greeting=hello\n"):
    d = tmp_path / name
    d.mkdir()
    (d / "model.py").write_text(source)
    (d / "serving.properties").write_text(properties)
    return d


def test_handler_single_batch_error_and_shutdown(tmp_path):
    d = model_dir(tmp_path, "echo", ECHO_HANDLER)
    with tm.TestHandler("model.py", str(d)) as handler:
        assert handler.serving_properties["greeting"] == "hello"
        assert handler.serving_properties["entryPoint"] == "model.py"
        assert handler.serving_properties["model_dir"] == str(d)

        req = tm.create_json_request({"inputs": "hi"})
        req.properties["temperature"] = "0.7"
        out = handler.inference(req)
        assert (out.code, out.message) == (200, "OK")
        assert out.properties["X-Item"] == "0"
        assert json.loads(tm.extract_output_as_string(out)) == {
            "echo": {"inputs": "hi"}, "greeting": "hello", "model_dir_seen": True,
            "temperature": "0.7"}

        batch = handler.inference_batch([{"inputs": "a"}, {"inputs": "b"}],
                                        [{"temperature": "1"}, {}])
        assert batch.code == 200
        assert batch.content.get_keys() == ["batch_000_data", "batch_001_data"]
        assert batch.properties["batch_000_X-Item"] == "0"
        assert batch.properties["batch_001_X-Item"] == "1"
        assert batch.properties["batch_000_code"] == "200"
        first = json.loads(tm.extract_output_as_string(batch, "batch_000_data"))
        second = json.loads(tm.extract_output_as_string(batch, "batch_001_data"))
        assert first["echo"] == {"inputs": "a"} and first["temperature"] == "1"
        assert second["echo"] == {"inputs": "b"} and second["temperature"] is None

        [result] = handler.invoke(tm.create_json_request({"fail": True}))
        assert result.code == 424 and result.stream is None
        assert "asked to fail" in json.loads(result.body)["error"]
        failed = handler.inference(tm.create_json_request({"fail": True}))
        assert failed.code == 424

        # a handler function the model.py does not define: LMC's 400
        named = tm.create_json_request({})
        named.function_name = "register_adapter"
        assert handler.inference(named).code == 400


def test_handler_given_as_a_module(tmp_path, monkeypatch):
    d = model_dir(tmp_path, "modpkg", ECHO_HANDLER)
    (d / "echo_mod_for_harness.py").write_text(ECHO_HANDLER)
    monkeypatch.syspath_prepend(str(d))
    import importlib

    module = importlib.import_module("echo_mod_for_harness")
    handler = tm.TestHandler(module)
    try:
        assert handler.model_dir == str(d)
        assert handler.serving_properties["entryPoint"] == "echo_mod_for_harness"
        out = handler.inference(tm.create_json_request({"inputs": 1}))
        assert json.loads(tm.extract_output_as_bytes(out))["greeting"] == "hello"
        assert module.init["greeting"] == "hello"  # the same module object was driven
    finally:
        handler.shutdown()
        sys.modules.pop("echo_mod_for_harness", None)


FINALIZE_HANDLER = """
from djl_python import Output

events = []

def handle(inputs):
    if inputs.is_empty():
        return None
    text = inputs.get_as_string()
    out = Output().finalize(events.append, "done " + text)
    if text == "stream":
        return out.add_stream_content(iter(["s1", "s2"]))
    return out.add(text)
"""


def test_finalize_runs_after_the_answer(tmp_path, monkeypatch):
    d = model_dir(tmp_path, "fin", FINALIZE_HANDLER, "")
    (d / "fin_mod_for_harness.py").write_text(FINALIZE_HANDLER)
    monkeypatch.syspath_prepend(str(d))
    import importlib

    module = importlib.import_module("fin_mod_for_harness")
    try:
        with tm.TestHandler(module) as handler:
            out = handler.inference(tm.create_text_request("body"))
            assert module.events == ["done body"]
            assert tm.extract_output_as_string(out) == "body"
            out = handler.inference(tm.create_text_request("stream"))
            assert module.events == ["done body"]  # not before the stream is read
            assert list(out.iter_stream()) == [b"s1", b"s2"]
            assert module.events == ["done body", "done stream"]
    finally:
        sys.modules.pop("fin_mod_for_harness", None)


def test_handler_stream(tmp_path):
    d = model_dir(tmp_path, "stream", STREAM_HANDLER, "")
    with tm.TestHandler(model_dir=str(d)) as handler:
        assert "entryPoint" not in handler.serving_properties
        out = handler.inference(tm.create_text_request("one two three"))
        assert out.properties["Content-Type"] == "text/plain"
        assert list(out.iter_stream()) == [b"ONE|", b"TWO|", b"THREE|"]


def test_inference_rolling_batch(tmp_path):
    d = model_dir(tmp_path, "rolling", ROLLING_HANDLER, "option.rolling_batch=auto\n")
    with tm.TestHandler("model.py", str(d)) as handler:
        result = handler.inference_rolling_batch([{"inputs": "abc"}, {"inputs": "de"},
                                                  {"inputs": "f"}])
    assert result == {0: "abc", 1: "de", 2: "f"}


DECORATED_HANDLER = """
from djl_python.input_parser import init_handler, prediction_handler

class Doubler:
    def predict(self, X):
        return [2 * x for x in X]

@init_handler
def load(model_dir, **kwargs):
    return Doubler()

@prediction_handler
def predict(X, model, **kwargs):
    return {"doubled": model.predict(X), "n": len(X)}
"""


def test_harness_runs_a_decorated_model_py(tmp_path):
    d = model_dir(tmp_path, "decorated", DECORATED_HANDLER, "")
    with tm.TestHandler(model_dir=str(d)) as handler:
        out = handler.inference(tm.create_json_request({"inputs": [1, 2.5]}))
        assert out.code == 200
        assert json.loads(tm.extract_output_as_bytes(out)) == {
            "predictions": {"doubled": [2, 5.0], "n": 2}}


def test_describe_output_matches_djl_summary():
    out = djl_python.Output().add_property("Content-Type", "text/plain").add("hi")
    out.add(b"x", key="k")
    assert json.loads(tm.describe_output(out)) == {
        "code": 200, "message": "OK", "properties": {"Content-Type": "text/plain"},
        "content": {"null": "type: <class 'bytes'>", "k": "type: <class 'bytes'>"}}


# ---- test_model: the command -----------------------------------------------------------------


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "djl_python.test_model", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_command_runs_a_model_dir(tmp_path):
    d = model_dir(tmp_path, "echo", ECHO_HANDLER)
    (tmp_path / "input.json").write_text('{"inputs": "from file"}')
    done = run_cli("--model-dir", str(d), "--input", str(tmp_path / "input.json"),
                   "--parameters", "temperature=0.2")
    assert done.returncode == 0, done.stderr
    body = {"echo": {"inputs": "from file"}, "greeting": "hello", "model_dir_seen": True,
            "temperature": "0.2"}
    summary = {"code": 200, "message": "OK", "properties": {"X-Item": "0"},
               "content": {"null": "type: <class 'bytes'>"}}
    expected = ("output: " + json.dumps(summary, indent=2) + "\n"
                + json.dumps(body, separators=(",", ":")) + "\n")
    assert done.stdout == expected

    failed = run_cli("--model-dir", str(d), "--input", '{"fail": true}')
    assert failed.returncode == 1
    summary_text, body_line = failed.stdout.rstrip("\n").rsplit("\n", 1)
    assert summary_text.startswith("output: {")
    summary = json.loads(summary_text[len("output: "):])
    assert summary["code"] == 424 and summary["content"] == {"null": "type: <class 'bytes'>"}
    assert "asked to fail" in json.loads(body_line)["error"]
    assert "failed on a batch of 1" in failed.stderr  # the worker's log line, on stderr


def test_command_handler_flag_names_the_entry_function(tmp_path):
    d = model_dir(tmp_path, "named", textwrap.dedent("""
        def answer(inputs):
            from djl_python import Output
            if inputs.is_empty():
                return None
            return Output().add("answer:" + inputs.get_as_string())
    """), "")
    done = run_cli("--model-dir", str(d), "--handler", "answer", "--input", "q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "answer:q"
    with tm.TestHandler(model_dir=str(d), handler="answer") as handler:
        assert handler.serving_properties["handler"] == "answer"
        req = tm.create_text_request("r")
        req.function_name = "answer"
        assert tm.extract_output_as_string(handler.inference(req)) == "answer:r"
    missing = run_cli("--model-dir", str(d), "--input", "q")  # no handle() in it
    assert missing.returncode == 1 and "defines no handle(inputs)" in missing.stderr


def test_command_stream_and_frames(tmp_path):
    d = model_dir(tmp_path, "stream", STREAM_HANDLER, "")
    done = run_cli("--model-dir", str(d), "--input", "a b")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["chunk: A|", "chunk: B|"]
    assert '"Content-Type": "text/plain"' in done.stdout

    # an async_utils frame answer: the service turns the frame into the response body
    d = model_dir(tmp_path, "frame", textwrap.dedent("""
        from djl_python.async_utils import create_non_stream_output

        def handle(inputs):
            if inputs.is_empty():
                return None
            return create_non_stream_output({"t": inputs.get_as_string()})
    """), "")
    done = run_cli("--model-dir", str(d), "--input", "hey")
    assert done.returncode == 0, done.stderr
    summary_text, body_line = done.stdout.rstrip("\n").rsplit("\n", 1)
    assert json.loads(summary_text[len("output: "):])["properties"] == {
        "Content-Type": "application/json"}
    assert body_line == '{"t": "hey"}'


def test_command_load_failure(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("--model-dir", str(empty), "--input", "x")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: no model.py, no option.entryPoint and no config.json")
    done = run_cli("--model-dir", str(empty), "--entry-point", "missing.py", "--input", "x")
    assert done.returncode == 1 and "missing.py" in done.stderr
