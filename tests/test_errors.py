"""The one error table: every error type maps to its status and a JSON body."""

import json

import pytest

from engines.contracts import errors as E


@pytest.mark.parametrize("cls, status, type_", [
    (E.BadRequest, 400, "BadRequest"),
    (E.ModelNotFound, 404, "ModelNotFound"),
    (E.RouteNotFound, 404, "ResourceNotFound"),
    (E.MethodNotAllowed, 405, "MethodNotAllowed"),
    (E.Conflict, 409, "Conflict"),
    (E.PayloadTooLarge, 413, "PayloadTooLarge"),
    (E.ModelFailure, 424, "ModelError"),
    (E.WorkerDied, 500, "WorkerDied"),
    (E.QueueFull, 503, "QueueFull"),
    (E.ModelNotReady, 503, "ModelNotReady"),
    (E.PredictTimeout, 504, "PredictTimeout"),
    (E.OutOfMemory, 507, "OutOfMemory"),
])
def test_table(cls, status, type_):
    e = cls("what went wrong")
    assert (e.status, e.type, e.message) == (status, type_, "what went wrong")
    assert json.loads(E.error_body(e.status, e.message, e.type)) == {
        "code": status, "type": type_, "message": "what went wrong"}


def test_unavailable_says_when_to_retry():
    assert E.QueueFull("x").headers["Retry-After"] == "1"


def test_bare_status_codes():
    assert E.status_type(413) == "PayloadTooLarge"
    assert E.status_type(418) == "ClientError"
    assert E.status_type(502) == "ServerError"
