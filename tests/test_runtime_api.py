"""The SageMaker runtime emulation and the OpenAI/TGI routes, against a real server running the
api_echo fixture: the event-stream codec checked with botocore's own decoder, and the real
boto3 client used unmodified."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import boto3
import botocore.config
import pytest
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import EventStreamError

from container import sagemaker_runtime as smr
from server_utils import LmcServer, model_dir


class LineIterator:
    """Complete lines out of PayloadParts, which may cut a line anywhere (the SageMaker docs'
    example, reduced): buffer the bytes, yield each line once its newline has arrived."""

    def __init__(self, event_stream) -> None:
        self.events = iter(event_stream)
        self.buf = b""

    def __iter__(self) -> Iterator[bytes]:
        for event in self.events:
            self.buf += event["PayloadPart"]["Bytes"]
            *lines, self.buf = self.buf.split(b"\n")
            yield from (line for line in lines if line)
        if self.buf:
            yield self.buf


def runtime_client(url: str):
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=botocore.config.Config(retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = model_dir(tmp_path_factory.mktemp("m"), "api_echo")
    with LmcServer(["--model-dir", str(d)]) as s:
        yield s


# -- event-stream codec ----------------------------------------------------------------------------


def _decode(data: bytes) -> list:
    buf = EventStreamBuffer()
    buf.add_data(data)
    return list(buf)


def test_payload_part_decodes_with_botocore():
    (msg,) = _decode(smr.payload_parts(b'{"token": "h\xc3\xa9"}\n'))
    assert msg.headers == {":message-type": "event", ":event-type": "PayloadPart",
                           ":content-type": "application/octet-stream"}
    assert msg.payload == b'{"token": "h\xc3\xa9"}\n'


def test_large_chunk_is_split_and_messages_concatenate():
    data = bytes(range(256)) * (smr.MAX_PART_BYTES // 100)
    msgs = _decode(smr.payload_parts(data) + smr.model_stream_error("boom"))
    assert len(msgs) == 4 and b"".join(m.payload for m in msgs[:3]) == data
    assert msgs[3].headers[":message-type"] == "exception"
    assert msgs[3].headers[":exception-type"] == "ModelStreamError"
    assert json.loads(msgs[3].payload) == {"Message": "boom", "ErrorCode": "ModelStreamError"}


def test_split_error_line():
    assert smr.split_error_line(b'{"token": {"text": "error"}}\n') == (
        b'{"token": {"text": "error"}}\n', None)
    line = b'{"finish_reason": "error", "error": "CUDA OOM"}\n'
    assert smr.split_error_line(b'{"token": 1}\n' + line) == (b'{"token": 1}\n', "CUDA OOM")
    assert smr.split_error_line(b'data: {"error": {"message": "bad"}}\n\n') == (b"", "bad")
    sse = b'data: {"choices": [], "error": {"message": "oom"}}\n\ndata: [DONE]\n\n'
    assert smr.split_error_line(b'data: {"choices": []}\n\n' + sse) == (
        b'data: {"choices": []}\n\n', "oom")
    assert smr.split_error_line(b'{"generated_text": "x", "details": {"finish_reason": "error",'
                                b' "error": "late"}}\n') == (b"", "late")


# -- InvokeEndpoint -------------------------------------------------------------------------------


def test_invoke_endpoint_round_trip(srv):
    c = runtime_client(srv.url)
    r = c.invoke_endpoint(EndpointName="any-name", Body=json.dumps({"content_type": "text/x-a"}),
                          ContentType="application/json", Accept="text/x-a",
                          CustomAttributes="trace=7", InferenceId="inf-1")
    assert r["ContentType"] == "text/x-a"
    assert r["InvokedProductionVariant"] == "AllTraffic"
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-request-id"] == "inf-1"
    seen = json.loads(r["Body"].read())
    props = {k.lower(): v for k, v in seen["props"].items()}
    assert props["content-type"] == "application/json" and props["accept"] == "text/x-a"
    assert props["x-amzn-sagemaker-custom-attributes"] == "trace=7" and props["trace"] == "7"
    assert props["x-amzn-sagemaker-inference-id"] == "inf-1"
    assert "authorization" not in props  # the SigV4 signature stops at the "platform"
    assert seen["api"] is None


def test_custom_attributes_come_back(srv):
    r = runtime_client(srv.url).invoke_endpoint(EndpointName="api_echo",
                                                Body=json.dumps({"attrs": "cached=1"}))
    assert r["CustomAttributes"] == "cached=1"


def test_model_4xx_and_handler_failure_are_model_error(srv):
    c = runtime_client(srv.url)
    with pytest.raises(c.exceptions.ModelError) as ei:
        c.invoke_endpoint(EndpointName="e", Body=json.dumps({"status": 422, "message": "no!"}))
    err = ei.value.response
    assert err["Error"]["Code"] == "ModelError"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert err["OriginalStatusCode"] == 422 and err["OriginalMessage"] == "no!"
    assert "Received client error (422)" in err["Error"]["Message"]

    with pytest.raises(c.exceptions.ModelError) as ei:
        c.invoke_endpoint(EndpointName="e", Body=json.dumps({"status": 503, "message": "busy"}))
    assert ei.value.response["OriginalStatusCode"] == 503
    assert "server error" in ei.value.response["Error"]["Message"]


def test_plain_invoke_collects_a_stream(srv):
    r = runtime_client(srv.url).invoke_endpoint(EndpointName="e",
                                                Body=json.dumps({"stream": 3}))
    assert r["ContentType"] == "application/jsonlines"
    lines = r["Body"].read().splitlines()
    assert [json.loads(x)["line"] for x in lines] == [0, 1, 2]


# -- InvokeEndpointWithResponseStream ------------------------------------------------------------


def test_response_stream_lines_arrive_as_produced(srv):
    c = runtime_client(srv.url)
    t0 = time.time()
    r = c.invoke_endpoint_with_response_stream(
        EndpointName="e", Body=json.dumps({"stream": 5, "delay": 0.3}),
        ContentType="application/json", Accept="application/jsonlines")
    assert r["ContentType"] == "application/jsonlines"
    assert r["InvokedProductionVariant"] == "AllTraffic"
    got = [(time.time(), json.loads(line)) for line in LineIterator(r["Body"])]
    assert [g["line"] for _, g in got] == [0, 1, 2, 3, 4]
    # The first line reached us while the rest were still being generated.
    assert got[0][0] - t0 < 0.6 and got[-1][0] - t0 > 1.2
    assert max(t - g["t"] for t, g in got) < 0.3


def test_payload_parts_cut_lines(srv):
    r = runtime_client(srv.url).invoke_endpoint_with_response_stream(
        EndpointName="e", Body=json.dumps({"stream": 2}))
    parts = [e["PayloadPart"]["Bytes"] for e in r["Body"]]
    assert any(not p.endswith(b"\n") for p in parts)  # so the LineIterator above is needed


def test_stream_accept_header_is_forwarded_as_accept(srv):
    r = runtime_client(srv.url).invoke_endpoint_with_response_stream(
        EndpointName="e", Body=b"{}", Accept="text/event-stream")
    body = b"".join(e["PayloadPart"]["Bytes"] for e in r["Body"])  # non-streamed: one part
    assert r["ContentType"] == "application/json"
    props = {k.lower(): v for k, v in json.loads(body)["props"].items()}
    assert props["accept"] == "text/event-stream"


@pytest.mark.parametrize("fail", [{"fail_after": 2}, {"error_line_after": 2}])
def test_mid_stream_failure_is_model_stream_error(srv, fail):
    r = runtime_client(srv.url).invoke_endpoint_with_response_stream(
        EndpointName="e", Body=json.dumps({"stream": 5, **fail}))
    lines = []
    with pytest.raises(EventStreamError) as ei:
        for line in LineIterator(r["Body"]):
            lines.append(json.loads(line))
    assert [x["line"] for x in lines] == [0, 1]
    assert ei.value.response["Error"]["Code"] == "ModelStreamError"
    assert "line 2" in ei.value.response["Error"]["Message"]


def test_stream_error_before_first_byte_is_model_error(srv):
    c = runtime_client(srv.url)
    with pytest.raises(c.exceptions.ModelError) as ei:
        c.invoke_endpoint_with_response_stream(
            EndpointName="e", Body=json.dumps({"status": 400, "message": "bad parameter"}))
    assert ei.value.response["OriginalStatusCode"] == 400
    assert ei.value.response["OriginalMessage"] == "bad parameter"


# -- LLM routes -----------------------------------------------------------------------------------


def test_v1_models(srv):
    r = srv.request("GET", "/v1/models")
    assert r.status == 200
    body = r.json()
    assert body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == "api_echo" and m["object"] == "model" and m["owned_by"] == "lmc"
    assert isinstance(m["created"], int) and abs(m["created"] - time.time()) < 600


@pytest.mark.parametrize("path,api", [("/v1/completions", "openai.completions"),
                                      ("/v1/chat/completions", "openai.chat"),
                                      ("/generate", "tgi.generate"),
                                      ("/generate_stream", "tgi.generate_stream"),
                                      ("/", "tgi"),
                                      ("/invocations", None)])
def test_llm_routes_tell_the_handler_the_api(srv, path, api):
    body = {"model": "gpt-4o", "inputs": "hi"}
    r = srv.post(path, body, headers={"x-lmc-api": "spoofed"} if api else None)
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["api"] == api
    assert json.loads(seen["body"]) == body  # passed on unchanged


def test_v1_rejects_bad_json(srv):
    r = srv.post("/v1/chat/completions", b"{nope", headers={"Content-Type": "application/json"})
    assert r.status == 400 and "not valid JSON" in r.json()["message"]
    r = srv.post("/v1/completions", [1, 2])
    assert r.status == 400 and "JSON object" in r.json()["message"]


def test_two_models_choose_by_name(tmp_path):
    store = tmp_path / "store"
    for name in ("alpha", "beta"):
        model_dir(store, "api_echo").rename(store / name)
    with LmcServer(["--model-store", str(store)]) as s:
        ids = {m["id"] for m in s.request("GET", "/v1/models").json()["data"]}
        assert ids == {"alpha", "beta"}
        for name in ("alpha", "beta"):
            r = s.post("/v1/chat/completions", {"model": name, "messages": []})
            assert r.status == 200 and r.json()["props"]["X-LMC-API"] == "openai.chat"
            assert r.json()["model_dir"].endswith(name)
        r = s.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []})
        assert r.status == 400 and "alpha" in r.json()["message"]

        c = runtime_client(s.url)
        r = c.invoke_endpoint(EndpointName="beta", Body=b"{}")
        assert json.loads(r["Body"].read())["model_dir"].endswith("beta")
        with pytest.raises(c.exceptions.ValidationError) as ei:
            c.invoke_endpoint(EndpointName="gamma", Body=b"{}")
        assert "gamma" in ei.value.response["Error"]["Message"]
        r = c.invoke_endpoint(EndpointName="gamma", TargetModel="alpha", Body=b"{}")
        assert json.loads(r["Body"].read())["model_dir"].endswith("alpha")
