"""Local model sources, pure Python: model archives (engines/sources/archive.py) and Hugging Face
hub ids resolved from a real huggingface_hub cache layout (engines/sources/hub.py).

No test here reaches the network: every hub test runs with HF_HUB_OFFLINE=1 (or a stand-in for
snapshot_download), and sockets refuse to connect while they run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tiny_models import hub_cache_layout

from engines.sources import archive as archive_mod
from engines.sources import hub
from engines.sources.archive import COMPLETE_MARKER, extract_archive
from engines.sources.errors import SourceError
from engines.sources.hub import looks_like_hub_id, resolve_hub

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "HF_MODEL_ID=/x/model.tar.gz"


# --- archives -------------------------------------------------------------------------------

def make_model(d: Path, tag: str = "v1") -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"tag": tag}))
    (d / "tokenizer.json").write_text("{}")
    (d / "sub").mkdir()
    (d / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    return d


def tar_dir(model: Path, path: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        tar.add(model, arcname=arcname)
    return path


def tar_members(path: Path, *members: tarfile.TarInfo, mode: str = "w:gz") -> Path:
    """An archive of hand-made members: a good config.json first, then `members`."""
    with tarfile.open(path, mode) as tar:
        add_file(tar, "config.json", b"{}")
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)
    return path


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def entries(cache: Path) -> list[Path]:
    """Every dir under cache/archives (complete entries and temp dirs alike)."""
    return sorted(p for p in (cache / "archives").iterdir() if p.is_dir())


def forbid_extraction(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(archive_mod.tarfile, "open", refuse)


def test_files_at_root_are_extracted_once_then_reused(tmp_path, monkeypatch):
    # As `tar czf model.tar.gz -C model .` makes it: members "." and "./config.json".
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar.gz", ".")
    cache = tmp_path / "cache"
    got = extract_archive(archive, cache, source=SOURCE)
    assert json.loads((got / "config.json").read_text()) == {"tag": "v1"}
    assert (got / "sub" / "weights.bin").read_bytes() == (tmp_path / "m/sub/weights.bin").read_bytes()
    assert got.is_relative_to(cache / "archives") and (got.parent / COMPLETE_MARKER).is_file()
    (got / "sentinel").write_text("a re-extraction would drop me")

    forbid_extraction(monkeypatch)
    assert extract_archive(archive, cache, source=SOURCE) == got
    assert (got / "sentinel").exists() and len(entries(cache)) == 1


@pytest.mark.parametrize("suffix, mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_one_top_dir_is_returned(tmp_path, suffix, mode):
    # As `tar czf model.tar.gz mymodel/` makes it.
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / f"model{suffix}", "mymodel", mode)
    got = extract_archive(archive, tmp_path / "cache", source=SOURCE)
    assert got.name == "mymodel" and (got / "config.json").is_file()


def test_an_archive_changed_on_disk_is_extracted_again(tmp_path):
    archive, cache = tmp_path / "model.tar.gz", tmp_path / "cache"
    first = extract_archive(tar_dir(make_model(tmp_path / "m1"), archive, "."), cache,
                            source=SOURCE)
    tar_dir(make_model(tmp_path / "m2", tag="v2"), archive, ".")
    st = archive.stat()  # a rewrite within the same mtime tick must count as a change too
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = extract_archive(archive, cache, source=SOURCE)
    assert second != first
    assert json.loads((second / "config.json").read_text()) == {"tag": "v2"}


@pytest.mark.parametrize("bad, reason", [
    (member("../x"), "'..' component"),
    (member("sub/../../x"), "'..' component"),
    (member("/abs/x"), "absolute path"),
    (member("link", tarfile.SYMTYPE, "../../outside"), "outside the archive's directory"),
    (member("sub/link", tarfile.SYMTYPE, "../../x"), "outside the archive's directory"),
    (member("link", tarfile.SYMTYPE, "/etc/passwd"), "symlink to the absolute path"),
    (member("hard", tarfile.LNKTYPE, "../outside"), "hardlink to '../outside', outside"),
    (member("hard", tarfile.LNKTYPE, "/etc/passwd"), "hardlink to the absolute path"),
    (member("dev", tarfile.CHRTYPE), "a character device"),
    (member("blk", tarfile.BLKTYPE), "a block device"),
    (member("fifo", tarfile.FIFOTYPE), "a FIFO"),
])
def test_unsafe_members_are_refused_by_name_and_reason(tmp_path, bad, reason):
    archive = tar_members(tmp_path / "model.tar.gz", bad)
    cache = tmp_path / "work" / "cache"
    with pytest.raises(SourceError) as e:
        extract_archive(archive, cache, source=SOURCE)
    msg = str(e.value)
    assert msg.startswith(SOURCE) and str(archive) in msg and repr(bad.name) in msg
    assert reason in msg and "tar czf model.tar.gz -C" in msg
    assert entries(cache) == []  # no entry and no temp dir left
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["cache"]


@pytest.fixture(params=[True, False], ids=["data-filter", "no-filter"])
def filters(request, monkeypatch) -> bool:
    """With tarfile's data filter, and without it (Pythons lacking the PEP 706 backport),
    where the member checks stand alone."""
    monkeypatch.setattr(archive_mod, "_HAS_FILTERS", request.param)
    return request.param


def test_a_symlink_chain_leading_outside_is_refused(tmp_path, filters):
    # By name each link stays inside: x/y/y2 -> .. is x/y/.. = x. On disk x/y -> .. is the root
    # itself, so x/y/y2 is the root's y2, and its .. is above the root. Only the disk shows it
    # (the data filter); without it, nothing may go through a symlink the archive made.
    archive = tar_members(
        tmp_path / "model.tar.gz", member("x", tarfile.DIRTYPE),
        member("x/y", tarfile.SYMTYPE, ".."), member("x/y/y2", tarfile.SYMTYPE, ".."),
        member("x/y/y2/escaped"))
    reason = "would be written outside" if filters else "goes through the symlink 'x/y'"
    with pytest.raises(SourceError, match=rf"member 'x/y/y2' {reason}"):
        extract_archive(archive, tmp_path / "cache", source=SOURCE)
    assert not list(tmp_path.rglob("escaped")) and entries(tmp_path / "cache") == []


def test_links_inside_the_archive_are_kept(tmp_path, filters):
    # An archive of a huggingface_hub snapshot: files are relative symlinks to ../../blobs.
    archive = tar_members(
        tmp_path / "model.tar.gz", member("blobs/abc"),
        member("snap/weights", tarfile.SYMTYPE, "../blobs/abc"),
        member("same", tarfile.LNKTYPE, "blobs/abc"))
    got = extract_archive(archive, tmp_path / "cache", source=SOURCE)
    assert (got / "snap/weights").is_symlink() and (got / "snap/weights").read_bytes() == b"x"
    assert (got / "same").read_bytes() == b"x"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def truncate(path: Path, size: int) -> Path:
    return write(path, path.read_bytes()[:size])


def plain_tar_cut_after_first_member(tmp_path: Path) -> Path:
    path = tar_members(tmp_path / "model.tar", member("second"), mode="w")
    return truncate(path, 2 * tarfile.BLOCKSIZE)  # config.json's header and data, no more


def plain_tar_cut_inside_a_file(tmp_path: Path) -> Path:
    path = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar", ".", "w")
    with tarfile.open(path) as tar:
        cut = tar.getmember("./sub/weights.bin").offset_data + 100
    return truncate(path, cut)


@pytest.mark.parametrize("make, reason", [
    (lambda t: truncate(tar_dir(make_model(t / "m"), t / "model.tar.gz", "."), 3000),
     "Compressed file ended"),
    (plain_tar_cut_after_first_member, "end-of-archive marker"),
    (plain_tar_cut_inside_a_file, "unexpected end of data; the last member read was "
                                  "'./sub/weights.bin'"),
    (lambda t: write(t / "model.tar.gz", b"\x1f\x8b not really gzip"), ""),
    (lambda t: write(t / "model.tar.gz", os.urandom(4096)), ""),
])
def test_truncated_or_corrupt_archives_are_refused(tmp_path, make, reason):
    archive = make(tmp_path)
    with pytest.raises(SourceError) as e:
        extract_archive(archive, tmp_path / "cache", source=SOURCE)
    msg = str(e.value)
    assert msg.startswith(SOURCE) and str(archive) in msg
    assert "not a readable tar archive (truncated or corrupt" in msg and reason in msg
    assert entries(tmp_path / "cache") == []


def test_an_empty_archive_is_refused(tmp_path):
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz"):
        pass
    with pytest.raises(SourceError, match="holds no files"):
        extract_archive(tmp_path / "model.tar.gz", tmp_path / "cache", source=SOURCE)


def test_a_missing_archive_is_named(tmp_path):
    with pytest.raises(SourceError, match=rf"^{SOURCE}: cannot read the archive .*nope.tar.gz"):
        extract_archive(tmp_path / "nope.tar.gz", tmp_path / "cache", source=SOURCE)


KILL_AFTER_FIRST_MEMBER = """
import os, signal, sys
from pathlib import Path
from engines.sources import archive
check, seen = archive._check_member, []
def check_then_die(*args):
    seen.append(args)
    if len(seen) == 3:  # a few members are on disk by now
        os.kill(os.getpid(), signal.SIGKILL)
    check(*args)
