"""Reading and checking a chat request, from the query string (GET) or a JSON body (POST).

Everything is checked here, before a stream starts, so that bad input gets a 400 and never a
broken stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flask import Request
from gunicorn.http.errors import ParseException
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import ApiError


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    conversation_id: str | None = None
    model: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    # Earlier messages the client sends itself (the OpenAI-style API): a stored conversation's
    # next turn when they are that conversation, a new conversation otherwise.
    history: tuple[dict, ...] = ()
    store: bool = True  # False (OpenAI's `store`): nothing of the turn is kept once the answer ends
    # OpenAI's optional fields passed on as they are (`stop`, `seed`, `n`, `logprobs`, ...), those
    # set to something; the provider must honour each (`turns.check_options`).
    options: dict = field(default_factory=dict)

    def provider_params(self) -> dict:
        """What is passed through to the provider, where set."""
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        return {**{k: v for k, v in params.items() if v is not None}, **self.options}


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def request_fields(request: Request) -> dict | MultiDict:
    """The request's fields: query parameters for GET (a `MultiDict`, whose values are text),
    the JSON object for POST."""
    if request.method == "GET":
        return request.args
    try:
        too_large(request)
        body = request.get_json(silent=True)
    except RecursionError:  # `silent` covers ValueError only; a deeply nested body is bad input too
        body = None
    except (OSError, ParseException):  # gunicorn's, for a body cut short or badly chunked
        raise invalid("the request body could not be read: it is cut short or badly chunked") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object (Content-Type: application/json)")
    return body


def too_large(request: Request) -> None:
    """A chunked body (no Content-Length) over MAX_CONTENT_LENGTH is a 413, as one that declares
    its length is. Werkzeug stops reading it at the limit and hands on what it read, cut short:
    one byte more from the server's stream tells the two apart."""
    if request.content_length is not None or request.max_content_length is None:
        return
    request.get_data(cache=True)  # what get_json() then parses
    if getattr(request.stream, "is_exhausted", False) and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def text_field(fields: dict | MultiDict, name: str, max_chars: int | None = None) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{name}' is not valid Unicode text (it holds a lone surrogate)") from None
    if max_chars is not None and len(value) > max_chars:
        raise invalid(f"'{name}' is longer than {max_chars} characters")
    return value


# Numbers as a query string writes them: Python's int() and float() also take "1_0", "١٢" and "inf".
NUMBER_TEXT = {int: re.compile(r"[+-]?[0-9]+"), float: re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")}


def number_field(fields: dict | MultiDict, name: str, kind: type, low: float, high: float) -> int | float | None:
    """A number in `[low, high]`: a JSON number in a body, decimal digits in a query string."""
    value = fields.get(name)
    if value is None:
        return None
    what = "a number" if kind is float else "an integer"
    if isinstance(value, str) and isinstance(fields, MultiDict):  # from a query string
        if not NUMBER_TEXT[kind].fullmatch(value) or len(value) > 40:  # int() refuses 4,300 digits
            raise invalid(f"'{name}' must be {what}")
        value = kind(value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise invalid(f"'{name}' must be {what}" + (", not a string" if isinstance(value, str) else ""))
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low:g} and {high:g}")
    return kind(value)


def required_prompt(fields: dict | MultiDict, max_prompt_chars: int) -> str:
    prompt = text_field(fields, "prompt", max_prompt_chars)
    if not prompt:
        raise invalid("'prompt' is required and must not be empty")
    return prompt


V1_ONLY = {"history", "store", "options"}  # the OpenAI-compatible API's own


def parse_chat_request(fields: dict | MultiDict, max_prompt_chars: int) -> ChatRequest:
    """The checked request, from `request_fields()`."""
    unknown = sorted(set(fields) - (set(ChatRequest.__dataclass_fields__) - V1_ONLY))
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}")
    return ChatRequest(
        prompt=required_prompt(fields, max_prompt_chars),
        conversation_id=text_field(fields, "conversation_id", 64),
        model=text_field(fields, "model", 200),
        system=text_field(fields, "system", max_prompt_chars),
        max_tokens=number_field(fields, "max_tokens", int, 1, 1_000_000),
        temperature=number_field(fields, "temperature", float, 0, 2),
    )
