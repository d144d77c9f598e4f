"""The notebooks in notebooks/, executed headless (nbclient, the venv's ipykernel) against one real
LMC server serving a tiny random Llama, each into its own temp dir: never in place.

The notebooks read their parameters from the environment (LMC_URL, LMC_MODE, ...) with defaults,
so the test passes the server's URL through the kernel's environment and the committed files stay
as a user opens them. The committed notebooks carry no outputs.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from server_utils import ROOT

NOTEBOOKS = ROOT / "notebooks"
EXPECTED = {"benchmark.ipynb", "deploy_sagemaker.ipynb", "streaming_details.ipynb"}
MODEL = "tiny-llama"
KERNEL_MARK = "LMC-TEST-KERNEL-PYTHON:"


@pytest.fixture(scope="module")
def server(tiny_llm_server):
    return tiny_llm_server


def execute(name: str, workdir: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Runs a copy of notebooks/`name` with `workdir` as its working directory; the executed copy
    (outputs and all) is written there too, for looking at a failure."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # One extra cell reports which Python the kernel runs.
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import sys; print({KERNEL_MARK!r}, sys.executable)", id="lmc-test-kernel"))
    client = NotebookClient(nb, kernel_name="python3", timeout=120, startup_timeout=60,
                            resources={"metadata": {"path": str(workdir)}})
    kernel_env = {**os.environ, "LMC_MODE": "local", "LMC_OUTPUT_DIR": str(workdir),
                  "LMC_REPO": str(ROOT), "MPLBACKEND": "Agg", **env}
    try:
        client.execute(env=kernel_env)
    finally:
        nbformat.write(nb, workdir / name)
    text = stdout(nb)
    kernel_python = re.search(re.escape(KERNEL_MARK) + r" (\S+)", text).group(1)
    # nbclient's "python3" kernel is this interpreter (the venv), not some other Python.
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
    return nb


def stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")


# -- the committed files ---------------------------------------------------------------------------


def test_notebooks_are_committed_clean():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == EXPECTED
    for name in sorted(EXPECTED):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        first = nb.cells[0]
        assert first.cell_type == "markdown", name
        assert re.search(r"CI runs this notebook (in local mode )?against a tiny random model",
                         " ".join(first.source.split())), name
        assert "make serve" in first.source, name
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "LMC_URL" in tagged[0].source, name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, \
                    f"{name}: commit notebooks without outputs"


def test_sagemaker_sdk_only_in_the_sagemaker_branch():
    # The sagemaker SDK is not installed here: only cells guarded by MODE == "sagemaker" import it.
    nb = nbformat.read(NOTEBOOKS / "deploy_sagemaker.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "import sagemaker" in cell.source:
            assert cell.source.startswith('if MODE == "sagemaker":'), cell.source[:80]


# -- executed against the server -----------------------------------------------------------------


def test_streaming_details(server, tmp_path):
    nb = execute("streaming_details.ipynb", tmp_path,
                 {"LMC_URL": server.url, "LMC_ENDPOINT_NAME": MODEL})
    text = stdout(nb)
    score = float(re.search(r"confidence \(geometric mean token probability\): ([0-9.]+)",
                            text).group(1))
    assert 0.0 < score <= 1.0
    assert "same score as the plain request: True" in text
    m = re.search(r"chained: (\d+) requests, (\d+) tokens, (\d+) characters; "
                  r"one request alone: (\d+) characters", text)
    requests, tokens, chained_chars, one_chars = map(int, m.groups())
    assert requests >= 2 and tokens > 32  # CHUNK_TOKENS: more than one request could give
    assert chained_chars > one_chars


def test_benchmark(server, tmp_path):
    execute("benchmark.ipynb", tmp_path, {
        "LMC_URL": server.url, "LMC_BENCH_CONCURRENCY": "1,4",
        "LMC_BENCH_REQUESTS_PER_CLIENT": "2", "LMC_BENCH_INPUT_WORDS": "32",
        "LMC_BENCH_MAX_NEW_TOKENS": "16"})
    png = tmp_path / "benchmark.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = json.loads((tmp_path / "benchmark.json").read_text())
    assert [(r["concurrency"], r["requests"]) for r in rows] == [(1, 2), (4, 8)]
    for r in rows:
        assert r["out_tok_s"] > 0
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert 0 < r["tpot_ms"]["p50"] <= r["tpot_ms"]["p99"]
    assert not (ROOT / "notebooks" / "benchmark.png").exists()  # nothing written in the repo


def test_deploy_sagemaker_local_mode(server, tmp_path):
    try:
        nb = execute("deploy_sagemaker.ipynb", tmp_path, {"LMC_URL": server.url})
    finally:
        server.request("DELETE", "/models/lmc-demo")  # if the notebook stopped before its cleanup
    text = stdout(nb)
    # The package: files at the archive's root, the configuration LMC checked.
    with tarfile.open(tmp_path / "lmc-deploy" / "model.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"serving.properties", "model.py", "config.json", "model.safetensors",
            "tokenizer.json"} <= names
    assert "configuration OK" in text
    # Registered from the unpacked archive, then served under the endpoint's name through boto3.
    assert 'Model "lmc-demo" registered' in text
    assert re.search(r"finish_reason: (length|eos_token) \| generated_tokens: \d+", text)
    assert "generated_tokens without max_new_tokens: 64" in text  # model.py's input formatter
    assert re.search(r"finish_reason: (length|eos_token) \| tokens: \d+", text)  # the stream
    assert "400 " in text and "max_new_tokenz" in text  # ModelError
    assert 'Model "lmc-demo" unregistered' in text
    models = server.request("GET", "/models").json()["models"]
    assert [m["modelName"] for m in models] == [MODEL]
