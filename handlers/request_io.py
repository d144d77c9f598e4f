"""Per-request records a rolling-batch handler fills in while it generates (LMI's `request_io`).

A `TextGenerationOutput` holds one `Sequence` per generated candidate; each sequence is a list of
`Token`s plus a read cursor, so an output formatter can pull the tokens added since it last ran
(`has_next_token` / `get_next_token`) and learn which one is the first and which the last.

Pure Python: no torch, no numpy, so a front end or a formatter can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class Token:
    """One generated (or prompt) token: its id, its decoded text and, when known, its log prob."""

    def __init__(self, id: int, text: str, log_prob: Optional[float] = None,
                 special_token: Optional[bool] = None, error_msg: Optional[str] = None):
        self.id = id
        self.text = text
        self.log_prob = log_prob
        self.special_token = special_token
        self.request_id = None
        self.error_msg = error_msg

    def as_dict(self) -> dict:
        """LMI's token shape: id, text, log_prob; special_token / error_msg only when set."""
        out: dict = {"id": self.id, "text": self.text, "log_prob": self.log_prob}
        if self.special_token:
            out["special_token"] = self.special_token
        if self.error_msg:
            out["error_msg"] = self.error_msg
        return out

    def as_tgi_dict(self) -> dict:
        """TGI's token shape: id, text, logprob; special only when set."""
        out: dict = {"id": self.id, "text": self.text, "logprob": self.log_prob}
        if self.special_token:
            out["special"] = self.special_token
        return out

    def __repr__(self) -> str:
        return f"Token({self.as_dict()})"


class Iterator:
    """A read cursor over a growing list: `next_index` hands out 0, 1, 2, ... in turn."""

    def __init__(self):
        self._index = 0

    def get_index(self) -> int:
        return self._index

    def next_index(self) -> int:
        current = self._index
        self._index = current + 1
        return current

    def __repr__(self) -> str:
        return f"Iterator(_index={self._index})"


@dataclass
class Sequence:
    """The tokens generated so far for one candidate, with its top tokens and finish state."""

    tokens: list[Token] = field(default_factory=list)
    top_tokens: Optional[list[list[Token]]] = field(default_factory=list)
    cumulative_log_prob: float = 0.0
    finish_reason: Optional[str] = None
    _last_token_index: Optional[int] = None
    stop_reason: Optional[str] = None
    _tokens_iterator: Optional[Iterator] = field(init=False, default=None)
    _top_tokens_iterator: Optional[Iterator] = field(init=False, default=None)

    def __post_init__(self):
        self._tokens_iterator = Iterator()
        self._top_tokens_iterator = Iterator()

    def set_next_token(self, token: Token, is_last_token: bool = False) -> None:
        self.tokens.append(token)
        if is_last_token:
            self._last_token_index = len(self.tokens) - 1

    def set_next_top_tokens(self, top_tokens: list[Token]) -> None:
        self.top_tokens.append(top_tokens)

    def has_next_token(self) -> bool:
        return self._tokens_iterator.get_index() < len(self.tokens)

    def has_next_top_tokens(self) -> bool:
        return self._top_tokens_iterator.get_index() < len(self.top_tokens)

    def get_next_token(self) -> tuple[Optional[Token], int, bool, bool]:
        """(token, index, is_first, is_last) for the next unread token; (None, 0, False, False)
        when every token has been read."""
        if not self.has_next_token():
            return None, 0, False, False
        i = self._tokens_iterator.next_index()
        return self.tokens[i], i, i == 0, i == self._last_token_index

    def get_last_token(self) -> Optional[Token]:
        """The token marked last, or None while the sequence is still open."""
        if self._last_token_index is None:
            return None
        return self.tokens[self._last_token_index]

    def get_next_top_tokens(self) -> Optional[list[Token]]:
        """The next unread list of top tokens, or None when all have been read."""
        if not self.has_next_top_tokens():
            return None
        return self.top_tokens[self._top_tokens_iterator.next_index()]


@dataclass
class RequestInput:
    """What every request carries: its ids, its output formatter (callable or a name such as
    "json" / "jsonlines"), the client's parameters and the parameters the server derived."""

    request_id: Optional[int] = None
    client_request_id: Optional[str] = None
    output_formatter: Union[Callable, str, None] = None
    parameters: dict = field(default_factory=dict)
    server_parameters: dict = field(default_factory=dict)
    tgi_compat: bool = False


@dataclass
class TextInput(RequestInput):
    """A text-generation request: the prompt (or prompts), the adapter(s) and the tokenizer."""

    input_text: Union[str, list[str], None] = None
    adapters: Optional[Any] = None
    tokenizer: Optional[Any] = None


@dataclass
class RequestOutput:
    """What every request output carries: the request's id, its input, and whether it is done."""

    request_id: int
    input: RequestInput
    finished: bool = False


def _token_dicts(tokens, tgi: bool) -> list[dict]:
    return [t.as_tgi_dict() if tgi else t.as_dict() for t in tokens]


@dataclass
class TextGenerationOutput(RequestOutput):
    """A text-generation output: sequences by index (more than one with beam search / best_of),
    the index of the best one, the prompt's token details, and the other indices to return."""

    sequences: dict[int, Sequence] = field(default_factory=dict)
    best_sequence_index: int = 0
    prompt_tokens_details: list[Token] = field(default_factory=list)
    other_sequences_indices: list[int] = field(default_factory=list)

    def __post_init__(self):
        # The best sequence always exists, empty until tokens arrive.
        self.sequences[self.best_sequence_index] = Sequence()

    def set_next_token(self, token: Token, sequence_index: int = 0, is_last_token: bool = False,
                       finish_reason: Optional[str] = None) -> None:
        """Append a token to sequence `sequence_index` (created on first use)."""
        seq = self.sequences.setdefault(sequence_index, Sequence())
        seq.set_next_token(token, is_last_token)
        if finish_reason:
            seq.finish_reason = finish_reason

    def set_next_top_tokens(self, top_tokens: list[Token], sequence_index: int) -> None:
        self.sequences[sequence_index].top_tokens.append(top_tokens)

    def set_best_sequence_index(self, sequence_index: int) -> None:
        self.best_sequence_index = sequence_index

    def set_finish_reason(self, finish_reason: str, sequence_index: int = 0) -> None:
        self.sequences[sequence_index].finish_reason = finish_reason

    def get_tokens_as_dict(self, sequence_index: int = 0) -> list[dict]:
        """The sequence's tokens as dicts (TGI's shape when the input asked for TGI compat)."""
        return _token_dicts(self.sequences[sequence_index].tokens, self.input.tgi_compat)

    def get_prompt_tokens_as_dict(self) -> list[dict]:
        return _token_dicts(self.prompt_tokens_details, self.input.tgi_compat)

    def get_top_tokens_as_dict(self, sequence_index: int = 0) -> list[list[dict]]:
        return [_token_dicts(group, self.input.tgi_compat)
                for group in self.sequences[sequence_index].top_tokens]


__all__ = ["Iterator", "RequestInput", "RequestOutput", "Sequence", "TextGenerationOutput",
           "TextInput", "Token"]
