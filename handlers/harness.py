"""DJL's local test harness (`djl_python.test_model`): run a model directory's handler in this
process, without a server, the way the LMC worker would run it.

As a library: build requests with `create_json_request`, `create_text_request`,
`create_numpy_request`, `create_npz_request`, `create_3p_request`, `create_request` (files or
literal values) or `create_concurrent_batch_request` (a DJL-convention batch), hand them to
`TestHandler(entry_point, model_dir).inference(...)`, and read the answer with the
`extract_output_as_*` helpers. `inference_rolling_batch` drives a batch until every request's
last frame has arrived and returns the text per request.

As a command:

    python -m djl_python.test_model --model-dir DIR [--entry-point FILE] [--handler NAME]
        [--input FILE|VALUE|key=FILE ...] [--parameters key=value ...]

prints the response (DJL's `output: {...}` summary, then the body) and exits 1 when the answer
is an error (status >= 400) or the handler does not load.

The handler is loaded by `ModelService.load(model_dir, properties)` and called through
`ModelService.invoke`, exactly the server's path: properties are serving.properties in the model
dir over the OPTION_* / HF_MODEL_ID environment (option. prefixes dropped, as the handler sees
them), plus model_dir, model_name, engine and batch_size. Unlike DJL's harness it does not chdir
into the model dir (the LMC worker does not either) and it does not copy the serving properties
into every request (the handler received them in its warm-up call).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from engines.contracts.names import FUNCTION_PROPERTY, ITEM_CODE_PROPERTY
from engines.contracts.protocol import RequestItem
from engines.options import MODEL_ENV, environment_settings
from handlers.inputs import Input, batch_key
from handlers.outputs import Output, decode_frame, to_json_bytes
from handlers.pair_list import PairList
from handlers.service import HandlerLoadError, ItemResult, ModelService

PROPERTIES_FILE = "serving.properties"
DEFAULT_FUNCTION = "handle"
# The header DJL's 3P (SageMaker) requests carry, and its two values.
FORWARDED_API_HEADER = "X-Amzn-SageMaker-Forwarded-Api"

# Content types picked by the data file's extension (DJL's list, with image/ spelled right).
_EXTENSION_TYPES = {
    ".json": "application/json", ".txt": "text/plain", ".gif": "image/gif",
    ".png": "image/png", ".jpeg": "image/jpeg", ".jpg": "image/jpeg",
    ".ndlist": "tensor/ndlist", ".npz": "tensor/npz",
}
# A rolling-batch handler that never says "last" must not hang a test forever.
MAX_ROLLING_STEPS = 100_000


def _new_request(content_type: str) -> Input:
    return Input({"device_id": "-1", "content-type": content_type})


# ---- building requests -----------------------------------------------------------------------


def create_request(input_files: Sequence[str], parameters: Sequence[str] | None = None) -> Input:
    """One request from the command line's --input and --parameters.

    Each input is `VALUE` or `key=VALUE`; a VALUE naming an existing file adds the file's bytes,
    anything else adds the text itself (content-type application/json when it looks like a
    JSON object, else text/plain). The content type then follows the extension of the "data"
    entry (or of the first entry): .json, .txt, .gif, .png, .jpg/.jpeg, .ndlist, .npz.
    Each parameter is `key=value` and becomes a request property; anything else is a
    ValueError."""
    if isinstance(input_files, str):
        input_files = [input_files]
    request = Input({"device_id": "-1"})
    for parameter in parameters or ():
        name, sep, value = parameter.partition("=")
        if not sep or not name:
            raise ValueError(f"Invalid model parameter: {parameter} (expected key=value)")
        request.properties[name] = value
    data_file = None
    for spec in input_files:
        key, sep, value = spec.partition("=")
        if not sep or os.path.exists(spec):
            key, value = None, spec
        if data_file is None or key == "data":
            data_file = value
        if os.path.isfile(value):
            with open(value, "rb") as f:
                request.content.add(key, f.read())
        else:
            request.content.add(key, value.encode("utf-8"))
            looks_json = value.startswith("{") and value.endswith("}")
            request.properties["content-type"] = "application/json" if looks_json else "text/plain"
    if data_file is not None:
        ext = os.path.splitext(data_file)[1].lower()
        if ext in _EXTENSION_TYPES:
            request.properties["content-type"] = _EXTENSION_TYPES[ext]
    return request


def create_concurrent_batch_request(inputs: Sequence[Any],
                                    properties: Sequence[Mapping[str, Any]] | None = None,
                                    serving_properties: Mapping[str, Any] | None = None) -> Input:
    """A DJL-convention batch: item i's JSON body under "batch_%03d_data", its properties
    (properties[i]) prefixed "batch_%03d_"; `serving_properties` stay unprefixed, so every
    item sees them; "batch_size" is the number of items. The Input's `function_name` is the
    serving properties' "handler" (default handle)."""
    props: dict[str, Any] = dict(serving_properties or {})
    for i, item_props in enumerate(properties or ()):
        for name, value in item_props.items():
            props[batch_key(i, name)] = value
    content = PairList()
    for i, data in enumerate(inputs):
        content.add(batch_key(i, "data"), to_json_bytes(data))
    props["batch_size"] = len(inputs)
    request = Input(props, content)
    request.function_name = props.get(FUNCTION_PROPERTY, DEFAULT_FUNCTION)
    return request


