"""ModelService: finding, importing and warming up a model.py, and DJL's rules for turning what
handle() returns into one result per request."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engines.contracts.protocol import RequestItem
from handlers import ItemResult, ModelService
from handlers import service as service_mod
from engines.contracts.errors import ValidationError, handler_error
from handlers.service import HandlerLoadError

FIXTURES = Path(__file__).parent / "fixtures" / "handlers"
REPO = Path(__file__).resolve().parent.parent


def load(name: str, **props: str) -> ModelService:
    model_dir = str(FIXTURES / name)
    return ModelService.load(model_dir, {"model_dir": model_dir, **props})


def item(body: bytes | str, i: int = 0, **headers: str) -> RequestItem:
    data = body.encode() if isinstance(body, str) else body
    return RequestItem(i, {k.replace("_", "-"): v for k, v in headers.items()}, [("data", data)])


def error_body(r: ItemResult) -> dict:
    assert r.headers["content-type"] == "application/json"
    body = json.loads(r.body)
    assert body["code"] == r.code
    return body


# ---- loading ---------------------------------------------------------------------------------


def test_echo_single_request():
    svc = load("echo")
    [r] = svc.invoke([item("hello", X_Id="r1")])
    assert (r.code, r.message, r.body, r.stream) == (200, "OK", b"hello", None)
    assert r.headers == {"x-echo-id": "r1", "x-shared": "yes"}


def test_batch_of_four_split_back_in_order():
    svc = load("echo")
    items = [item(f"body-{i}", i, X_Id=f"id-{i}") for i in range(4)]
    results = svc.invoke(items)
    assert [r.body for r in results] == [b"body-0", b"body-1", b"body-2", b"body-3"]
    assert [r.headers["x-echo-id"] for r in results] == ["id-0", "id-1", "id-2", "id-3"]
    assert all(r.code == 200 and r.headers["x-shared"] == "yes" for r in results)


def test_warmup_gets_init_properties_and_no_content():
    svc = load("echo", tensor_parallel_degree="1", max_rolling_batch_size="8")
    [r] = svc.invoke([item("", X_What="warmup")])
    [warm] = json.loads(r.body)
    assert warm["empty"] is True and warm["content_size"] == 0
    assert warm["properties"] == {"model_dir": str(FIXTURES / "echo"),
                                  "tensor_parallel_degree": "1", "max_rolling_batch_size": "8"}


def test_djl_python_style_model():
    svc = load("djl_style")
    [r] = svc.invoke([item('{"inputs": "hi"}', Content_Type="application/json")])
    assert r.code == 200
    assert json.loads(r.body) == {"got": {"inputs": "hi"}, "echo_type": "dict"}
    assert r.headers["Content-Type"] == "application/json"


def test_sagemaker_functions():
    svc = load("sagemaker")
    assert svc.handle.__self__.model is not None  # model_fn ran during warm-up
    [r] = svc.invoke([item('{"x": 7}', Content_Type="application/json", Accept="text/x")])
    assert r.code == 200 and json.loads(r.body) == {"y": 21, "accept": "text/x"}
    assert r.headers["Content-Type"] == "application/x-result"
    results = svc.invoke([item('{"x": 1}', 0, Content_Type="application/json"),
                          item('{"x": 2}', 1, Content_Type="application/json")])
    assert [json.loads(r.body)["y"] for r in results] == [3, 6]
    assert all(r.headers["Content-Type"] == "application/x-result" for r in results)


def test_sagemaker_defaults():
    svc = load("sagemaker_defaults")
    [r] = svc.invoke([item('[1, 2, 3]', Content_Type="application/json")])
    assert r.code == 200 and json.loads(r.body) == {"len": 3}
    assert r.headers["Content-Type"] == "application/json"
    [r] = svc.invoke([item(b"\x00\x01", Content_Type="application/octet-stream")])
    assert json.loads(r.body) == {"len": 2}


def test_entry_point_names_another_file_and_siblings_import():
    svc = load("entrypoint", entryPoint="my_handler.py")  # model.py there would raise
    assert svc.source.endswith("my_handler.py")
    [r] = svc.invoke([item("hey")])
    assert r.body == b"HEY!"


def test_entry_point_as_module_name():
    svc = load("entrypoint", entryPoint="my_handler")
    [r] = svc.invoke([item("mod")])
    assert r.body == b"MOD!"


def test_model_py_that_fails_to_import():
    with pytest.raises(HandlerLoadError) as e:
        load("broken")
    msg = str(e.value)
    assert str(FIXTURES / "broken" / "model.py") in msg
    assert "lmc_no_such_module_for_tests" in msg and "Hint" in msg


def test_warmup_failure_is_a_load_error():
    with pytest.raises(HandlerLoadError) as e:
        load("warmup_fails")
    msg = str(e.value)
    assert "warmup_fails/model.py" in msg and "warm-up" in msg and "no content" in msg


def test_model_py_without_a_handler():
    with pytest.raises(HandlerLoadError, match="defines no handle"):
        load("no_handler")


def test_missing_entry_point_file():
    with pytest.raises(HandlerLoadError, match="no such file"):
        load("echo", entryPoint="nope.py")


def test_empty_model_dir(tmp_path):
    with pytest.raises(HandlerLoadError, match="no model.py, no option.entryPoint and no "
                                               "config.json"):
        ModelService.load(str(tmp_path), {"model_dir": str(tmp_path)})


def test_model_py_example_loads_and_answers(tmp_path):
    example = REPO / "model.py.example"
    svc = ModelService.load(str(tmp_path), {"model_dir": str(tmp_path),
                                            "entryPoint": str(example)})
    [r] = svc.invoke([item('{"inputs": "hello there"}', Content_Type="application/json")])
    assert r.code == 200 and json.loads(r.body) == {"generated_text": "HELLO THERE"}
    results = svc.invoke([item('{"inputs": "a"}', 0), item('{"inputs": "b c"}', 1)])
    assert [json.loads(r.body) for r in results] == [{"generated_text": "A"},
                                                     {"generated_text": "B C"}]
    [r] = svc.invoke([item('{"inputs": "one two", "parameters": {"stream": true}}')])
    lines = [json.loads(c) for c in r.stream]
    assert [ln["token"]["text"] for ln in lines] == ["ONE", "TWO"]
    assert lines[-1]["generated_text"] == "ONE TWO"
    assert r.headers["Content-Type"] == "application/jsonlines"


# ---- DJL return-value rules ------------------------------------------------------------------


@pytest.fixture(scope="module")
def modes() -> ModelService:
    return load("modes")


def test_exception_is_424_with_its_message(modes):
    results = modes.invoke([item("", 0, X_Mode="raise"), item("", 1)])
    assert [r.code for r in results] == [424, 424]
    body = error_body(results[0])
    assert body["error"] == "bad" and body["message"] == "bad" and body["type"] == "ModelError"


def test_none_is_204(modes):
    results = modes.invoke([item("", i, X_Mode="none") for i in range(2)])
    assert [(r.code, r.body) for r in results] == [(204, b""), (204, b"")]


def test_non_output_is_424_invalid_output_type(modes):
    [r] = modes.invoke([item("", X_Mode="dict")])
    assert r.code == 424 and r.message == "Invalid output type"
    body = error_body(r)
    assert body["message"].startswith("Invalid output type") and "dict" in body["error"]


def test_memory_error_is_507(modes):
    [r] = modes.invoke([item("", X_Mode="oom")])
    assert r.code == 507 and "host out of memory" in error_body(r)["error"]


def test_cuda_oom_by_name_is_507(modes):
    [r] = modes.invoke([item("", X_Mode="cuda_oom")])
    assert r.code == 507 and "CUDA out of memory" in error_body(r)["error"]


def test_handler_error_table():
    class OutOfMemoryError(RuntimeError):
        pass

    class SubOom(OutOfMemoryError):
        pass

    assert handler_error(MemoryError())[:2] == (507, "OutOfMemory")
    assert handler_error(SubOom())[0] == 507
    assert handler_error(ValueError())[:2] == (424, "ModelError")
    assert handler_error(RuntimeError("CUDA error"))[0] == 424
    # A value the client can fix, raised from inside a handler or engine, stays a 400.
    assert handler_error(ValidationError("inputs", "too long"))[:2] == (400, "ValidationError")


def test_an_unusable_item_status_is_that_requests_424_not_a_dead_worker(modes):
    [r] = modes.invoke([item("", X_Mode="bad_code")])
    assert r.code == 424 and "'code'='teapot'" in error_body(r)["error"]
    [r] = modes.invoke([item("")])  # the service still answers
    assert (r.code, r.body) == (200, b"ok")


def test_output_code_and_error_pass_through(modes):
    [r] = modes.invoke([item("", X_Mode="code")])
    assert (r.code, r.message, r.body) == (201, "Created", b"made")
    [r] = modes.invoke([item("", X_Mode="error")])
    assert r.code == 400 and error_body(r)["error"] == "model says no"
    # One error Output for a whole batch answers every request in it.
    results = modes.invoke([item("", i, X_Mode="error") for i in range(3)])
    assert [r.code for r in results] == [400, 400, 400]


def test_output_count_mismatch(modes):
    results = modes.invoke([item("", i, X_Mode="two") for i in range(3)])
    assert [r.code for r in results] == [424] * 3
    assert "handler returned 2 outputs for a batch of 3" in error_body(results[0])["error"]
    # Same count as the batch: entry i answers item i.
    assert [r.body for r in modes.invoke([item("", i, X_Mode="two") for i in range(2)])] == \
        [b"x", b"y"]
    # Batch of one with several entries: the first.
    assert modes.invoke([item("", X_Mode="two")])[0].body == b"x"


def test_stream_is_lazy(modes):
    state = modes.handle.__globals__["STATE"]
    state["produced"] = 0
    [r] = modes.invoke([item("", X_Mode="stream")])
    assert r.code == 200 and r.body == b""
    assert state["produced"] == 0  # invoke returned without running the generator
    assert next(r.stream) == b'{"token":"a"}\n'
    assert state["produced"] == 1
    assert list(r.stream) == [b'{"token":"b"}\n', b'{"token":"c"}\n']


def test_stream_with_formatter(modes):
    [r] = modes.invoke([item("", X_Mode="stream_fmt")])
    assert list(r.stream) == [b"<a>", b"<b>", b"<c>"]


def test_stream_in_a_batch_is_424(modes):
    results = modes.invoke([item("", i, X_Mode="stream") for i in range(2)])
    assert [r.code for r in results] == [424, 424]
    assert "batch size 1" in error_body(results[0])["error"]
    assert all(r.stream is None for r in results)


# ---- the default LLM handler: resolution only (the handler itself is tested elsewhere) -------

FAKE_LLM = textwrap.dedent("""
    from handlers import Output

    class LLMHandler:
        def __init__(self, plan=None, input_formatter=None, output_formatter=None):
            self.plan = plan
            self.input_formatter = input_formatter
            self.output_formatter = output_formatter
            self.warmed = None

        def handle(self, inputs):
            if inputs.is_empty():
                self.warmed = dict(inputs.get_properties())
                return None
            text = inputs.get_as_string()
            if self.input_formatter:
                text = self.input_formatter(text)
            if self.output_formatter:
                text = self.output_formatter(text)
            return Output().add(text)
