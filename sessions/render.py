"""Incremental rendering: each appended item becomes a token delta under the model's chat
template; the past is never re-rendered (re-rendering can tokenize history differently and silently
destroy prefix reuse).

A delta is the template's text for ``anchor + [item]`` minus its text for ``anchor``, where the
anchor is a fixed one-message conversation; the first item of a session is rendered whole, so
templates that add something at the start (a default system prompt) do so exactly once.
"""
from __future__ import annotations

from typing import Any, Protocol

Message = dict[str, Any]


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[Message], **kwargs: Any) -> Any: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class IncrementalRenderer:
    ANCHOR: list[Message] = [{"role": "system", "content": "§"}]

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tok = tokenizer
        self._anchor = self._text(self.ANCHOR)
        gen = self._text(self.ANCHOR, add_generation_prompt=True)
        if not gen.startswith(self._anchor):
            raise ValueError("the chat template re-renders earlier messages; incremental rendering needs a prefix-stable template")
        self.generation_prompt_text = gen[len(self._anchor) :]
        # How the template closes an assistant turn: the text after the message content.
        marker = "¤"
        closed = self._delta_text({"role": "assistant", "content": marker})
        self.turn_close_text = closed[closed.index(marker) + len(marker) :]
        self.generation_prompt = self._encode(self.generation_prompt_text)

    def _text(self, messages: list[Message], add_generation_prompt: bool = False, tools: list[Any] | None = None) -> str:
        return str(self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                add_generation_prompt=add_generation_prompt))

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def _delta_text(self, message: Message) -> str:
        full = self._text(self.ANCHOR + [message])
        if not full.startswith(self._anchor):
            raise ValueError("the chat template re-renders earlier messages; incremental rendering needs a prefix-stable template")
        return full[len(self._anchor) :]

    def first(self, messages: list[Message], tools: list[Any] | None = None) -> list[int]:
        """Tokens of a session's opening messages (instructions and first item), rendered whole."""
        return self._encode(self._text(messages, tools=tools))

    def delta(self, message: Message) -> list[int]:
        """Tokens that append `message` to a conversation already rendered."""
        return self._encode(self._delta_text(message))

    def close_turn(self, generated: list[int], eos_ids: frozenset[int]) -> list[int]:
        """Tokens that close an assistant turn the way the template does. If generation stopped on
        the end-of-turn token itself, only what the template puts after it is added."""
        close = self._encode(self.turn_close_text)
        if generated and generated[-1] in eos_ids and close and close[0] == generated[-1]:
            return close[1:]
        return close
