"""s3:// model sources against a real S3-compatible server process (moto in server mode on a
loopback port), with the real boto3 client: mirroring a prefix, reusing the cache, refetching
what changed, surviving a killed download, clear errors, and a server that serves from S3."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.sources import SourceError, fetch
from engines.sources import s3 as s3src
from server_utils import LmcServer, MotoServer

BUCKET = "models"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as env:
        s3src.client().create_bucket(Bucket=BUCKET)
        yield env


def upload(folder: Path, prefix: str) -> None:
    c = s3src.client()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        c.upload_file(str(f), BUCKET, prefix + f.relative_to(folder).as_posix())


class Calls:
    """Counts the object requests one boto3 client makes (GET/HEAD of object bodies)."""

    def __init__(self) -> None:
        self.client = s3src.client()
        self.gets = 0
        self.client.meta.events.register("before-call.s3.GetObject", self._count)
        self.client.meta.events.register("before-call.s3.HeadObject", self._count)

    def _count(self, **_):
        self.gets += 1


@pytest.fixture
def model_files(tmp_path):
    d = tmp_path / "src"
    (d / "nested" / "deeper").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (d / "nested" / "deeper" / "note.txt").write_text("nested keys keep their folders")
    return d


def test_prefix_is_mirrored_then_reused_then_refetched_when_changed(moto, model_files, tmp_path):
    url = f"s3://{BUCKET}/mirror/m1"  # no trailing slash: still a prefix
    upload(model_files, "mirror/m1/")
    cache = tmp_path / "cache"
    first = Calls()
    local = s3src.fetch_prefix(url, cache, s3=first.client)
    assert (local / "nested" / "deeper" / "note.txt").read_text() == \
        "nested keys keep their folders"
    assert (local / "weights.bin").read_bytes() == (model_files / "weights.bin").read_bytes()
    assert first.gets >= 3
    again = Calls()
    assert s3src.fetch_prefix(url, cache, s3=again.client) == local
    assert again.gets == 0  # one LIST, no object request
    s3src.client().put_object(Bucket=BUCKET, Key="mirror/m1/nested/deeper/note.txt",
                              Body=b"changed")
    changed = Calls()
    s3src.fetch_prefix(url, cache, s3=changed.client)
    assert (local / "nested" / "deeper" / "note.txt").read_bytes() == b"changed"
    assert (local / "weights.bin").read_bytes() == (model_files / "weights.bin").read_bytes()
    assert 1 <= changed.gets <= 2  # the changed object only (HEAD + GET at most)


def test_a_killed_download_leaves_nothing_usable_and_the_next_start_completes(
        moto, model_files, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/killed/"
    upload(model_files, "killed/")
    cache = tmp_path / "cache"
    calls = Calls()
    real = calls.client.download_file
    seen = []

    def dies_on_the_second(bucket, key, *args, **kwargs):
        seen.append(key)
        if len(seen) == 2:
            raise KeyboardInterrupt  # what a SIGINT mid-download looks like in this thread
        return real(bucket, key, *args, **kwargs)

    monkeypatch.setattr(calls.client, "download_file", dies_on_the_second)
    monkeypatch.setattr(s3src, "CONCURRENT_OBJECTS", 1)
    with pytest.raises(KeyboardInterrupt):
        s3src.fetch_prefix(url, cache, s3=calls.client)
    target = s3src.cache_dir_for(url, cache)
    assert not target.exists()
    assert not list(target.parent.glob(".*tmp*"))
    monkeypatch.undo()
    local = s3src.fetch_prefix(url, cache)
    assert (local / "config.json").is_file() and (local / s3src.MANIFEST).is_file()


def test_a_process_killed_mid_download_leaves_no_cache_entry(moto, tmp_path):
    """SIGKILL, not an exception: the temp copy stays behind, is never served, and the next
    start cleans it up and completes."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    (big / "model.safetensors").write_bytes(os.urandom(96 * 1024 * 1024))
    upload(big, "sigkill/")
    cache = tmp_path / "cache"
    url = f"s3://{BUCKET}/sigkill/"
    code = (f"from pathlib import Path; from engines.sources import s3; "
            f"s3.fetch_prefix({url!r}, Path({str(cache)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    target = s3src.cache_dir_for(url, cache)
    deadline = time.monotonic() + 60
    while not list(target.parent.glob(".*tmp*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not target.exists() or not (target / s3src.MANIFEST).exists()
    local = s3src.fetch_prefix(url, cache)
    assert (local / "model.safetensors").stat().st_size == 96 * 1024 * 1024
    assert not list(target.parent.glob(".*tmp*"))


@pytest.mark.parametrize("url, needle", [
    ("s3://no-such-bucket/m/", "bucket 'no-such-bucket' does not exist"),
    (f"s3://{BUCKET}/nothing-here/", "no objects under this prefix"),
])
def test_errors_name_the_source_and_the_fix(moto, tmp_path, url, needle):
    with pytest.raises(SourceError, match=needle) as e:
        fetch(url, cache_dir=tmp_path, source="HF_MODEL_ID")
    assert str(e.value).startswith(f"HF_MODEL_ID={url}")


def test_access_denied_is_a_clear_error(tmp_path):
    """A server that checks credentials (moto with IAM on), and keys it does not know."""
    with MotoServer(server_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}):
        with pytest.raises(SourceError, match=r"^HF_MODEL_ID=s3://locked/m/: access denied "
                                              r"\(InvalidAccessKeyId\).*s3:ListBucket"):
            fetch("s3://locked/m/", cache_dir=tmp_path, source="HF_MODEL_ID")


def test_disk_full_is_a_clear_error(moto, model_files, tmp_path, monkeypatch):
    upload(model_files, "full/")
    calls = Calls()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(calls.client, "download_file", full)
    with pytest.raises(SourceError, match="disk full.*LMC_CACHE"):
        s3src.fetch_prefix(f"s3://{BUCKET}/full/", tmp_path, s3=calls.client)


def test_serving_from_s3_with_properties_in_the_prefix(moto, tmp_path_factory):
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    (d / "serving.properties").write_text("option.tgi_compat=true\n")
    upload(d, "tiny/llama/")
    env = {**moto, "HF_MODEL_ID": f"s3://{BUCKET}/tiny/llama/",
           "LMC_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with LmcServer([], env=env, timeout_s=180) as srv:
        r = srv.post("/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
        assert r.status == 200
        assert isinstance(r.json(), list)  # tgi_compat from the prefix's serving.properties
    # What arrived must be a model: a prefix without one leaves the model FAILED, saying why.
    s3src.client().put_object(Bucket=BUCKET, Key="notamodel/readme.txt", Body=b"hi")
    env["HF_MODEL_ID"] = f"s3://{BUCKET}/notamodel/"
    with LmcServer([], env=env, timeout_s=60, wait_status=500) as srv:
        body = srv.request("GET", "/ping").json()
        assert "no config.json, no model.py" in body["notamodel"]["error"]
    # After the fix (the model uploaded where the variable points), the next start serves it.
    upload(d, "notamodel/")
    with LmcServer([], env=env, timeout_s=180) as srv:
        assert srv.post("/invocations", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
                        ).status == 200


@pytest.mark.e2e
def test_smollm2_served_from_s3(moto, tmp_path):
    """The real default model uploaded under a prefix, with a serving.properties and a nested
    key of its own, served from S3 as option.model_id users configure it."""
    from engines.default_model import prepare_default_model

    smol = Path(prepare_default_model(progress=False))
    c = s3src.client()
    for f in sorted(smol.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            c.upload_file(str(f), BUCKET, f"smollm2/{f.name}")
    c.put_object(Bucket=BUCKET, Key="smollm2/serving.properties",
                 Body=b"option.max_rolling_batch_size=4\n")
    c.put_object(Bucket=BUCKET, Key="smollm2/extra/README.md", Body=b"nested keys come along")
    env = {**moto, "HF_MODEL_ID": f"s3://{BUCKET}/smollm2/", "LMC_CACHE": str(tmp_path)}
    with LmcServer([], env=env, timeout_s=300) as srv:
        r = srv.post("/invocations", {"inputs": "The capital of France is",
                                      "parameters": {"max_new_tokens": 16}})
        assert r.status == 200 and "Paris" in r.json()["generated_text"], r.body
        described = srv.request("GET", "/models/smollm2").json()[0]
        assert described["status"] == "Healthy"
    local = s3src.cache_dir_for(f"s3://{BUCKET}/smollm2/", tmp_path)
    assert (local / "extra" / "README.md").read_bytes() == b"nested keys come along"
    assert (local / "model.safetensors").stat().st_size == (smol / "model.safetensors").stat().st_size


def test_ping_answers_loading_while_the_model_downloads(moto, tmp_path_factory):
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    (d / "padding.bin").write_bytes(os.urandom(192 * 1024 * 1024))  # a download that takes a while
    upload(d, "slow/tiny/")
    env = {**moto, "HF_MODEL_ID": f"s3://{BUCKET}/slow/tiny/",
           "LMC_CACHE": str(tmp_path_factory.mktemp("cache"))}
    seen = []
    with LmcServer([], env=env, wait_status=None) as srv:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                t0 = time.monotonic()
                r = srv.request("GET", "/ping", timeout=2)  # SageMaker's health-check timeout
                seen.append((r.status, r.json(), time.monotonic() - t0))
                if r.status == 200:
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.05)
    statuses = [s for s, _, _ in seen]
    assert statuses[-1] == 200, seen[-3:]
    assert {"tiny": {"status": "Loading"}} in [body for s, body, _ in seen if s == 503], seen
    assert max(t for _, _, t in seen) < 2
