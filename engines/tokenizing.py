"""The tokenizer side every engine shares: prompt encoding, chat templates, token texts.

A mixin over `self.tokenizer` (a transformers tokenizer), so the engines encode, render chats
and name tokens identically, and their outputs can be compared token for token.
"""

from __future__ import annotations

from typing import Any

from engines.types import Token


class TokenizerMixin:
    tokenizer: Any

    def _init_tokens(self) -> None:
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._token_texts: dict[int, str] = {}

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True) -> str:
        """Render chat messages to the prompt text the model was trained on."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send plain text inputs")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as generation sees them."""
        # A chat template already writes the BOS token as text; adding it again would give the
        # model a doubled BOS it never saw in training.
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]

    def count_tokens(self, prompt: str) -> int:
        return len(self.encode(prompt))

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _token(self, token_id: int, log_prob: float | None) -> Token:
        text = self._token_texts.get(token_id)
        if text is None:
            # The token alone, special tokens included: it is what `tokens[].text` shows, while
            # the output text skips special tokens.
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return Token(token_id, text, log_prob, special=token_id in self._special_ids)
