"""LMC's SamplingParams as each external engine's own sampling arguments: plain functions from a
frozen SamplingParams to a dict of keyword arguments, so they are unit-tested without the
engines. A parameter an engine cannot honour raises ValidationError naming it (a 400), never a
silent drop.

Each engine's arguments, from its documented sampling class:
    vllm     vllm.SamplingParams (0.32)
    trtllm   tensorrt_llm.SamplingParams (LLM API, PyTorch backend)
    neuronx  neuronx_distributed_inference's on-device sampling: do_sample, top_k, top_p,
             temperature per request (OnDeviceSamplingConfig / prepare_sampling_params);
             HF generate arguments for the rest
"""

from __future__ import annotations

from typing import Any

from engines.types import SamplingParams, ValidationError

_DEFAULTS = SamplingParams()


def _unsupported(params: SamplingParams, engine: str, names: tuple[str, ...]) -> None:
    """ValidationError for the first parameter in `names` set to other than its default."""
    for name in names:
        if getattr(params, name) != getattr(_DEFAULTS, name):
            raise ValidationError(
                name, f"{name}={getattr(params, name)!r} is not supported by the {engine} "
                      f"engine; leave it unset or serve this model with option.rolling_batch="
                      f"native or disable")


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vllm.SamplingParams(**kwargs) for one sample of one prompt (LMC fans n / best_of out
    into separate requests before the engine, so n is always 1 here)."""
    _unsupported(params, "vllm", ("typical_p",))
    kw: dict[str, Any] = dict(
        max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
        # vLLM is greedy at temperature 0; LMC's do_sample=false means greedy whatever the rest.
        temperature=params.temperature if not params.greedy else 0.0,
        top_k=params.top_k if not params.greedy else 0,
        top_p=params.top_p if not params.greedy else 1.0,
        min_p=params.min_p if not params.greedy else 0.0,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        seed=params.seed, stop=list(params.stop_sequences),
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos_token,
        # The sampled token's log-prob always (logprobs=0), plus the top n when asked.
        logprobs=params.top_n_tokens,
        prompt_logprobs=0 if params.decoder_input_details else None,
        skip_special_tokens=True, include_stop_str_in_output=False)
    return kw


def trtllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """tensorrt_llm.SamplingParams(**kwargs). Its PyTorch backend samples with top_k, top_p,
    min_p, temperature, the three penalties and a per-request seed, stops on `stop` strings and
    `stop_token_ids`, and returns generation and prompt log-probs."""
    _unsupported(params, "trtllm", ("typical_p",))
    kw: dict[str, Any] = dict(
        max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens or None,
        temperature=params.temperature if not params.greedy else 0.0,
        top_k=params.top_k if not params.greedy and params.top_k else None,
        top_p=params.top_p if not params.greedy and params.top_p < 1 else None,
        min_p=params.min_p if not params.greedy and params.min_p else None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
        seed=params.seed, stop=list(params.stop_sequences) or None,
        stop_token_ids=list(params.stop_token_ids) or None, ignore_eos=params.ignore_eos_token,
        logprobs=params.top_n_tokens or 1,  # 1: the sampled token's own log-prob
        prompt_logprobs=1 if params.decoder_input_details else None,
        include_stop_str_in_output=False, detokenize=True, n=1)
    return {k: v for k, v in kw.items() if v is not None}


def neuronx_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """The per-request sampling of neuronx-distributed-inference's on-device sampler
    (`prepare_sampling_params(batch_size, top_k, top_p, temperature)` rows) plus the HF
    `generate` arguments its HuggingFaceGenerationAdapter reads. Its on-device sampler has no
    penalties, min-p or per-request seed, and returns no log-probs: those are a 400."""
    greedy = params.greedy
    # Greedy decoding reads none of the sampling knobs, so they are not refused then.
    sampling_only = () if greedy else ("typical_p", "min_p", "seed")
    _unsupported(params, "neuronx", (
        *sampling_only, "repetition_penalty", "presence_penalty", "frequency_penalty",
        "top_n_tokens", "decoder_input_details"))
    return dict(
        do_sample=not greedy,
        top_k=1 if greedy else (params.top_k or 0),  # 1 is the sampler's greedy
        top_p=1.0 if greedy else params.top_p,
        temperature=1.0 if greedy else params.temperature,
        max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
        stop_strings=list(params.stop_sequences),
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos_token)
