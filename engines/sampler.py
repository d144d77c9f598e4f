"""Logits processing and token choice, one row per request, rows changing every step.

Order per row (the transformers convention, so results line up with `model.generate`):
repetition penalty (prompt + generated ids), presence/frequency penalties (generated ids), the
min_new_tokens mask on stop ids; then, for sampling rows only, temperature, top-k, top-p, min-p,
typical-p. Greedy rows take the argmax of the penalised logits. The reported log-prob of a token
is the log-softmax of exactly the row the token was chosen from.

Per-request state (RowState: its generator, seen/count vectors) lives with the request, so a
continuous-batching engine can sample any set of requests each step; each request's random
stream depends on its seed only, never on which requests share the step.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from engines.types import SamplingParams

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class StepOutput:
    """Plain lists, one entry per row, so callers never touch tensors."""

    token_ids: list[int]
    log_probs: list[float]
    top: list[list[tuple[int, float]]]  # (id, log_prob) best first, top_n_tokens per row


class RowState:
    """What sampling needs to remember about one request across steps."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: frozenset[int],
                 *, device: torch.device) -> None:
        self.params = params
        self.stop_ids = stop_ids
        self.prompt_ids = prompt_ids
        self.device = device
        self.generated = 0
        self.greedy = params.greedy
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.needs_seen = params.repetition_penalty != 1.0
        self.needs_counts = bool(params.presence_penalty or params.frequency_penalty)
        self.seen: torch.Tensor | None = None  # [V] bool, allocated at the first step
        self.counts: torch.Tensor | None = None  # [V] float32

    @property
    def simple(self) -> bool:
        """Greedy with nothing to adjust: the fast path."""
        p = self.params
        return (self.greedy and not self.needs_seen and not self.needs_counts
                and not (p.min_new_tokens and self.stop_ids) and not p.top_n_tokens)

    def _ensure_state(self, vocab: int) -> None:
        if self.needs_seen and self.seen is None:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            if self.prompt_ids:
                self.seen[torch.tensor(self.prompt_ids, device=self.device)] = True
        if self.needs_counts and self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)

    def record(self, token_id: int) -> None:
        self.generated += 1
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1