def create_json_request(json_data: Any, key: str | None = None) -> Input:
    request = _new_request("application/json")
    request.content.add(key, to_json_bytes(json_data))
    return request


def create_text_request(text: str, key: str | None = None) -> Input:
    request = _new_request("text/plain")
    request.content.add(key, text.encode("utf-8"))
    return request


def create_3p_request(json_data: Any, stream: bool = False, key: str | None = None) -> Input:
    """A JSON request as SageMaker forwards it (the 3P path), streaming or not."""
    request = create_json_request(json_data, key)
    request.properties[FORWARDED_API_HEADER] = ("InvokeEndpointWithResponseStream" if stream
                                                else "InvokeEndpoint")
    return request


def create_numpy_request(arrays: Any, key: str | None = None) -> Input:
    from handlers.ndlist import encode_ndlist

    request = _new_request("tensor/ndlist")
    request.content.add(key, encode_ndlist(arrays))
    return request


def create_npz_request(arrays: Any, key: str | None = None) -> Input:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, *(arrays if isinstance(arrays, list) else [arrays]))
    request = _new_request("tensor/npz")
    request.content.add(key, buf.getvalue())
    return request


# ---- reading answers -------------------------------------------------------------------------


def extract_output_as_input(outputs: Output) -> Input:
    """The Output's properties and content seen as an Input, so Input's readers apply."""
    return Input(outputs.properties, outputs.content)


def extract_output_as_bytes(outputs: Output, key: str | None = None) -> bytes | None:
    return extract_output_as_input(outputs).get_as_bytes(key)


def extract_output_as_numpy(outputs: Output, key: str | None = None) -> list:
    return extract_output_as_input(outputs).get_as_numpy(key)


def extract_output_as_npz(outputs: Output, key: str | None = None) -> list:
    return extract_output_as_input(outputs).get_as_npz(key)


def extract_output_as_string(outputs: Output, key: str | None = None) -> str:
    return extract_output_as_input(outputs).get_as_string(key)


