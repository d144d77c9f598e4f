"""Turning a request's prompt into checked token ids: shared by every engine, so they reject
the same inputs with the same messages."""

from __future__ import annotations

from collections.abc import Callable

from engines.types import SamplingParams, ValidationError


def prompt_ids(prompt: str | list[int], params: SamplingParams, *,
               encode: Callable[[str], list[int]], vocab_size: int, max_context: int) -> list[int]:
    """Token ids of `prompt` (a string, or ids already), raising ValidationError for what a
    client can fix: an empty prompt, ids outside the vocabulary, a prompt that fills the
    context, stop_token_ids outside the vocabulary."""
    if isinstance(prompt, str):
        ids = encode(prompt)
    else:
        if not isinstance(prompt, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                for t in prompt):
            raise ValidationError(
                "inputs", f"a token-id prompt must be a list of integers in [0, {vocab_size})")
        ids = list(prompt)
    if not ids:
        raise ValidationError("inputs", "the prompt is empty after tokenization")
    if len(ids) >= max_context:
        raise ValidationError(
            "inputs", f"the prompt has {len(ids)} tokens but the model's context holds "
                      f"{max_context}; shorten the input")
    outside = [t for t in params.stop_token_ids if t >= vocab_size]
    if outside:
        raise ValidationError(
            "stop_token_ids", f"stop_token_ids {outside} are not in the model's vocabulary of "
                              f"{vocab_size} ids")
    return ids
