"""The `hf` engine: any transformers causal LM, one static batch per call.

Requests in a call run as one left-padded batch; each row keeps its own sampling parameters and
its own seeded generator, so one request's result does not depend on what it was batched with
(up to float noise from padding). The decode loop is ours rather than `model.generate` so that
per-request seeds, per-request lengths and (later) streaming and log-probs need no global RNG
state or generate() hooks; greedy output still equals `model.generate` token for token.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.types import FinishReason, GenerationResult, SamplingParams

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", *_DTYPES)

# Tokenizers without a real limit report this sentinel (int(1e30)) as model_max_length.
_NO_TOKENIZER_LIMIT = 10**9


@dataclass(slots=True)
class _Row:
    """One request's decode state inside a batch."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens, clipped so prompt + output fits the context
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: str | None = None  # set when a stop sequence cut the text


class HFEngine:
    """Loads a local HF model dir (safetensors) with transformers and generates in batches."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", device: str | None = None) -> None:
        # Models come from local dirs only; a hub lookup would hang without network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a model dir: it has no config.json")

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self._resolve_dtype(path, dtype), local_files_only=True
        ).to(self.device)
        self.model.eval()
        self.dtype: torch.dtype = self.model.dtype

        self.eos_token_ids = self._eos_token_ids()
        # Padding only fills masked slots, so any id works; EOS is the usual choice when the
        # tokenizer has no pad token.
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)

    # ------------------------------------------------------------------------------------------
    # Public helpers
    # ------------------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if tokenizer_limit is not None and tokenizer_limit < _NO_TOKENIZER_LIMIT:
            limits.append(tokenizer_limit)
        known = [limit for limit in limits if limit]
        assert known, "the model config has no max_position_embeddings"
        return min(known)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render chat messages to the prompt text the model was trained on."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send plain text inputs")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as `generate` sees them."""
        # A chat template already writes the BOS token as text; adding it again would give the
        # model a doubled BOS it never saw in training.
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]

    def count_tokens(self, prompt: str) -> int:
        return len(self.encode(prompt))

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], params: list[SamplingParams]
    ) -> list[GenerationResult]:
        """Generate for all prompts as one batch; results in the order of `prompts`."""
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        rows = [self._new_row(prompt, p) for prompt, p in zip(prompts, params)]

        input_ids, attention_mask = self._left_pad([row.prompt_ids for row in rows])
        # Positions count real tokens only, so a left-padded row sees the same positions as it
        # would alone; pad slots get 0 (any value works, they are masked).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        logits, cache = self._forward(input_ids, attention_mask, position_ids, cache=None)

        while True:
            next_ids = self._sample(logits, rows)  # [B]
            if self._append(rows, next_ids.tolist()):
                break
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1
            )  # [B, S + step]
            position_ids = position_ids[:, -1:] + 1  # [B, 1]
            logits, cache = self._forward(
                next_ids[:, None], attention_mask, position_ids, cache=cache
            )

        return [self._result(row) for row in rows]

    def _new_row(self, prompt: str, params: SamplingParams) -> _Row:
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds "
                f"{self.max_context}; shorten the input"
            )
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return _Row(
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=min(params.max_new_tokens, room),
            generator=generator,
        )

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full(
            (len(sequences), width), self.pad_token_id, dtype=torch.long
        )  # [B, S]
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, S]
        for i, ids in enumerate(sequences):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, S_past + T]
        position_ids: torch.Tensor,  # [B, T]
        *,
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position is sampled; skips a [B, S, V] matmul
        )
        return out.logits[:, -1, :].float(), out.past_key_values  # [B, V]

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token per row. logits: [B, V] float32 -> [B] long."""
        next_ids = logits.argmax(dim=-1)  # [B]; right for every greedy row
        for i, row in enumerate(rows):
            if row.finish_reason is None and not row.params.greedy:
                next_ids[i] = _sample_one(logits[i], row.params, row.generator)
        return next_ids

    def _append(self, rows: list[_Row], next_ids: list[int]) -> bool:
        """Record each live row's new token; return True when every row has finished."""
        for row, token_id in zip(rows, next_ids):
            if row.finish_reason is not None:
                continue  # finished rows keep decoding padding-like tokens until the batch ends
            row.output_ids.append(token_id)
            if token_id in self.eos_token_ids:
                row.finish_reason = FinishReason.EOS_TOKEN
            elif row.params.stop_sequences and self._hit_stop_sequence(row):
                row.finish_reason = FinishReason.STOP_SEQUENCE
            elif len(row.output_ids) >= row.max_new_tokens:
                row.finish_reason = FinishReason.LENGTH
        return all(row.finish_reason is not None for row in rows)

    def _hit_stop_sequence(self, row: _Row) -> bool:
        # Decoding the whole output each step is quadratic, but outputs here are short; stop
        # strings may span tokens, so checking the new token's text alone would miss them.
        text = self._decode(row.output_ids)
        hits = [(text.find(s), s) for s in row.params.stop_sequences if s in text]
        if not hits:
            return False
        start, stop = min(hits)
        row.text = text[: start + len(stop)]
        return True

    def _result(self, row: _Row) -> GenerationResult:
        assert row.finish_reason is not None
        return GenerationResult(
            text=row.text if row.text is not None else self._decode(row.output_ids),
            token_ids=list(row.output_ids),
            finish_reason=row.finish_reason,
            prompt_tokens=len(row.prompt_ids),
        )

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------

    def _resolve_dtype(self, path: Path, dtype: str) -> torch.dtype | str:
        if dtype != "auto":
            return _DTYPES[dtype]
        if self.device.type == "cpu":
            # Half precision is slow and partly unsupported on CPU; fp32 is the safe default.
            return torch.float32
        return "auto"  # the checkpoint's own dtype

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        for source in (generation_config, self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def _sample_one(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Temperature, then top-k, then top-p (nucleus) sampling. logits: [V] float32."""
    scaled = logits / params.temperature  # [V]
    sorted_logits, sorted_ids = scaled.sort(descending=True)  # [V], [V]
    if 0 < params.top_k < sorted_logits.numel():
        sorted_logits = sorted_logits[: params.top_k]  # [K]
        sorted_ids = sorted_ids[: params.top_k]
    probs = sorted_logits.softmax(dim=-1)  # [K]
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p; the top token always survives
        # because the mass before it is 0.
        mass_before = probs.cumsum(dim=-1) - probs  # [K]
        probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)  # [1]
    return int(sorted_ids[choice].item())
