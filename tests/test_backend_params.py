"""The external engines' parameter mappings (engines/backends/params.py) and their startup
checks (engines/backends/requirements.py), without the engines' packages: every LMC sampling
parameter lands on the engine's own argument or is a 400 that names it."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_llama

from engines.backends.params import (neuronx_sampling_kwargs, trtllm_sampling_kwargs,
                                     vllm_sampling_kwargs)
from engines.options import ConfigError
from engines.selection import choose_engine
from engines.types import SamplingParams, ValidationError

SAMPLED = SamplingParams(max_new_tokens=9, min_new_tokens=2, do_sample=True, temperature=0.7,
                         top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                         presence_penalty=0.5, frequency_penalty=-0.5, seed=11,
                         stop_sequences=("\n\n", "END"), stop_token_ids=(7, 8),
                         ignore_eos_token=True, top_n_tokens=3, decoder_input_details=True)


def test_vllm_mapping_carries_every_parameter():
    assert vllm_sampling_kwargs(SAMPLED) == dict(
        max_tokens=9, min_tokens=2, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
        repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5, seed=11,
        stop=["\n\n", "END"], stop_token_ids=[7, 8], ignore_eos=True, logprobs=3,
        prompt_logprobs=0, skip_special_tokens=True, include_stop_str_in_output=False)


def test_greedy_is_temperature_zero_whatever_the_sampling_knobs_say():
    greedy = SamplingParams(do_sample=False, temperature=0.7, top_k=5, top_p=0.5, min_p=0.1)
    kw = vllm_sampling_kwargs(greedy)
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"]) == (0.0, 0, 1.0, 0.0)
    assert kw["logprobs"] == 0 and kw["prompt_logprobs"] is None  # the sampled token's only
    t = trtllm_sampling_kwargs(greedy)
    assert t["temperature"] == 0.0 and not {"top_k", "top_p", "min_p"} & set(t)
    n = neuronx_sampling_kwargs(greedy)
    assert (n["do_sample"], n["top_k"]) == (False, 1)


def test_trtllm_mapping_carries_every_parameter():
    assert trtllm_sampling_kwargs(SAMPLED) == dict(
        max_tokens=9, min_tokens=2, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
        repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5, seed=11,
        stop=["\n\n", "END"], stop_token_ids=[7, 8], ignore_eos=True, logprobs=3,
        prompt_logprobs=1, include_stop_str_in_output=False, detokenize=True, n=1)


def test_neuronx_mapping_and_what_its_sampler_lacks():
    plain = SamplingParams(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=20,
                           top_p=0.95, stop_sequences=("x",), stop_token_ids=(3,))
    assert neuronx_sampling_kwargs(plain) == dict(
        do_sample=True, top_k=20, top_p=0.95, temperature=0.8, max_new_tokens=5,
        min_new_tokens=0, stop_strings=["x"], stop_token_ids=[3], ignore_eos=False)
    for name, value in [("repetition_penalty", 1.3), ("seed", 1), ("top_n_tokens", 2),
                        ("min_p", 0.1), ("decoder_input_details", True)]:
        with pytest.raises(ValidationError, match=f"{name}=.* is not supported by the neuronx"):
            neuronx_sampling_kwargs(SamplingParams(do_sample=True, **{name: value}))


@pytest.mark.parametrize("mapping", [vllm_sampling_kwargs, trtllm_sampling_kwargs])
def test_typical_p_is_a_400_naming_it(mapping):
    with pytest.raises(ValidationError, match="typical_p=0.5 is not supported") as e:
        mapping(SamplingParams(typical_p=0.5))
    assert e.value.field == "typical_p"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("llama")))


@pytest.mark.parametrize("name,needs", [
    ("trtllm", "the tensorrt_llm package (pip install tensorrt-llm, NVIDIA's wheels) and an "
               "NVIDIA GPU with CUDA"),
    ("tensorrt-llm", "the tensorrt_llm package"),
    ("neuronx", "the neuronx-distributed-inference package (AWS Neuron SDK) and an AWS "
                "Trainium or Inferentia2 device (/dev/neuron*)"),
    ("tnx", "neuronx-distributed-inference")])
def test_selecting_trtllm_or_neuronx_here_names_package_and_hardware(llama, name, needs):
    with pytest.raises(ConfigError, match="missing here") as e:
        choose_engine(llama, {"rolling_batch": name}, cuda=False)
    assert needs in str(e.value)


def test_vllm_without_its_interpreter_says_how_to_install_it(llama, monkeypatch):
    monkeypatch.setenv("LMC_VLLM_PYTHON", "/nonexistent/python")
    with pytest.raises(ConfigError, match=r"needs the vllm package .*LMC_VLLM_PYTHON="
                                          r"/nonexistent/python.*make install-vllm"):
        choose_engine(llama, {"rolling_batch": "vllm"}, cuda=False)


def test_vllm_options_reach_vllms_engine_arguments(llama):
    from engines.backends.requirements import vllm_python

    if vllm_python() is None:
        pytest.skip("no interpreter with vllm (make install-vllm)")
    choice = choose_engine(llama, {"rolling_batch": "vllm", "max_rolling_batch_size": "7",
                                   "max_model_len": "128", "enable_prefix_caching": "false",
                                   "dtype": "fp32", "quantize": "fp8"}, cuda=False)
    kw = choice.kwargs
    assert (kw["max_num_seqs"], kw["max_model_len"], kw["enable_prefix_caching"], kw["dtype"],
            kw["quantization"], kw["tensor_parallel_size"]) == (7, 128, False, "fp32", "fp8", 1)
    with pytest.raises(ConfigError, match=r"option.quantize='int3' is not one of awq"):
        choose_engine(llama, {"rolling_batch": "vllm", "quantize": "int3"}, cuda=False)


def test_choosing_among_engines_imports_none_of_them():
    """The registry, selection and these mappings import no engine's package (nor torch)."""
    import subprocess
    import sys

    code = ("import sys, engines.registry, engines.selection, engines.backends.params, "
            "engines.backends.requirements; "
            "heavy = [m for m in ('torch', 'vllm', 'tensorrt_llm', "
            "'neuronx_distributed_inference', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