""")


@pytest.fixture
def fake_llm(tmp_path, monkeypatch):
    """Stands in for handlers.llm (another component, which imports torch)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "lmc_fake_llm.py").write_text(FAKE_LLM)
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.setattr(service_mod, "DEFAULT_HANDLER_MODULE", "lmc_fake_llm")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return model_dir


def test_config_json_selects_default_handler(fake_llm):
    (fake_llm / "config.json").write_text("{}")
    svc = ModelService.load(str(fake_llm), {"model_dir": str(fake_llm)})
    assert svc.handle.__self__.warmed == {"model_dir": str(fake_llm)}
    assert svc.invoke([item("plain")])[0].body == b"plain"


@pytest.mark.parametrize("entry", ["djl_python.huggingface",
                                   "djl_python.lmi_vllm.vllm_async_service",
                                   "djl_python.tensorrt_llm", "djl_python.lmi_dist"])
def test_lmi_entry_points_select_default_handler(fake_llm, entry):
    svc = ModelService.load(str(fake_llm), {"model_dir": str(fake_llm), "entryPoint": entry})
    assert type(svc.handle.__self__).__name__ == "LLMHandler"


def test_decorated_formatters_plug_into_default_handler(fake_llm):
    (fake_llm / "model.py").write_text(textwrap.dedent("""
        from djl_python.input_parser import input_formatter
        from djl_python.output_formatter import output_formatter

        @input_formatter
        def my_in(text, **kwargs):
            return "<" + text + ">"

        @output_formatter
        def my_out(text):
            return text.upper()
    """))
    svc = ModelService.load(str(fake_llm), {"model_dir": str(fake_llm)})
    assert svc.invoke([item("x")])[0].body == b"<X>"


def test_handlers_do_not_import_torch():
    code = textwrap.dedent(f"""
        import sys
        from handlers import ModelService
        from engines.contracts.protocol import RequestItem
        import djl_python, djl_python.encode_decode
        svc = ModelService.load({str(FIXTURES / 'echo')!r}, {{}})
        svc.invoke([RequestItem(0, {{}}, [("data", b"x")])])
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
