"""A server started on a model.tar.gz and on a Hugging Face hub id (served from a real
huggingface_hub cache layout, offline), as SageMaker and TGI users name their models."""

from __future__ import annotations

import tarfile

import pytest
from tiny_models import hub_cache_layout, make_tiny_llama

from server_utils import LmcServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def generate(srv: LmcServer) -> str:
    r = srv.post("/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
    assert r.status == 200, r.body
    return r.json()["generated_text"]


def test_model_tar_gz_and_hub_id_serve_the_same_model(tiny, tmp_path):
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # SageMaker's layout: files at the root
        for f in sorted(tiny.iterdir()):
            tar.add(f, arcname=f.name)
    cache = tmp_path / "lmc-cache"
    with LmcServer([], env={"HF_MODEL_ID": str(archive), "LMC_CACHE": str(cache)},
                   timeout_s=180) as srv:
        from_archive = generate(srv)
        assert "model" in srv.request("GET", "/ping").json()

    hf_home = tmp_path / "hf"
    files = {f.name: f.read_bytes() for f in tiny.iterdir() if f.is_file()}
    hub_cache_layout(hf_home / "hub", "acme/tiny-llama", files, commit=COMMIT)
    env = {"HF_MODEL_ID": "acme/tiny-llama", "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "LMC_CACHE": str(cache)}
    with LmcServer([], env=env, timeout_s=180) as srv:
        assert generate(srv) == from_archive  # greedy, same weights
        assert srv.request("GET", "/ping").json() == {"tiny-llama": {"status": "Healthy"}}


def test_unsafe_archive_and_uncached_hub_id_leave_the_model_failed(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 0
        tar.addfile(info)
    env = {"HF_MODEL_ID": str(evil), "LMC_CACHE": str(tmp_path / "cache")}
    with LmcServer([], env=env, wait_status=500, timeout_s=60) as srv:
        error = srv.request("GET", "/ping").json()["evil"]["error"]
        assert "../escape.txt" in error and str(evil) in error
    env = {"HF_MODEL_ID": "acme/not-cached", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "LMC_CACHE": str(tmp_path / "cache")}
    with LmcServer([], env=env, wait_status=500, timeout_s=60) as srv:
        error = srv.request("GET", "/ping").json()["not-cached"]["error"]
        assert "acme/not-cached" in error and "HF_HOME" in error
        assert not (tmp_path / "../escape.txt").exists()
