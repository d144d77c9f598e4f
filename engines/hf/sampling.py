"""Logits processing and token choice for one static batch, every row with its own parameters.

Order per row (the transformers convention, so results line up with `model.generate`):
repetition penalty (prompt + generated ids), presence/frequency penalties (generated ids), the
min_new_tokens mask on stop ids; then, for sampling rows only, temperature, top-k, top-p, min-p,
typical-p. Greedy rows take the argmax of the penalised logits. The reported log-prob of a token
is the log-softmax of exactly the row the token was chosen from.

Everything is batched over rows as [B, V] tensors; per-row state that no row needs (e.g. the
seen-token mask when nobody sets a repetition penalty) is never allocated, so plain greedy pays
for one log-softmax and one argmax.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from engines.types import SamplingParams

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class StepOutput:
    """Plain lists, one entry per row of the batch, so callers never touch tensors."""

    token_ids: list[int]
    log_probs: list[float]
    top: list[list[tuple[int, float]]]  # (id, log_prob) best first, top_n_tokens per row


class BatchSampler:
    """Holds the per-row sampling state of one batch across decode steps."""

    def __init__(
        self,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        stop_ids: list[frozenset[int]],
        *,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        assert len(params) == len(prompt_ids) == len(stop_ids)
        batch = len(params)
        self.top_n = [p.top_n_tokens for p in params]
        self.greedy = [p.greedy for p in params]  # a list: choosing rows needs no device sync

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [B, 1]

        self.repetition = column([p.repetition_penalty for p in params])
        self.presence = column([p.presence_penalty for p in params])
        self.frequency = column([p.frequency_penalty for p in params])
        self.min_new = torch.tensor([p.min_new_tokens for p in params], device=device)  # [B]
        self.generated = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.temperature = column([p.temperature if not p.greedy else 1.0 for p in params])
        self.top_k = torch.tensor([p.top_k for p in params], device=device)  # [B]
        self.top_p = column([p.top_p for p in params])
        self.min_p = column([p.min_p for p in params])
        self.typical_p = column([p.typical_p for p in params])

        # Seen-token mask for the repetition penalty, seeded with the prompt.
        self.seen: torch.Tensor | None = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen = torch.zeros((batch, vocab_size), dtype=torch.bool, device=device)
            for i, ids in enumerate(prompt_ids):
                self.seen[i, torch.tensor(ids, dtype=torch.long, device=device)] = True

        # Generated-token counts for the OpenAI-style penalties.
        self.counts: torch.Tensor | None = None
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self.counts = torch.zeros((batch, vocab_size), dtype=torch.float32, device=device)

        # Stop ids (EOS and stop_token_ids) are masked until a row has min_new_tokens tokens.
        self.stop_mask: torch.Tensor | None = None
        if any(p.min_new_tokens > 0 and ids for p, ids in zip(params, stop_ids)):
            self.stop_mask = torch.zeros((batch, vocab_size), dtype=torch.bool, device=device)
            for i, ids in enumerate(stop_ids):
                if ids:
                    self.stop_mask[i, torch.tensor(sorted(ids), device=device)] = True

        # Each sampling row draws from its own generator, so its tokens depend on its seed only,
        # not on which requests share the batch.
        self.generators: list[torch.Generator | None] = []
        for p in params:
            if p.greedy:
                self.generators.append(None)
                continue
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            self.generators.append(torch.Generator(device=device).manual_seed(seed))

    # ------------------------------------------------------------------------------------------

    def step(self, logits: torch.Tensor) -> StepOutput:
        """Choose one token per row. logits: [B, V] raw model output for the next position."""
        scores = self._penalise(logits.float())  # [B, V]
        chosen = scores.argmax(dim=-1)  # [B]; final for greedy rows

        sample_rows = [i for i, greedy in enumerate(self.greedy) if not greedy]
        if sample_rows:
            index = torch.tensor(sample_rows, device=scores.device)
            warped = self._warp(scores[index], index)  # [S, V]
            scores = scores.index_copy(0, index, warped)
        log_probs = scores.log_softmax(dim=-1)  # [B, V]
        for i in sample_rows:
            probs = log_probs[i].exp()  # [V]
            chosen[i] = torch.multinomial(probs, 1, generator=self.generators[i])[0]

        chosen_log_probs = log_probs.gather(1, chosen[:, None])[:, 0]  # [B]
        top: list[list[tuple[int, float]]] = [[] for _ in self.top_n]
        n_max = max(self.top_n)
        if n_max:
            values, ids = log_probs.topk(min(n_max, log_probs.shape[-1]), dim=-1)  # [B, N]
            for i, (row_values, row_ids) in enumerate(zip(values.tolist(), ids.tolist())):
                # Tokens a warper removed have log-prob -inf: not candidates, and not JSON.
                top[i] = [
                    (t, v) for t, v in zip(row_ids[: self.top_n[i]], row_values) if v != _NEG_INF
                ]

        self._record(chosen)
        return StepOutput(chosen.tolist(), chosen_log_probs.tolist(), top)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (batch positions), in this order: finished rows leave the batch."""
        index = torch.tensor(rows, device=self.generated.device)
        self.top_n = [self.top_n[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self.greedy = [self.greedy[i] for i in rows]
        for name in (
            "generated", "temperature", "top_k", "top_p", "min_p", "typical_p",
            "seen", "repetition", "counts", "presence", "frequency", "stop_mask", "min_new",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:  # the [B, V] state no row needed is None
                setattr(self, name, value[index])

    # ------------------------------------------------------------------------------------------

    def _penalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Penalties and the min_new_tokens mask. scores: [B, V] float32 -> [B, V]."""
        if self.seen is not None:
            # CTRL: shrink the logit of a seen token towards "less likely" whatever its sign.
            penalised = torch.where(
                scores > 0, scores / self.repetition, scores * self.repetition
            )  # [B, V]
            scores = torch.where(self.seen, penalised, scores)
        if self.counts is not None:
            scores = scores - self.presence * (self.counts > 0) - self.frequency * self.counts
        if self.stop_mask is not None:
            too_early = (self.generated < self.min_new)[:, None]  # [B, 1]
            scores = scores.masked_fill(self.stop_mask & too_early, _NEG_INF)
        return scores

    def _warp(self, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, typical-p for the sampling rows `index`.

        scores: [S, V] penalised logits of those rows. Each filter sets removed tokens to -inf
        and always leaves at least one token, so every row keeps a candidate.
        """
        scores = scores / self.temperature[index]  # [S, V]
        vocab = scores.shape[-1]

        top_k = self.top_k[index]  # [S]
        use_k = (top_k > 0) & (top_k < vocab)
        if use_k.any():
            k = top_k.clamp(1, vocab)
            kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [S, 1]
            scores = scores.masked_fill(use_k[:, None] & (scores < kth), _NEG_INF)

        top_p = self.top_p[index]  # [S, 1]
        if (top_p < 1).any():
            # Keep the smallest most-likely set whose mass reaches top_p: drop a token when the
            # tokens before it (in descending order) already reach top_p.
            drop = _mass_before(scores.softmax(dim=-1)) >= top_p
            scores = scores.masked_fill(drop & (top_p < 1), _NEG_INF)

        min_p = self.min_p[index]  # [S, 1]
        if (min_p > 0).any():
            probs = scores.softmax(dim=-1)  # [S, V]
            floor = min_p * probs.max(dim=-1, keepdim=True).values  # [S, 1]
            scores = scores.masked_fill(probs < floor, _NEG_INF)

        typical_p = self.typical_p[index]  # [S, 1]
        if (typical_p < 1).any():
            # Locally typical sampling: rank tokens by how far their surprisal is from the
            # distribution's entropy, keep the closest ones until they hold typical_p of the mass.
            log_probs = scores.log_softmax(dim=-1)  # [S, V]
            probs = log_probs.exp()
            entropy = -(probs * log_probs).nan_to_num().sum(dim=-1, keepdim=True)  # [S, 1]
            distance = (-log_probs - entropy).abs()  # [S, V]; inf for removed tokens
            order = distance.argsort(dim=-1)  # [S, V]
            sorted_probs = probs.gather(1, order)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V]
            drop_sorted = before >= typical_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            scores = scores.masked_fill(drop & (typical_p < 1), _NEG_INF)
        return scores

    def _record(self, chosen: torch.Tensor) -> None:
        """Update the per-row history with this step's tokens. chosen: [B] long."""
        self.generated += 1
        if self.seen is not None:
            self.seen.scatter_(1, chosen[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(
                1, chosen[:, None], torch.ones_like(chosen[:, None], dtype=torch.float32)
            )


def _mass_before(probs: torch.Tensor) -> torch.Tensor:
    """For each token, the mass of the more likely tokens (ties in sort order). probs: [S, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V]
    return torch.empty_like(before).scatter(1, order, before)