def sample_rows(logits: torch.Tensor, rows: list[RowState]) -> StepOutput:
    """Choose one token per row and update each row's state. logits: [N, V] raw model output."""
    if all(r.simple for r in rows):
        log_probs = logits.float().log_softmax(dim=-1)  # [N, V]
        chosen = log_probs.argmax(dim=-1)  # [N]
        lp = log_probs.gather(1, chosen[:, None])[:, 0]
        ids = chosen.tolist()
        for r, t in zip(rows, ids):
            r.generated += 1
        return StepOutput(ids, lp.tolist(), [[] for _ in rows])

    device = logits.device
    vocab = logits.shape[-1]
    for r in rows:
        r._ensure_state(vocab)
    scores = _penalise(logits.float(), rows)  # [N, V]
    chosen = scores.argmax(dim=-1)  # [N]; final for greedy rows
    sample_idx = [i for i, r in enumerate(rows) if not r.greedy]
    if sample_idx:
        index = torch.tensor(sample_idx, device=device)
        warped = _warp(scores[index], [rows[i].params for i in sample_idx])
        scores = scores.index_copy(0, index, warped)
    log_probs = scores.log_softmax(dim=-1)  # [N, V]
    for i in sample_idx:
        probs = log_probs[i].exp()  # [V]
        chosen[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
    chosen_lp = log_probs.gather(1, chosen[:, None])[:, 0]  # [N]

    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    n_max = max(r.params.top_n_tokens for r in rows)
    if n_max:
        values, ids = log_probs.topk(min(n_max, vocab), dim=-1)  # [N, n]
        for i, (vs, ts) in enumerate(zip(values.tolist(), ids.tolist())):
            n = rows[i].params.top_n_tokens
            # Tokens a warper removed have log-prob -inf: not candidates, and not JSON.
            top[i] = [(t, v) for t, v in zip(ts[:n], vs[:n]) if v != _NEG_INF]
    token_ids = chosen.tolist()
    for r, t in zip(rows, token_ids):
        r.record(t)
    return StepOutput(token_ids, chosen_lp.tolist(), top)


def _column(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [N, 1]


def _penalise(scores: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Penalties and the min_new_tokens mask. scores: [N, V] float32."""
    device = scores.device
    if any(r.seen is not None for r in rows):
        seen = torch.stack([r.seen if r.seen is not None
                            else torch.zeros(scores.shape[-1], dtype=torch.bool, device=device)
                            for r in rows])  # [N, V]
        rep = _column([r.params.repetition_penalty for r in rows], device)
        # CTRL: shrink the logit of a seen token towards "less likely" whatever its sign.
        penalised = torch.where(scores > 0, scores / rep, scores * rep)
        scores = torch.where(seen, penalised, scores)
    if any(r.counts is not None for r in rows):
        counts = torch.stack([r.counts if r.counts is not None
                              else torch.zeros(scores.shape[-1], device=device)
                              for r in rows])  # [N, V]
        presence = _column([r.params.presence_penalty for r in rows], device)
        frequency = _column([r.params.frequency_penalty for r in rows], device)
        scores = scores - (presence * (counts > 0) + frequency * counts)
    blocked = [(i, t) for i, r in enumerate(rows)
               if r.stop_ids and r.generated < r.params.min_new_tokens for t in r.stop_ids]
    if blocked:
        # Out of place: for fp32 logits `scores` is still the caller's tensor (`.float()` is a
        # no-op), an inference-mode tensor that must not be written to here.
        mask = torch.zeros_like(scores, dtype=torch.bool)  # [N, V]
        rows_i, ids = zip(*blocked)
        mask[list(rows_i), list(ids)] = True
        scores = scores.masked_fill(mask, _NEG_INF)
    return scores


def _warp(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, typical-p for sampling rows. scores: [S, V] penalised
    logits. Each filter sets removed tokens to -inf and always leaves at least one token."""
    device = scores.device
    # A positive temperature below 1e-5 is greedy in effect (as vLLM treats it); dividing by
    # it as given could overflow float32 logits to inf.
    scores = scores / _column([p.temperature for p in params], device).clamp_min(1e-5)
    vocab = scores.shape[-1]

    top_k = torch.tensor([p.top_k for p in params], device=device)  # [S]
    use_k = (top_k > 0) & (top_k < vocab)
    if use_k.any():
        k = top_k.clamp(1, vocab)
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [S, 1]
        scores = scores.masked_fill(use_k[:, None] & (scores < kth), _NEG_INF)

    # A top_p too small for float32 (5e-324) still keeps the most likely token.
    top_p = _column([p.top_p for p in params], device).clamp_min(torch.finfo(torch.float32).tiny)
    if (top_p < 1).any():
        # Keep the smallest most-likely set whose mass reaches top_p: drop a token when the
        # tokens before it (in descending order) already reach top_p.
        drop = _mass_before(scores.softmax(dim=-1)) >= top_p
        scores = scores.masked_fill(drop & (top_p < 1), _NEG_INF)

    min_p = _column([p.min_p for p in params], device)  # [S, 1]
    if (min_p > 0).any():
        probs = scores.softmax(dim=-1)  # [S, V]
        floor = min_p * probs.max(dim=-1, keepdim=True).values  # [S, 1]
        scores = scores.masked_fill(probs < floor, _NEG_INF)

    typical_p = _column([p.typical_p for p in params], device)  # [S, 1]
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


def _mass_before(probs: torch.Tensor) -> torch.Tensor:
    """For each token, the mass of the more likely tokens (ties in sort order). probs: [S, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [S, V]
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V]
    return torch.empty_like(before).scatter(1, order, before)