archive._check_member = check_then_die
archive.extract_archive(Path(sys.argv[1]), Path(sys.argv[2]), source="test")
"""


def test_a_killed_extraction_leaves_nothing_a_later_call_would_return(tmp_path):
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar.gz", ".")
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_MEMBER, archive, cache],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    [left] = entries(cache)  # the temp dir, with part of the model, and no marker
    assert left.name.startswith(".") and not (left / COMPLETE_MARKER).exists()
    assert list(left.rglob("*.json"))

    got = extract_archive(archive, cache, source=SOURCE)
    assert (got / "sub" / "weights.bin").is_file() and (got.parent / COMPLETE_MARKER).is_file()
    assert entries(cache) == [got.parent]  # the leftover was cleaned


def test_a_failed_extraction_is_cleaned_and_the_next_call_completes(tmp_path, monkeypatch):
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar.gz", ".")
    cache, calls = tmp_path / "cache", []
    check = archive_mod._check_member

    def fail_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # anything at all, even a Ctrl-C
        check(*args)

    monkeypatch.setattr(archive_mod, "_check_member", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, cache, source=SOURCE)
    assert entries(cache) == []
    monkeypatch.setattr(archive_mod, "_check_member", check)
    assert (extract_archive(archive, cache, source=SOURCE) / "config.json").is_file()


def test_workers_starting_together_share_one_extraction(tmp_path):
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar.gz", ".")
    cache = tmp_path / "cache"
    code = ("import sys; from pathlib import Path; from engines.sources.archive import "
            "extract_archive; print(extract_archive(Path(sys.argv[1]), Path(sys.argv[2]), "
            "source='test'))")
    workers = [subprocess.Popen([sys.executable, "-c", code, archive, cache], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = {w.communicate(timeout=60)[0].strip() for w in workers}
    assert all(w.returncode == 0 for w in workers) and len(outs) == 1
    assert entries(cache) == [Path(outs.pop()).parent]


def test_an_entry_without_its_marker_is_replaced(tmp_path):
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar.gz", ".")
    cache = tmp_path / "cache"
    got = extract_archive(archive, cache, source=SOURCE)
    (got.parent / COMPLETE_MARKER).unlink()  # as if copied in by hand, maybe half-way
    (got / "config.json").unlink()
    again = extract_archive(archive, cache, source=SOURCE)
    assert again == got and (again / "config.json").is_file()


def test_disk_full_names_the_cache_and_lmc_cache(tmp_path, monkeypatch):
    archive = tar_dir(make_model(tmp_path / "m"), tmp_path / "model.tar.gz", ".")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tarfile.TarFile, "makefile", no_space)
    with pytest.raises(SourceError) as e:
        extract_archive(archive, tmp_path / "cache", source=SOURCE)
    msg = str(e.value)
    assert "no space left" in msg and str(tmp_path / "cache" / "archives") in msg
    assert "LMC_CACHE" in msg and entries(tmp_path / "cache") == []


def test_sources_import_neither_torch_nor_huggingface_hub():
    code = ("import sys, engines.sources.archive, engines.sources.hub, engines.sources.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'huggingface_hub', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# --- hub ids --------------------------------------------------------------------------------

COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, no_network) -> Path:
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, *, ref: str | None = "main", commit: str = COMMIT,
               tag: str = "v1") -> Path:
    files = {"config.json": json.dumps({"tag": tag}).encode(), "tokenizer.json": b"{}"}
    return hub_cache_layout(cache, repo_id, files, commit=commit, ref=ref)


def test_a_cached_repo_resolves_to_its_snapshot(hub_cache):
    snapshot = cache_repo(hub_cache, "org/name")
    got = resolve_hub("org/name", revision=None, source="HF_MODEL_ID")
    assert got == snapshot.resolve()
    assert json.loads((got / "config.json").read_text()) == {"tag": "v1"}
    assert resolve_hub("org/name", revision=COMMIT, source="HF_MODEL_ID") == got


def test_a_revision_by_name_reads_its_ref(hub_cache):
    cache_repo(hub_cache, "org/name")
    tagged = cache_repo(hub_cache, "org/name", ref="v2.0", commit=OTHER_COMMIT, tag="v2")
    got = resolve_hub("org/name", revision="v2.0", source="HF_MODEL_ID")
    assert got == tagged.resolve() and json.loads((got / "config.json").read_text())["tag"] == "v2"


def test_hf_home_is_honoured(tmp_path, monkeypatch, hub_cache):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = cache_repo(tmp_path / "home" / "hub", "solo")  # a repo id without org
    assert resolve_hub("solo", revision=None, source="HF_MODEL_ID") == snapshot.resolve()


def test_a_repo_missing_offline_says_where_it_looked_and_how_to_fill_the_cache(hub_cache):
    with pytest.raises(SourceError) as e:
        resolve_hub("org/missing", revision=None, source="HF_MODEL_ID")
    msg = str(e.value)
    assert msg.startswith("HF_MODEL_ID: the Hugging Face repo org/missing is not in the hub "
                          f"cache {hub_cache}")
    assert "HF_HUB_OFFLINE=1 forbids downloading" in msg
    assert "hf download org/missing" in msg and "huggingface-cli download" in msg
    assert "set HF_HOME" in msg


def test_an_uncached_revision_offline_lists_the_cached_ones(hub_cache):
    cache_repo(hub_cache, "org/name")
    with pytest.raises(SourceError) as e:
        resolve_hub("org/name", revision="v9", source="HF_MODEL_ID")
    msg = str(e.value)
    assert "is in the hub cache" in msg and "not its revision 'v9'" in msg
    assert "refs main" in msg and f"commits {COMMIT[:12]}" in msg
    assert "hf download org/name --revision v9" in msg


def test_an_invalid_repo_id_is_named(hub_cache):
    with pytest.raises(SourceError, match="'org--x' is not a valid Hugging Face repo id"):
        resolve_hub("org--x", revision=None, source="HF_MODEL_ID")


def hub_error(name: str):
    """A huggingface_hub HTTP error without an HTTP response (their constructor wants one)."""
    from huggingface_hub import utils

    cls = getattr(utils, name)
    err = cls.__new__(cls)
    Exception.__init__(err, "404 Client Error")
    return err


@pytest.mark.parametrize("error, expected", [
    (lambda: hub_error("GatedRepoError"),
     ["is gated: accept its conditions at https://huggingface.co/org/name"]),
    (lambda: hub_error("RepositoryNotFoundError"),
     ["was not found on the hub: check the id; if it is private, set HF_TOKEN"]),
    (lambda: hub_error("RevisionNotFoundError"),
     ["has no revision 'nope': give a branch, tag or commit"]),
    (lambda: __import__("huggingface_hub").utils.LocalEntryNotFoundError("Got: ConnectError"),
     ["is not in the hub cache", "the hub could not be reached (Got: ConnectError)",
      "Give the container network access"]),
    (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     ["no space left on the device while downloading it", "set HF_HOME"]),
])
def test_hub_failures_online_say_what_to_change(hub_cache, monkeypatch, error, expected):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    # Another test in this process may have set it before huggingface_hub was imported.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fail(repo_id, **kwargs):  # stands in for the network
        calls.append(kwargs)
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(SourceError) as e:
        resolve_hub("org/name", revision="nope", source="HF_MODEL_ID")
    assert str(e.value).startswith("HF_MODEL_ID: the Hugging Face repo org/name")
    assert all(part in str(e.value) for part in expected), str(e.value)
    assert calls == [{"revision": "nope", "cache_dir": hub_cache, "local_files_only": False}]


@pytest.mark.parametrize("value, expected", [
    ("org/name", True), ("gpt2", True), ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("meta-llama/Llama-3.1-8B", True), ("a_b.c/d-e.f", True),
    ("s3://bucket/model/", False), ("https://huggingface.co/org/name", False),
    ("model.tar.gz", False), ("org/model.tgz", False), ("org/model.tar", False),
    ("/abs/path", False), ("./rel", False), ("a/b/c", False), ("org--x/name", False),
    ("org/na..me", False), ("org/name.git", False), ("-org/name", False), ("org/name.", False),
    ("", False), ("café/x", False), ("x" * 97, False),
])
def test_looks_like_hub_id(value, expected):
    assert looks_like_hub_id(value) is expected


def test_an_existing_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not looks_like_hub_id("org/name") and looks_like_hub_id("org/other")


def test_hub_cache_dir_follows_huggingface_hub_precedence():
    home = os.path.expanduser("~")
    assert hub.hub_cache_dir({}) == Path(home, ".cache", "huggingface", "hub")
    assert hub.hub_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub.hub_cache_dir({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}) == Path("/h/hub")
    assert hub.hub_cache_dir({"HF_HOME": "/h", "HF_HUB_CACHE": "/c"}) == Path("/c")
    assert hub.hub_cache_dir({"HF_HOME": "~/h"}) == Path(home, "h", "hub")
