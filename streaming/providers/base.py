"""The values a provider yields, its error, and the interface the engine relies on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Reasoning text the upstream streams apart from the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The model declines to answer (OpenAI's `delta.refusal`, under structured outputs): text
    in place of the answer's, a `refusal` event."""

    text: str


@dataclass(frozen=True, slots=True)
class Status:
    """A progress hint (`stage`: "thinking", "searching", ...), a `status` event: no token."""

    stage: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The answer is whole: the last chunk of a reply that did not fail. The engine ends the
    answer on it, and keeps iterating only to let the reply read the end of its body."""

    reason: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of the tool call number `index` of the answer (OpenAI's `delta.tool_calls[]`):
    `id` and `name` come on a call's first fragment only; `arguments` is a piece of the JSON text
    of its arguments, cut anywhere (mid-token too)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The log probabilities of the answer text yielded just before: OpenAI's `logprobs.content`
    entries (`token`, `logprob`, `bytes`, `top_logprobs`), a `logprobs` event."""

    content: list


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """Another choice than the answer (`n` > 1; the answer is choice 0): some of its text, the log
    probabilities of that text, or its finish reason, a `choice` event. Only choice 0 is saved as
    the conversation's turn."""

    index: int
    text: str = ""
    logprobs: list | None = None
    finish_reason: str | None = None


# A plain `str` is answer text: the common case stays the cheapest.
Chunk = str | Reasoning | Refusal | Usage | Finish | Status | ToolCallDelta | Logprobs | ChoiceDelta


class ProviderError(Exception):
    """A failure with a stable code and a message safe to show a client (no keys, no raw bodies).

    `status` is the HTTP status to answer with when the stream has not started yet."""

    def __init__(self, code: str, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Reply(Protocol):
    def __iter__(self) -> Iterator[Chunk]: ...

    def close(self) -> None:
        """Stop soon and release the upstream; safe to call from another thread, and twice."""


class Provider(Protocol):
    name: str
    default_model: str
    # The optional request fields it honours (`stop`, `n`, `logprobs`, ...; see
    # docs/openai-compatibility.md), which reach `stream()` in `params`; a request with another is
    # refused with a 400 naming it. A provider without `options` honours none of them.
    options: frozenset[str]

    def models(self) -> list[str]: ...

    def accepts(self, model: str) -> bool:
        """Whether a request may name `model`; one it may not is refused before anything is stored."""

    def stream(self, messages: list[dict], params: dict) -> Reply:
        """Start an answer. Raises ProviderError when the upstream refuses before any token."""