def retrieve_int(data: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from(">i", data, pos)[0], pos + 4


def retrieve_short(data: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from(">h", data, pos)[0], pos + 2


def retrieve_utf8(data: bytes, pos: int) -> tuple[str | None, int]:
    """An int32-length-prefixed UTF-8 string and the next position; (None, next) for length
    -1, which encodes None."""
    size, pos = retrieve_int(data, pos)
    if size < 0:
        return None, pos
    return bytes(data[pos:pos + size]).decode("utf-8"), pos + size


def decode_encoded_output_binary(binary: bytes) -> dict[str, str | None]:
    """The dict an `Output.binary_encode` frame holds (values as strings: "True", "424")."""
    return decode_frame(bytes(binary))


# ---- properties ------------------------------------------------------------------------------


def parse_properties(text: str) -> dict[str, str]:
    """serving.properties text: `key=value` or `key: value` lines, # and ! comments, blank lines,
    a trailing backslash continuing a line (the same subset the LMC front end reads)."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + lines[i].strip()
            i += 1
        if not line or line[0] in "#!":
            continue
        m = re.match(r"([^=:\s]+)\s*[=:]\s*(.*)$", line)
        if not m:
            raise ValueError(f"cannot parse serving.properties line {line!r}; expected key=value")
        out[m.group(1)] = m.group(2).strip()
    return out


def _strip_option(key: str) -> str:
    return key[len("option."):] if key.startswith("option.") else key


def load_properties(properties_dir: str | None) -> dict[str, str]:
    """`properties_dir`/serving.properties as the handler sees it: option. prefixes dropped.
    {} when there is no directory or no file."""
    if not properties_dir:
        return {}
    path = os.path.join(properties_dir, PROPERTIES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {_strip_option(k): v for k, v in parse_properties(f.read()).items()}


def update_properties_with_env_vars(kwargs: dict[str, str],
                                    env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fill in, without overriding what `kwargs` has, the model keys the environment sets the
    way the LMC server reads them: OPTION_<NAME> (-> name, lower-cased; OPTION_ENTRYPOINT ->
    entryPoint), HF_MODEL_ID (-> model_id) and LMC's other per-model variables."""
    env = os.environ if env is None else env
    relevant = {k: v for k, v in env.items() if k.startswith("OPTION_") or k in MODEL_ENV}
    for key, setting in environment_settings(relevant).items():
        kwargs.setdefault(_strip_option(key), setting.value)
    return kwargs


def model_properties(model_dir: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What `ModelService.load` gets for `model_dir`: serving.properties over the environment,
    plus model_dir, model_name, engine and batch_size (as the worker's warm-up call has)."""
    props = update_properties_with_env_vars({}, env)
    props.update(load_properties(model_dir))
    model_dir = os.path.abspath(model_dir)
    props["model_dir"] = model_dir
    props.setdefault("model_name", os.path.basename(model_dir.rstrip(os.sep)) or "model")
    props.setdefault("engine", "Python")
    props.setdefault("batch_size", "1")
    return props


# ---- running the handler ---------------------------------------------------------------------


def _items(inputs: Input, entry_function: str) -> list[RequestItem]:
    # The loaded entry function answers a plain request; another name goes to the service as
    # the request's "handler" property, which LMC routes to DJL's control functions
    # (register_adapter, ...) and answers 400 for any other name.
    function = getattr(inputs, "function_name", None)
    items = []
    for i, one in enumerate(inputs.get_batches()):
        props = {k: str(v) for k, v in one.properties.items()}
        if function and function not in (entry_function, DEFAULT_FUNCTION):
            props[FUNCTION_PROPERTY] = function
        items.append(RequestItem(i, props, [(k, bytes(v)) for k, v in one.content]))
    return items


def output_from_results(results: Sequence[ItemResult]) -> Output:
    """The ItemResults of one dispatch as one Output: for one request its status, headers and
    body (or its stream, lazily); for a batch, item i's body under "batch_%03d_data", its
    headers and its status (as "batch_%03d_code") prefixed the same way."""
    if len(results) == 1:
        r = results[0]
        out = Output(r.code, r.message)
        out.properties.update(r.headers)
        if r.stream is not None:
            out.add_stream_content(r.stream)
        else:
            out.add(r.body)
        return out
    codes = {r.code for r in results}
    first = results[0]
    out = Output(first.code, first.message) if len(codes) == 1 else Output()
    for i, r in enumerate(results):
        for name, value in r.headers.items():
            out.properties[batch_key(i, name)] = value
        out.properties[batch_key(i, ITEM_CODE_PROPERTY)] = str(r.code)
        body = b"".join(r.stream) if r.stream is not None else r.body
        out.add(body, key=batch_key(i, "data"))
    return out


def result_chunks(result: ItemResult) -> Iterator[bytes]:
    """The bytes a result sends: its stream's chunks, or its body as one chunk."""
    if result.stream is not None:
        yield from result.stream
    else:
        yield result.body


def _run_all(finalizers) -> None:
    for finalize in finalizers:
        try:
            finalize()
        except Exception:  # the answer is out; only log it, as the worker does
            logging.getLogger(__name__).exception("Output.finalize function failed")


def _then(chunks, finalizers) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        _run_all(finalizers)


class TestHandler:
    """A model dir's handler, loaded once, called like the server calls it.

    `entry_point`: the file (relative to model_dir, or absolute) or dotted module name of the
    handler, or an imported module (its name is used). None: the server's choice, i.e.
    option.entryPoint from serving.properties / OPTION_ENTRYPOINT, else model_dir/model.py,
    else the default LLM handler when model_dir has a config.json.
    `handler`: the entry function of the model.py (DJL's --handler, LMC's option.handler);
    None: option.handler from the properties, else handle.
    `properties` are added over what `model_properties(model_dir)` reads."""

    __test__ = False  # a library class, not a pytest test case

    def __init__(self, entry_point: str | ModuleType | None = None,
                 model_dir: str | None = None,
                 properties: Mapping[str, str] | None = None,
                 handler: str | None = None) -> None:
        # mpirun's variables as the names torch.distributed reads (DJL does the same).
        env = os.environ
        if env.get("OMPI_COMM_WORLD_SIZE"):
            env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        if env.get("OMPI_COMM_WORLD_LOCAL_RANK"):
            env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]
        if env.get("OMPI_COMM_WORLD_RANK"):
            env["RANK"] = env["OMPI_COMM_WORLD_RANK"]

        if isinstance(entry_point, ModuleType):
            if model_dir is None:
                module_file = getattr(entry_point, "__file__", None)
                model_dir = os.path.dirname(module_file) if module_file else os.getcwd()
            entry_point = entry_point.__name__
        self.model_dir = os.path.abspath(model_dir or os.getcwd())
        self.serving_properties = model_properties(self.model_dir)
        if entry_point:
            self.serving_properties["entryPoint"] = entry_point
        self.serving_properties.update({k: str(v) for k, v in (properties or {}).items()})
        if handler and handler != DEFAULT_FUNCTION:
            self.serving_properties[FUNCTION_PROPERTY] = handler
        self.entry_function = self.serving_properties.get(FUNCTION_PROPERTY) or DEFAULT_FUNCTION
        self.service = ModelService.load(self.model_dir, dict(self.serving_properties))

    def invoke(self, inputs: Input) -> list[ItemResult]:
        """One ItemResult per request of `inputs` (one, or each of a DJL-convention batch)."""
        return self.service.invoke(_items(inputs, self.entry_function))

    def inference(self, inputs: Input) -> Output:
        """The handler's answer to `inputs` as an Output (see output_from_results). An
        Output.finalize function runs once the answer is read, as the worker runs it once the
        answer is sent: at once for a body, at the end of the stream for a stream."""
        results = self.invoke(inputs)
        finalizers = [f for r in results if (f := getattr(r, "finalize", None)) is not None]
        out = output_from_results(results)
        if out.stream_content is not None and finalizers:
            out.stream_content = _then(out.stream_content, finalizers)
        else:
            _run_all(finalizers)
        return out

    def inference_batch(self, inputs: Sequence[Any],
                        properties: Sequence[Mapping[str, Any]] | None = None,
                        serving_properties: Mapping[str, Any] | None = None) -> Output:
        """JSON bodies `inputs` sent as one batch (create_concurrent_batch_request)."""
        return self.inference(create_concurrent_batch_request(inputs, properties,
                                                              serving_properties))

    def inference_rolling_batch(self, inputs: Sequence[Any],
                                properties: Sequence[Mapping[str, Any]] | None = None,
                                serving_properties: Mapping[str, Any] | None = None
                                ) -> dict[int, str]:
        """Send `inputs` as a batch and collect each request's text until it is finished:
        {index: text}. A request's answer may be frames (Output.binary_encode, as rolling-batch
        and async handlers send): their "data" fields are joined, and the request is finished at
        the frame whose "last" is true; anything else is the whole answer. While some requests
        are unfinished, the still-open ones are sent again with {"inputs": ""}, as DJL's harness
        does for a handler that advances its batch one step per call."""
        texts = {i: "" for i in range(len(inputs))}
        live = list(range(len(inputs)))
        batch = list(inputs)
        item_props = list(properties) if properties else None
        for _ in range(MAX_ROLLING_STEPS):
            if not live:
                return texts
            request = create_concurrent_batch_request(batch, item_props, serving_properties)
            results = self.invoke(request)
            finished = []
            for slot, result in enumerate(results):
                index = live[slot]
                done = False
                for chunk in result_chunks(result):
                    try:
                        frame = decode_frame(chunk)
                    except ValueError:
                        texts[index] += bytes(chunk).decode("utf-8", errors="replace")
                        done = True
                        continue
                    texts[index] += frame.get("data") or ""
                    if (frame.get("last") or "").lower() == "true":
                        done = True
                if done:
                    print(f"Finished request {index}")
                    finished.append(slot)
            live = [i for s, i in enumerate(live) if s not in finished]
            if item_props is not None:
                item_props = [p for s, p in enumerate(item_props) if s not in finished]
            batch = [{"inputs": ""} for _ in live]
        raise RuntimeError(f"requests {live} did not finish in {MAX_ROLLING_STEPS} calls")

    def shutdown(self) -> None:
        self.service.shutdown()

    def __enter__(self) -> TestHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# ---- the command -----------------------------------------------------------------------------


def test_model_args() -> argparse.ArgumentParser:
    """DJL's djl-test-model flags."""
    parser = argparse.ArgumentParser(prog="djl-test-model",
                                     description="Run a model directory's handler locally, "
                                                 "without a server")
    parser.add_argument("--model-dir", dest="model_dir", default=None,
                        help="model directory (default: the current directory)")
    parser.add_argument("--entry-point", dest="entry_point", default=None,
                        help="the handler file or module (default: option.entryPoint, else "
                             "model.py, else the default LLM handler for a config.json)")
    parser.add_argument("--handler", dest="handler", default=None,
                        help="the model.py function to call (default: option.handler, else "
                             "handle)")
    parser.add_argument("--input", dest="input", nargs="+", default=["input.txt"],
                        help="input files or values, each FILE, VALUE or key=FILE "
                             "(default input.txt)")
    parser.add_argument("--parameters", dest="parameters", nargs="+", default=None,
                        help="request properties, each key=value")
    return parser


test_model_args.__test__ = False  # not a pytest test


def describe_output(outputs: Output) -> str:
    """DJL's summary of an Output: code, message, properties and the type of each content
    entry, as indented JSON."""
    content = {str(k) if k is not None else "null": f"type: {type(v)}"
               for k, v in outputs.content}
    return json.dumps({"code": outputs.code, "message": outputs.message,
                       "properties": outputs.properties, "content": content}, indent=2)


def _show(chunk: bytes) -> str:
    try:
        frame = decode_frame(chunk)
    except ValueError:
        pass
    else:
        return "frame: " + json.dumps(frame, ensure_ascii=False)
    try:
        return bytes(chunk).decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(chunk)} bytes>"


def run(argv: Sequence[str] | None = None) -> int:
    """The command: load, send one request, print the answer. Returns the exit status."""
    # Logs go to stderr, so stdout carries only the response.
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
    args = test_model_args().parse_args(argv)
    request = create_request(args.input, args.parameters)
    request.function_name = args.handler
    try:
        handler = TestHandler(args.entry_point, args.model_dir, handler=args.handler)
    except HandlerLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        outputs = handler.inference(request)
        stream = outputs.iter_stream()
        print("output: " + describe_output(outputs))
        if stream is not None:
            for chunk in stream:
                print("chunk: " + _show(chunk))
        else:
            for _, value in outputs.content:
                print(_show(value))
    finally:
        handler.shutdown()
    return 1 if outputs.code >= 400 else 0


__all__ = ["TestHandler", "create_3p_request", "create_concurrent_batch_request",
           "create_json_request", "create_npz_request", "create_numpy_request", "create_request",
           "create_text_request", "decode_encoded_output_binary", "describe_output",
           "extract_output_as_bytes", "extract_output_as_input", "extract_output_as_npz",
           "extract_output_as_numpy", "extract_output_as_string", "load_properties",
           "model_properties", "output_from_results", "parse_properties", "retrieve_int",
           "retrieve_short", "retrieve_utf8", "run", "test_model_args",
           "update_properties_with_env_vars"]
