"""neuronx-distributed-inference (NxD Inference, the library AWS documents for LLM inference on
Trainium / Inferentia2) behind LMC's engine contract.

The model is compiled for a fixed batch size and sequence length (option.max_rolling_batch_size,
option.n_positions) on first load and kept under option.neuronx_compiled_path; each call is one
static batch through NxD's HuggingFaceGenerationAdapter (`generate`), sampled on device
(OnDeviceSamplingConfig, per-request top_k / top_p / temperature). Sampling parameters map
through engines/backends/params.py; what the on-device sampler lacks is a 400 there.
NOT RUN HERE: LMC's machines have no Neuron device; this follows AWS's NxD Inference docs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from engines.backends.params import neuronx_sampling_kwargs
from engines.contracts.engine import Capabilities
from engines.prompt import prompt_ids
from engines.tokenizing import TokenizerMixin
from engines.types import FinishReason, GenerateFromStream, SamplingParams, TokenEvent

_DTYPES = {"auto": "bfloat16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class NeuronXEngine(GenerateFromStream, TokenizerMixin):
    capabilities = Capabilities()  # one static batch per call, as the hf engine

    def __init__(self, model_dir: str, *, dtype: str = "auto", tp_degree: int = 1,
                 batch_size: int = 4, seq_len: int = 2048,
                 compiled_path: str | None = None) -> None:
        import torch
        from neuronx_distributed_inference.models.config import (NeuronConfig,
                                                                 OnDeviceSamplingConfig)
        from neuronx_distributed_inference.models.llama.modeling_llama import (
            LlamaInferenceConfig, NeuronLlamaForCausalLM)
        from neuronx_distributed_inference.utils.hf_adapter import (
            HuggingFaceGenerationAdapter, load_pretrained_config)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._init_tokens()
        neuron_config = NeuronConfig(
            tp_degree=tp_degree, batch_size=batch_size, max_context_length=seq_len,
            seq_len=seq_len, torch_dtype=getattr(torch, _DTYPES[dtype]),
            on_device_sampling_config=OnDeviceSamplingConfig(dynamic=True, do_sample=True))
        config = LlamaInferenceConfig(neuron_config,
                                      load_config=load_pretrained_config(model_dir))
        compiled = Path(compiled_path or os.path.join(model_dir, "neuronx-compiled"))
        model = NeuronLlamaForCausalLM(model_dir, config)
        if not (compiled / "model.pt").exists():
            model.compile(str(compiled))
        model.load(str(compiled))
        self._generator = HuggingFaceGenerationAdapter(model)
        self._torch = torch
        self.batch_size = batch_size
        self.max_context = seq_len
        self.vocab_size = config.vocab_size
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if eos is not None else [])

    def generate_stream(self, prompts: list[str | list[int]], params: list[SamplingParams],
                        adapters: list[str | None] | None = None) -> Iterator[list[TokenEvent]]:
        if adapters and any(adapters):
            raise ValueError("the neuronx engine serves no LoRA adapters here")
        ids = [prompt_ids(p, sp, encode=self.encode, vocab_size=self.vocab_size,
                          max_context=self.max_context) for p, sp in zip(prompts, params)]
        kwargs = [neuronx_sampling_kwargs(p) for p in params]
        return self._run(ids, params, kwargs)

    def _run(self, ids, params, kwargs) -> Iterator[list[TokenEvent]]:
        torch = self._torch
        for start in range(0, len(ids), self.batch_size):  # the compiled batch size
            rows = list(range(start, min(start + self.batch_size, len(ids))))
            width = max(len(ids[i]) for i in rows)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in rows])
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in rows])
            max_new = max(kwargs[i]["max_new_tokens"] for i in rows)
            sampling = torch.tensor([[kwargs[i]["top_k"], kwargs[i]["top_p"],
                                      kwargs[i]["temperature"]] for i in rows])
            out = self._generator.generate(input_ids, attention_mask=mask,
                                           max_new_tokens=max_new, sampling_params=sampling,
                                           do_sample=any(kwargs[i]["do_sample"] for i in rows))
            for row, i in enumerate(rows):
                yield self._events(i, out[row, width:].tolist(), params[i])

    def _events(self, i: int, generated: list[int], params: SamplingParams) -> list[TokenEvent]:
        """One request's tokens, cut at EOS / stop ids / stop strings / max_new_tokens."""
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos_token
                                                 else set(self.eos_token_ids))
        events, text, reason = [], "", FinishReason.LENGTH
        for n, tid in enumerate(generated[:params.max_new_tokens], start=1):
            events.append(TokenEvent(i, self._token(tid, None), ""))
            if n > params.min_new_tokens and tid in stop_ids:
                reason = FinishReason.EOS_TOKEN
                break
            text = self._decode([e.token.id for e in events])
            hit = [s for s in params.stop_sequences if s in text]
            if n > params.min_new_tokens and hit:
                text, reason = text[:min(text.index(s) for s in hit)], FinishReason.STOP_SEQUENCE
                break
        text = self._decode([e.token.id for e in events]) if reason is not \
            FinishReason.STOP_SEQUENCE else text
        last = events[-1]
        events[-1] = TokenEvent(i, last.token, text, (), reason)
        return events

    def follow(self) -> None:
        raise RuntimeError("NxD Inference shards the model itself; there is no follower")

    def shutdown(self) -> None:
        pass
