"""End to end with the real default model (SmolLM2-135M-Instruct): `lmc serve` with no model
argument prepares it (once per machine, in the shared cache) and answers over HTTP."""

import os
from pathlib import Path

import pytest

from server_utils import LmcServer

pytestmark = pytest.mark.e2e


def test_default_model_answers_capital_of_france(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_MODEL_ID", "SERVING_LOAD_MODELS", "SERVING_MODEL_STORE")}
    if Path("/opt/ml/model").is_dir() and any(Path("/opt/ml/model").iterdir()):
        pytest.skip("/opt/ml/model is populated here; the default model would not be chosen")
    with LmcServer([], env=env, timeout_s=240) as s:
        assert "SmolLM2-135M-Instruct" in s.request("GET", "/ping").json()
        r = s.post("/invocations", {"inputs": "The capital of France is",
                                    "parameters": {"max_new_tokens": 16}})
        assert r.status == 200, r.body
        text = r.json()["generated_text"]
        assert "Paris" in text
        # Greedy is deterministic: the same request gives the same text.
        again = s.post("/invocations", {"inputs": "The capital of France is",
                                        "parameters": {"max_new_tokens": 16}})
        assert again.json()["generated_text"] == text
        r = s.post("/invocations", {"inputs": "x", "parameters": {"max_new_tokens": 0}})
        assert r.status == 400 and "max_new_tokens" in r.json()["message"]
        r = s.post("/invocations", {"inputs": "x", "parameters": {"bogus": 1}})
        assert r.status == 400 and "bogus" in r.json()["message"]
