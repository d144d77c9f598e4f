"""SageMaker stateful sessions: DJL's SessionManager API (handlers/sessions.py, re-exported as
djl_python.session_manager / session_utils), a DJL-style stateful model.py served over HTTP with
one and with two workers (what DJL's PySessionsTests checks), the SageMaker runtime emulation's
session headers through the real boto3 client, and the default LLM handler's NEW_SESSION / CLOSE
/ session checks."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import botocore.config
import pytest

from djl_python import Input, SessionManager
from djl_python.outputs import Output
from djl_python.session_manager import Session, SessionNotFound
from djl_python.session_utils import (HEADER_SAGEMAKER_CLOSED_SESSION_ID,
                                      HEADER_SAGEMAKER_SESSION_ID, close_session, create_session,
                                      get_session, session_non_stream_output_formatter)
from engines.contracts.errors import SessionExpired, ValidationError, handler_error
from handlers.outputs import decode_frame
from handlers.sessions import LLMSessions, SessionAnswer
from server_utils import FIXTURES, LmcServer

SID = HEADER_SAGEMAKER_SESSION_ID
UUID = re.compile(r"[0-9a-f-]{36}")
EXPIRES = re.compile(r"^([0-9a-f-]{36}); Expires=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def sessions(path) -> list[str]:
    return sorted(os.listdir(path))


# -- the library -----------------------------------------------------------------------------------


def test_create_put_get_numpy_close(tmp_path):
    mgr = SessionManager({"sessions_path": str(tmp_path / "s")})
    assert mgr.expiration == 1200
    session = mgr.create_session()
    assert isinstance(session, Session) and UUID.fullmatch(session.session_id)
    assert abs(session.expiration_ts - time.time() - 1200) < 5
    assert sessions(tmp_path / "s") == [session.session_id]

    state = session.get_as_numpy("model/state", shape=(3, 4), create=True)
    assert state.sum() == 0  # created zero-filled
    state.fill(2)
    state.flush()
    session.put("meta", {"turns": 1})
    assert session.get("meta") == {"turns": 1} and session.get("missing", 7) == 7

    same = mgr.get_session(session.session_id)
    assert same.get_as_numpy("model/state", shape=(3, 4)).sum() == 24
    assert mgr.get_session(None) is None and mgr.get_session("") is None
    assert mgr.get_session("NEW_SESSION") is None
    # The header a container answers with, sent back whole, names the same session.
    assert mgr.get_session(f"{session.session_id}; Expires=2030-01-01T00:00:00Z") is not None

    mgr.close_session(session.session_id)
    assert sessions(tmp_path / "s") == []
    with pytest.raises(SessionNotFound):
        mgr.get_session(session.session_id)


def test_not_found_and_invalid_ids(tmp_path):
    mgr = SessionManager({"sessions_path": str(tmp_path)})
    unknown = str(uuid.uuid4())
    with pytest.raises(ValueError, match=f"session not found: {unknown}") as ei:
        mgr.get_session(unknown)
    assert isinstance(ei.value, SessionNotFound) and ei.value.session_id == unknown
    assert handler_error(ei.value)[:2] == (404, "SessionNotFound")
    with pytest.raises(SessionNotFound):  # never used as a path
        mgr.get_session("../../etc")
    with pytest.raises(ValueError, match="invalid session_id") as ei:
        mgr.close_session(None)
    assert isinstance(ei.value, ValidationError) and handler_error(ei.value)[0] == 400
    with pytest.raises(SessionNotFound):
        mgr.close_session(unknown)
    assert handler_error(SessionExpired(unknown, "expired"))[:2] == (410, "SessionExpired")


def test_expiry_and_create_cleans_expired(tmp_path):
    mgr = SessionManager({"sessions_path": str(tmp_path), "sessions_expiration": "0.3"})
    old = mgr.create_session()
    time.sleep(0.4)
    assert mgr.get_session(old.session_id) is None  # expired: None, as in DJL
    assert sessions(tmp_path) == [old.session_id]  # ... but kept until the next create
    new = mgr.create_session()
    assert sessions(tmp_path) == [new.session_id]
    with pytest.raises(SessionNotFound):
        mgr.get_session(old.session_id)


def test_two_managers_on_one_directory_are_two_workers(tmp_path):
    props = {"sessions_path": str(tmp_path)}
    a, b = SessionManager(props), SessionManager(props)
    session = a.create_session()
    state = session.get_as_numpy("state", shape=(4,), create=True)
    state[:] = 1
    state.flush()

    seen = b.get_session(session.session_id)  # never in b's dict: found on disk
    assert seen.expiration_ts == session.expiration_ts
    view = seen.get_as_numpy("state", shape=(4,))
    view[0] = 5  # written by b, read by a
    view.flush()
    seen.put("turns", 3)
    assert a.get_session(session.session_id).get("turns") == 3
    assert session.get_as_numpy("state", shape=(4,)).tolist() == [5, 1, 1, 1]

    b.close_session(session.session_id)  # a still has it cached: the directory decides
    with pytest.raises(SessionNotFound):
        a.get_session(session.session_id)
    with pytest.raises(SessionNotFound):
        a.close_session(session.session_id)

    # Expired sessions are cleaned by whichever worker creates next, not only the creator's.
    short = SessionManager({**props, "sessions_expiration": "0.2"})
    gone = short.create_session()
    time.sleep(0.3)
    kept = a.create_session()
    assert sessions(tmp_path) == [kept.session_id] and gone.session_id != kept.session_id


def test_session_utils(tmp_path):
    mgr = SessionManager({"sessions_path": str(tmp_path)})
    created = asyncio.run(create_session((mgr, Input({}))))
    header = created["properties"][SID]
    session_id = EXPIRES.fullmatch(header).group(1)
    assert created["data"] == {"result": f"Session {session_id} created"}

    out = session_non_stream_output_formatter(created)
    assert isinstance(out, Output) and out.get_property(SID) == header
    frame = decode_frame(bytes(out.get_content().value_at(0)))
    assert frame["last"] == "True" and json.loads(frame["data"]) == created["data"]

    request = Input({SID: session_id})
    assert get_session(mgr, request).session_id == session_id
    assert get_session(None, Input({})) is None
    with pytest.raises(ValueError, match="not enabled"):
        get_session(None, request)

    closed = asyncio.run(close_session((mgr, request)))
    assert closed["properties"] == {HEADER_SAGEMAKER_CLOSED_SESSION_ID: session_id}
    again = asyncio.run(close_session((mgr, request)))
    assert again["code"] == 404 and "session not found" in again["error"]
    frame = decode_frame(bytes(session_non_stream_output_formatter(again)
                               .get_content().value_at(0)))
    assert frame["code"] == "404" and "session not found" in frame["error"]


def _item(body: dict | None, **headers) -> Input:
    item = Input({"Content-Type": "application/json", **headers})
    if body is not None:
        item.content.add("data", json.dumps(body).encode())
    return item


def test_llm_sessions_answer(tmp_path):
    llm = LLMSessions(True, str(tmp_path), 1200)
    assert llm.answer(_item({"inputs": "hi"})) is None  # no header: not looked at
    assert not tmp_path.exists() or sessions(tmp_path) == []

    new = llm.answer(_item({"requestType": "NEW_SESSION"}, **{SID: "NEW_SESSION"}))
    assert isinstance(new, SessionAnswer)
    session_id = EXPIRES.fullmatch(new.headers[SID]).group(1)
    assert llm.answer(_item({"inputs": "hi"}, **{SID: session_id})) is None
    # A body with a prompt is a generation request, as in LMI.
    assert llm.answer(_item({"inputs": "hi", "requestType": "CLOSE"}, **{SID: session_id})) is None
    with pytest.raises(ValidationError, match="requestType"):
        llm.answer(_item({"requestType": "OPEN"}))

    # Expired, written by "another process": found on disk, refused saying when.
    stale = str(uuid.uuid4())
    (tmp_path / stale).mkdir()
    (tmp_path / stale / ".expiration_ts").write_bytes(pickle.dumps(time.time() - 60))
    with pytest.raises(SessionExpired, match=f"session {stale} expired at 20") as ei:
        llm.answer(_item({"inputs": "hi"}, **{SID: stale}))
    assert ei.value.status == 410 and ei.value.session_id == stale

    closed = llm.answer(_item({"requestType": "CLOSE"}, **{SID: session_id}))
    assert closed.headers == {HEADER_SAGEMAKER_CLOSED_SESSION_ID: session_id}
    with pytest.raises(SessionNotFound) as ei:
        llm.answer(_item({"inputs": "hi"}, **{SID: session_id}))
    assert ei.value.status == 404
    with pytest.raises(ValidationError, match="invalid session_id"):
        llm.answer(_item({"requestType": "CLOSE"}))

    off = LLMSessions(False, str(tmp_path), 1200)
    assert off.answer(_item({"inputs": "hi"})) is None
    with pytest.raises(ValidationError, match="enable_stateful_sessions"):
        off.answer(_item({"requestType": "NEW_SESSION"}))


# -- a DJL-style stateful model over HTTP ---------------------------------------------------------


def stateful_dir(root: Path, properties: str) -> tuple[Path, Path]:
    d = root / "stateful"
    shutil.copytree(FIXTURES / "handlers" / "stateful", d)
    store = root / "sessions"
    (d / "serving.properties").write_text(f"option.sessions_path={store}\n{properties}")
    return d, store


def act(srv, action: str, session_id: str | None = None, **extra):
    headers = {SID: session_id} if session_id is not None else {}
    return srv.post("/invocations", {"action": action, **extra}, headers=headers)


def test_stateful_model_as_djl_checks_it(tmp_path):
    d, store = stateful_dir(tmp_path, "option.sessions_expiration=1\n")
    with LmcServer(["--model-dir", str(d)]) as srv:
        r = act(srv, "create_session")
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        session_id = r.headers[SID]
        assert UUID.fullmatch(session_id)

        r = act(srv, "regular", session_id)
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        assert r.json()["result"] == "(10, 5, 5)" and r.json()["sum"] == 250

        r = act(srv, "streaming", session_id)
        assert r.status == 200 and r.headers["Content-Type"] == "application/jsonlines"
        lines = r.body.decode().splitlines()
        assert len(lines) == 10 and json.loads(lines[9]) == {"step": 9, "sum": 25.0}

        time.sleep(1.1)  # sessions_expiration=1
        r = act(srv, "regular", session_id)
        assert r.headers["Content-Type"] == "application/json"
        assert "session not found" in r.body.decode()
        assert sessions(store) == [session_id]  # kept until the next create cleans it

        r = act(srv, "create_session")
        session_id = r.headers[SID]
        assert sessions(store) == [session_id]

        r = act(srv, "close_session")  # no session header
        assert r.status == 400 and r.headers["Content-Type"] == "application/json"
        assert "invalid session_id" in r.body.decode()
        assert sessions(store) == [session_id]

        r = act(srv, "close_session", session_id)
        assert r.status == 200 and r.headers["X-Amzn-SageMaker-Session-Closed"] == "true"
        assert "session closed" in r.body.decode()
        assert sessions(store) == []

        unknown = str(uuid.uuid4())
        r = act(srv, "regular", unknown)  # DJL's get_session raises: a 404 naming it
        assert r.status == 404 and r.json()["type"] == "SessionNotFound"
        assert unknown in r.json()["message"]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    d, store = stateful_dir(tmp_path_factory.mktemp("two"), "minWorkers=2\nmaxWorkers=2\n")
    with LmcServer(["--model-dir", str(d)]) as srv:
        srv.store = store
        yield srv


def test_session_made_by_one_worker_is_used_by_the_other(two_workers):
    srv = two_workers
    r = act(srv, "create_session")
    session_id, creator = r.headers[SID], r.json()["pid"]

    def regular(_):
        return act(srv, "regular", session_id, sleep=0.3)

    with ThreadPoolExecutor(4) as pool:  # both workers busy at once
        answers = list(pool.map(regular, range(4)))
    assert all(a.status == 200 for a in answers), [a.body for a in answers]
    bodies = [a.json() for a in answers]
    assert {b["pid"] for b in bodies} - {creator}, "no request reached the other worker"
    assert all(b["sum"] == 250 and b["created_by"] == creator for b in bodies)

    r = act(srv, "close_session", session_id)
    assert r.status == 200 and sessions(srv.store) == []
    with ThreadPoolExecutor(4) as pool:  # gone for both workers
        answers = list(pool.map(regular, range(4)))
    assert all(a.status == 404 and session_id in a.json()["message"] for a in answers)


# -- the SageMaker runtime emulation, with the real boto3 client -----------------------------------


def runtime_client(url: str):
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=botocore.config.Config(retries={"max_attempts": 1}))


def test_boto3_session_round_trip_with_the_stateful_model(two_workers):
    c = runtime_client(two_workers.url)
    r = c.invoke_endpoint(EndpointName="stateful", SessionId="NEW_SESSION",
                          Body=json.dumps({"action": "create_session"}),
                          ContentType="application/json")
    session_id = r["NewSessionId"]  # this model sets the id without Expires=
    assert UUID.fullmatch(session_id)

    r = c.invoke_endpoint(EndpointName="stateful", SessionId=session_id,
                          Body=json.dumps({"action": "regular"}), ContentType="application/json")
    assert json.loads(r["Body"].read())["sum"] == 250 and "NewSessionId" not in r

    r = c.invoke_endpoint_with_response_stream(
        EndpointName="stateful", SessionId=session_id, Body=json.dumps({"action": "streaming"}))
    assert r["ContentType"] == "application/jsonlines"
    body = b"".join(e["PayloadPart"]["Bytes"] for e in r["Body"])
    assert len(body.decode().splitlines()) == 10

    r = c.invoke_endpoint(EndpointName="stateful", SessionId=session_id,
                          Body=json.dumps({"action": "close_session"}))
    assert r["ClosedSessionId"] == session_id

    with pytest.raises(c.exceptions.ModelError) as ei:
        c.invoke_endpoint(EndpointName="stateful", SessionId=session_id,
                          Body=json.dumps({"action": "regular"}))
    assert ei.value.response["OriginalStatusCode"] == 404
    # The platform's own checks: the streaming call cannot create a session; ids are [a-z0-9-].
    with pytest.raises(c.exceptions.ValidationError, match="InvokeEndpointWithResponseStream"):
        c.invoke_endpoint_with_response_stream(EndpointName="stateful", SessionId="NEW_SESSION",
                                               Body=b"{}")
    with pytest.raises(c.exceptions.ValidationError, match="sessionId"):
        c.invoke_endpoint(EndpointName="stateful", SessionId="no/slashes", Body=b"{}")


# -- the default LLM handler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tiny_models import make_tiny_llama

    root = tmp_path_factory.mktemp("llm")
    d = make_tiny_llama(root / "tiny-llama")
    store = root / "sessions"
    (d / "serving.properties").write_text(f"option.sessions_path={store}\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=180) as srv:
        srv.store = store
        yield srv


GENERATE = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}}


def test_llm_new_session_use_close_and_unknown(llm):
    r = llm.post("/invocations", GENERATE)  # no header: as ever
    assert r.status == 200 and "generated_text" in r.json()

    r = llm.post("/invocations", {"requestType": "NEW_SESSION"}, headers={SID: "NEW_SESSION"})
    assert r.status == 200, r.body
    session_id = EXPIRES.fullmatch(r.headers[SID]).group(1)
    assert r.json()["session_id"] == session_id and sessions(llm.store) == [session_id]

    r = llm.post("/invocations", GENERATE, headers={SID: session_id})
    assert r.status == 200 and "generated_text" in r.json()

    r = llm.post("/invocations", {"requestType": "CLOSE"}, headers={SID: session_id})
    assert r.status == 200 and r.headers[HEADER_SAGEMAKER_CLOSED_SESSION_ID] == session_id
    assert sessions(llm.store) == []

    r = llm.post("/invocations", GENERATE, headers={SID: session_id})
    assert r.status == 404 and r.json()["type"] == "SessionNotFound"
    assert session_id in r.json()["message"]
    r = llm.post("/invocations", {"requestType": "CLOSE"}, headers={SID: session_id})
    assert r.status == 404
    r = llm.post("/invocations", {"requestType": "CLOSE"})
    assert r.status == 400 and "invalid session_id" in r.json()["message"]


def test_llm_expired_session_says_when(llm):
    stale = str(uuid.uuid4())  # as another worker would have left it, long expired
    (llm.store / stale).mkdir(parents=True)
    (llm.store / stale / ".expiration_ts").write_bytes(pickle.dumps(time.time() - 60))
    r = llm.post("/invocations", GENERATE, headers={SID: stale})
    assert r.status == 410 and r.json()["type"] == "SessionExpired"
    assert f"session {stale} expired at 20" in r.json()["message"]
    llm.post("/invocations", {"requestType": "NEW_SESSION"})  # cleans it
    assert stale not in sessions(llm.store)


def test_llm_boto3_round_trip(llm):
    c = runtime_client(llm.url)
    r = c.invoke_endpoint(EndpointName="tiny-llama", SessionId="NEW_SESSION",
                          Body=json.dumps({"requestType": "NEW_SESSION"}),
                          ContentType="application/json")
    new = r["NewSessionId"]
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-sagemaker-new-session-id"] == new
    session_id = EXPIRES.fullmatch(new).group(1)

    r = c.invoke_endpoint(EndpointName="tiny-llama", SessionId=session_id,
                          Body=json.dumps(GENERATE), ContentType="application/json")
    assert "generated_text" in json.loads(r["Body"].read())

    r = c.invoke_endpoint_with_response_stream(
        EndpointName="tiny-llama", SessionId=session_id,
        Body=json.dumps({**GENERATE, "stream": True}), ContentType="application/json")
    lines = b"".join(e["PayloadPart"]["Bytes"] for e in r["Body"]).decode().splitlines()
    assert len(lines) >= 1 and all(json.loads(x) for x in lines)

    r = c.invoke_endpoint(EndpointName="tiny-llama", SessionId=session_id,
                          Body=json.dumps({"requestType": "CLOSE"}),
                          ContentType="application/json")
    assert r["ClosedSessionId"] == session_id

    with pytest.raises(c.exceptions.ModelError) as ei:
        c.invoke_endpoint(EndpointName="tiny-llama", SessionId=session_id,
                          Body=json.dumps(GENERATE), ContentType="application/json")
    assert ei.value.response["OriginalStatusCode"] == 404
    assert session_id in ei.value.response["OriginalMessage"]
