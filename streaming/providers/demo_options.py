"""What the demo model does with a request's OpenAI options (the table in
docs/openai-compatibility.md says it for each).

It is deterministic, so some are honoured by what it is: `seed` (every answer is the same), the
sampling knobs (`top_p`, `presence_penalty`, `frequency_penalty`, `logit_bias`: its one answer
is its most likely one), and the labels and hints that change no text (`user`, `metadata`,
`safety_identifier`, `service_tier`, `prompt_cache_*`, `prediction`, `reasoning_effort`,
`verbosity`). The others it does: `stop` cuts the answer where a stop string begins (finish
"stop"), `response_format` makes it JSON (`json_object`: the answer as `{"answer": ...}`;
`json_schema`: a value of the schema, made as a tool's arguments are), `logprobs` gives each
token logprob 0.0 (it is certain) with `top_logprobs` alternatives of its filler words at
-9999.0, OpenAI's floor, and `n` gives that many choices, each with its own filler.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from .base import ChoiceDelta, Logprobs
from .schema_sample import sample

OPTIONS = frozenset({
    "seed", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "user", "metadata",
    "safety_identifier", "service_tier", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "prediction", "reasoning_effort", "verbosity", "stop", "response_format", "logprobs", "top_logprobs", "n",
})
FLOOR = -9999.0  # OpenAI's logprob for a token too unlikely to tell


def shaped(tokens: list[str], params: dict, tokenize) -> tuple[list[str], str]:
    """A text answer's tokens and finish reason as `params` ask: JSON for a `response_format`,
    cut where a `stop` string begins."""
    response_format = params.get("response_format") or {}
    if response_format.get("type") == "json_object":
        tokens = tokenize(json.dumps({"answer": "".join(tokens)}, ensure_ascii=False))
    elif response_format.get("type") == "json_schema":
        schema = response_format["json_schema"].get("schema") or {"type": "object"}
        tokens = tokenize(json.dumps(sample(schema), ensure_ascii=False))
    stop = params.get("stop")
    text = "".join(tokens)
    cuts = [text.find(s) for s in ([stop] if isinstance(stop, str) else stop or ()) if s and s in text]
    if not cuts:
        return tokens, "stop"
    return cut(tokens, min(cuts)), "stop"


def cut(tokens: list[str], at: int) -> list[str]:
    """The tokens of the text's first `at` characters (the last one shortened)."""
    kept, length = [], 0
    for token in tokens:
        if length + len(token) >= at:
            return kept + ([token[:at - length]] if at > length else [])
        kept.append(token)
        length += len(token)
    return kept


def logprobs(token: str, top: int, step: int, filler: tuple[str, ...]) -> list[dict]:
    """OpenAI's `logprobs.content` for one token the demo is sure of: `top` alternatives, itself
    first, then filler words at `FLOOR`."""
    others = [w for w in (filler[(step + j) % len(filler)] for j in range(top + 1)) if w != token][:max(top - 1, 0)]
    alternatives = [entry(token, 0.0), *(entry(w, FLOOR) for w in others)] if top else []
    return [{**entry(token, 0.0), "top_logprobs": alternatives}]


def entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class Choices:
    """The chunks that a request's `logprobs` and `n` add to the answer, step by step: after each
    token of choice 0, its logprobs and the other choices' tokens of that step."""

    def __init__(self, params: dict, others: list[tuple[list[str], str]], filler: tuple[str, ...]) -> None:
        self.top = (params.get("top_logprobs") or 0) if params.get("logprobs") else None
        self.others = others  # choices 1, 2, ...: their tokens and finish reasons
        self.filler = filler

    def step(self, i: int, token: object) -> Iterator[ChoiceDelta | Logprobs]:
        if self.top is not None and type(token) is str:
            yield Logprobs(logprobs(token, self.top, i, self.filler))
        for index, (tokens, _) in enumerate(self.others, 1):
            if i < len(tokens):
                yield ChoiceDelta(index, tokens[i], self._logprobs(tokens[i], i))

    def rest(self, steps: int) -> Iterator[ChoiceDelta | Logprobs]:
        """The other choices' tokens after choice 0's `steps`, then their finish reasons."""
        for i in range(steps, max((len(tokens) for tokens, _ in self.others), default=0)):
            yield from (c for c in self.step(i, None) if isinstance(c, ChoiceDelta))
        for index, (_, finish) in enumerate(self.others, 1):
            yield ChoiceDelta(index, finish_reason=finish)

    def tokens(self) -> int:
        return sum(len(tokens) for tokens, _ in self.others)

    def _logprobs(self, token: str, i: int) -> list | None:
        return None if self.top is None else logprobs(token, self.top, i, self.filler)
