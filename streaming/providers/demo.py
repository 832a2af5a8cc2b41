"""The embedded default model: offline, deterministic, with a configurable pace and faults.

Its answer says which turn of the conversation it is and quotes the prompt verbatim, so any text
can be pushed through every framing and compared on the way out; given a system prompt, it says
that it follows it, quoting its start, so that a user can see it was sent.

Offered tools, it calls those whose names the prompt holds (`tool_choice` "required" or naming a
function forces a call, "none" forbids them; one call only when `parallel_tool_calls` is false),
with arguments made from each function's JSON Schema (`schema_sample`), streamed in fragments cut
every few characters, mid-token, as OpenAI's are. Given the tools' results, it quotes each.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections.abc import Iterator

from ..config import Settings
from .base import Chunk, Finish, ProviderError, ToolCallDelta, Usage
from .demo_options import OPTIONS, Choices, shaped
from .schema_sample import sample

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# A token is a run of white space, or white space and then one CJK character or one word.
# The pieces always join back to the text: nothing is dropped or split inside a character.
_TOKEN = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)|\s+")
_CJK_CHAR = re.compile(f"[{_CJK}]")
# The filler tokens, made once: a copy per answer was 1.7 KB of every open stream.
_WORDS = tuple(" " + word for word in (
    "streaming tokens flow from the model through the engine to the socket as soon as they "
    "exist and every reader tails the same log so nothing waits for the whole answer"
).split())
_HANZI = tuple("流式输出让用户立刻看到回答的每一个字而不必等待全部生成完成")
_SYSTEM_QUOTE_CHARS = 80  # of a system prompt, up to 32,000 characters long
_SHORT_PAUSE_S = 0.05  # pauses up to this long sleep; longer ones wait on close()
_FRAGMENT_CHARS = 6  # of a tool call's arguments, a fragment each


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


class DemoProvider:
    name = "demo"
    options = frozenset({"tools", "tool_choice", "parallel_tool_calls"}) | OPTIONS  # see `tool_calls()`, `demo_options`

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_model = settings.llm_model or "demo"
        extra = (name.strip() for name in settings.demo_models.split(","))
        self.names = list(dict.fromkeys([self.default_model, *filter(None, extra)]))

    def models(self) -> list[str]:
        return self.names

    def accepts(self, model: str) -> bool:
        return model in self.names

    def stream(self, messages: list[dict], params: dict) -> DemoReply:
        return DemoReply(self.settings, messages, params.get("max_tokens"), params)


class DemoReply:
    def __init__(self, settings: Settings, messages: list[dict], max_tokens: int | None,
                 params: dict | None = None) -> None:
        self.settings = settings
        self.prompt_tokens = sum(len(tokenize(m["content"] or "")) for m in messages)
        turn = sum(1 for m in messages if m["role"] == "user")
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        params, last = params or {}, messages[-1]
        functions = last["role"] == "user" and called_functions(
            last["content"], params.get("tools", ()), params.get("tool_choice"), params.get("parallel_tool_calls"))
        self.tokens: list[Chunk]
        if functions:
            self.tokens, self.finish = call_fragments(last["content"], functions), "tool_calls"
        elif last["role"] == "tool":
            self.tokens, self.finish = result_tokens(messages, turn, settings.demo_tokens), "stop"
        else:
            self.tokens, self.finish = shaped(answer_tokens(last["content"], turn, settings.demo_tokens, system),
                                              params, tokenize)
        self.tokens, self.finish = capped(self.tokens, self.finish, max_tokens)
        self.choices = None  # what `logprobs` and `n` > 1 add
        if params.get("logprobs") or (params.get("n") or 1) > 1:
            others = [capped(*shaped(answer_tokens(last["content"], turn, settings.demo_tokens, system, choice),
                                     params, tokenize), max_tokens) for choice in range(1, params.get("n") or 1)]
            self.choices = Choices(params, others, _HANZI if _CJK_CHAR.search(last["content"]) else _WORDS)
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[Chunk]:
        s = self.settings
        start = time.monotonic() + s.demo_ttft_ms / 1000
        gap = 1 / s.demo_tokens_per_s if s.demo_tokens_per_s > 0 else 0.0
        for i, token in enumerate(self.tokens):
            if i == s.demo_fail_after:
                raise ProviderError("upstream_error", f"the demo model failed after {i} tokens")
            if i == s.demo_hang_after:
                self._closed.wait()
            delay = start + i * gap - time.monotonic()
            if delay > 0:
                # A pause between tokens is a plain sleep: under gevent a timed Event.wait costs a
                # Timeout that fires as an exception, on every token. A close is seen right after.
                if delay <= _SHORT_PAUSE_S:
                    time.sleep(delay)
                elif self._closed.wait(delay):
                    return
            if self._closed.is_set():
                return
            yield token
            if self.choices:
                yield from self.choices.step(i, token)
        if self.choices:
            yield from self.choices.rest(len(self.tokens))
        yield Usage(self.prompt_tokens, len(self.tokens) + (self.choices.tokens() if self.choices else 0))
        yield Finish(self.finish)

    def close(self) -> None:
        self._closed.set()


def capped(tokens: list, finish: str, max_tokens: int | None) -> tuple[list, str]:
    if max_tokens is not None and max_tokens < len(tokens):
        return tokens[:max_tokens], "length"
    return tokens, finish


def answer_tokens(prompt: str, turn: int, length: int, system: str | None = None, choice: int = 0) -> list[str]:
    """The demo's answer as tokens: the quote in full (and the system prompt's start), then filler
    up to `length` tokens (from another place for each `choice` of an `n` > 1)."""
    if system and len(system) > _SYSTEM_QUOTE_CHARS:
        system = system[:_SYSTEM_QUOTE_CHARS] + "…"
    if _CJK_CHAR.search(prompt):
        head, filler = f"这是第 {turn} 轮对话。你说：「{prompt}」。", _HANZI
        head += f"我遵循系统提示：「{system}」。" if system else ""
    else:
        head, filler = f'This is turn {turn}. You said: "{prompt}".', _WORDS
        head += f' I follow the system prompt: "{system}".' if system else ""
    return padded(tokenize(head), f"{prompt}\0{choice}" if choice else prompt, filler, length)


def padded(tokens: list[str], seed: str, filler: tuple[str, ...], length: int) -> list[str]:
    """`tokens`, then filler from a place that `seed` picks, up to `length` tokens."""
    start = zlib.crc32(seed.encode("utf-8", "surrogatepass")) % len(filler)
    return tokens + [filler[(start + i) % len(filler)] for i in range(length - len(tokens))]


def called_functions(prompt: str, tools: list[dict], choice: str | dict | None, parallel: bool | None) -> list[dict]:
    """The functions of `tools` that the demo calls for `prompt` (see the module's docstring)."""
    functions = [tool["function"] for tool in tools]
    if not functions or choice == "none":
        return []
    if isinstance(choice, dict):
        return [f for f in functions if f["name"] == choice["function"]["name"]]
    named = [f for f in functions if re.search(rf"(?<![\w-]){re.escape(f['name'])}(?![\w-])", prompt)]
    if not named and choice == "required":
        named = functions[:1]
    return named[:1] if parallel is False else named


def call_fragments(prompt: str, functions: list[dict]) -> list[Chunk]:
    """The calls of `functions`, one after another: the first fragment of each with its id and
    name, then its arguments `_FRAGMENT_CHARS` at a time."""
    fragments: list[Chunk] = []
    for index, function in enumerate(functions):
        name = function["name"]
        call_id = f"call_{zlib.crc32(f'{index}:{name}:{prompt}'.encode('utf-8', 'surrogatepass')):08x}"
        arguments = json.dumps(sample({"type": "object", **(function.get("parameters") or {})}), ensure_ascii=False)
        fragments.append(ToolCallDelta(index, call_id, name))
        fragments += [ToolCallDelta(index, arguments=arguments[i:i + _FRAGMENT_CHARS])
                      for i in range(0, len(arguments), _FRAGMENT_CHARS)]
    return fragments


def result_tokens(messages: list[dict], turn: int, length: int) -> list[str]:
    """The answer to the tools' results that end `messages`: each quoted, with its tool's name."""
    names = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            names[call["id"]] = call["function"]["name"]
    results = []
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        results.append(f'The tool {names.get(message["tool_call_id"], "")} returned: "{message["content"]}".')
    head = f"This is turn {turn}. " + " ".join(reversed(results))
    return padded(tokenize(head), head, _WORDS, length)
