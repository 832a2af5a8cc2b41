"""Reading and checking a chat request, from the query string (GET) or a JSON body (POST).

Everything is checked here, before a stream starts, so that bad input gets a 400 and never a
broken stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flask import Request
from gunicorn.http.errors import ParseException
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
    # The functions the model may call, in OpenAI's format (checked by `tools_field`), and how.
    tools: tuple[dict, ...] = ()
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    # The turn's input when it is the results of the tools the previous answer called, instead
    # of a prompt: `{"role": "tool", "tool_call_id", "content"}` messages, in OpenAI's shape.
    tool_results: tuple[dict, ...] = ()
    # OpenAI's optional fields passed on as they are (`stop`, `seed`, `n`, `logprobs`, ...), those
    # set to something; the provider must honour each (`turns.check_options`).
    options: dict = field(default_factory=dict)
    # What the request says of itself that its API echoes when the answer is read back (the
    # Responses API's `tools`, `metadata`, ...): kept with the answer, not sent anywhere.
    echo: dict | None = None

    def provider_params(self) -> dict:
        """What is passed through to the provider, where set."""
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                  "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls}
        params = {k: v for k, v in params.items() if v is not None}
        if self.tools:
            params["tools"] = list(self.tools)
        return {**params, **self.options}


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


class QueryFields(dict):
    """A query string's fields, the first value of each name: text, where a JSON body's have types.
    (A plain dict: Werkzeug's `MultiDict.get` raises and catches a KeyError for every name that
    is not there, and a request asks for eight of them.)"""


def request_fields(request: Request) -> dict:
    """The request's fields: query parameters for GET (`QueryFields`), the JSON object for POST."""
    if request.method == "GET":
        return QueryFields(request.args.items())
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


def text_field(fields: dict, name: str, max_chars: int | None = None) -> str | None:
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


def number_field(fields: dict, name: str, kind: type, low: float, high: float) -> int | float | None:
    """A number in `[low, high]`: a JSON number in a body, decimal digits in a query string."""
    value = fields.get(name)
    if value is None:
        return None
    what = "a number" if kind is float else "an integer"
    if isinstance(value, str) and isinstance(fields, QueryFields):  # from a query string
        if not NUMBER_TEXT[kind].fullmatch(value) or len(value) > 40:  # int() refuses 4,300 digits
            raise invalid(f"'{name}' must be {what}")
        value = kind(value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise invalid(f"'{name}' must be {what}" + (", not a string" if isinstance(value, str) else ""))
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low:g} and {high:g}")
    return kind(value)


def required_prompt(fields: dict, max_prompt_chars: int) -> str:
    prompt = text_field(fields, "prompt", max_prompt_chars)
    if not prompt:
        raise invalid("'prompt' is required and must not be empty")
    return prompt


TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")


def tools_field(fields: dict) -> tuple[dict, ...]:
    """`tools`: OpenAI's function tools, `{"type": "function", "function": {"name", "parameters",
    "description", "strict"}}`, each 400 naming `tools[i]`."""
    tools = fields.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list of {'type': 'function', 'function': {...}}")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise invalid(f"tools[{i}]: a tool must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(function, dict) or set(function) - {"name", "description", "parameters", "strict"}:
            raise invalid(f"tools[{i}].function must be an object of name, description, parameters and strict")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"tools[{i}].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if name in names:
            raise invalid(f"tools[{i}].function.name: another tool is named {name!r} already")
        names.add(name)
        if not isinstance(function.get("parameters", {}), dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON Schema object")
        if not isinstance(function.get("description", ""), str):
            raise invalid(f"tools[{i}].function.description must be a string")
        if not isinstance(function.get("strict", False), bool):
            raise invalid(f"tools[{i}].function.strict must be true or false")
    return tuple(tools)


def tool_choice_field(fields: dict, tools: tuple[dict, ...]) -> str | dict | None:
    """`tool_choice`: "none", "auto", "required" or `{"type": "function", "function": {"name"}}`
    naming one of `tools`."""
    choice = fields.get("tool_choice")
    if choice is None:
        return None
    if not tools:
        raise invalid("'tool_choice' is only allowed when 'tools' are given")
    if choice in TOOL_CHOICES:
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise invalid("'tool_choice' must be 'none', 'auto', 'required'"
                      " or {'type': 'function', 'function': {'name': ...}}")
    if name not in {tool["function"]["name"] for tool in tools}:
        raise invalid(f"'tool_choice' names the function {name!r}, which is not one of 'tools'")
    return choice


def parallel_tool_calls_field(fields: dict) -> bool | None:
    value = fields.get("parallel_tool_calls")
    if value is not None and not isinstance(value, bool):
        raise invalid("'parallel_tool_calls' must be true or false")
    return value


def tool_result_message(result: object, max_chars: int | None = None) -> dict:
    """A tool's result as the `tool` message the upstream is sent (`content` as text)."""
    if not isinstance(result, dict) or set(result) - {"role", "tool_call_id", "content"} or \
            result.get("role", "tool") != "tool":
        raise invalid("a tool result must be {'tool_call_id': ..., 'content': ...}")
    call_id = text_field(result, "tool_call_id", 200)
    if not call_id:
        raise invalid("a tool result needs its 'tool_call_id'")
    return {"role": "tool", "tool_call_id": call_id, "content": text_field(result, "content", max_chars) or ""}


def tool_results_field(fields: dict, max_chars: int) -> tuple[dict, ...]:
    """`tool_results`: the turn's input when it answers the previous turn's tool calls."""
    results = fields.get("tool_results")
    if results is None:
        return ()
    if not isinstance(results, list) or not results:
        raise invalid("'tool_results' must be a non-empty list of {'tool_call_id': ..., 'content': ...}")
    checked = []
    for i, result in enumerate(results):
        try:
            checked.append(tool_result_message(result, max_chars))
        except ApiError as exc:
            raise invalid(f"tool_results[{i}]: {exc.message}") from None
    return tuple(checked)


V1_ONLY = {"history", "store", "options"}  # the OpenAI-compatible API's own
CHAT_FIELDS = frozenset(ChatRequest.__dataclass_fields__) - V1_ONLY  # what a chat request may name


def parse_chat_request(fields: dict, max_prompt_chars: int) -> ChatRequest:
    """The checked request, from `request_fields()`. Its input is a `prompt`, or `tool_results`
    in a conversation (`conversation_id`) whose last answer called tools."""
    unknown = sorted(fields.keys() - CHAT_FIELDS)
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}")
    tool_results = tool_results_field(fields, max_prompt_chars)
    if tool_results and (fields.get("prompt") is not None or fields.get("conversation_id") is None):
        raise invalid("'tool_results' answer the tool calls of a conversation: give 'conversation_id', not 'prompt'")
    tools = tools_field(fields)
    return ChatRequest(
        prompt="" if tool_results else required_prompt(fields, max_prompt_chars),
        conversation_id=text_field(fields, "conversation_id", 64),
        model=text_field(fields, "model", 200),
        system=text_field(fields, "system", max_prompt_chars),
        max_tokens=number_field(fields, "max_tokens", int, 1, 1_000_000),
        temperature=number_field(fields, "temperature", float, 0, 2),
        tools=tools,
        tool_choice=tool_choice_field(fields, tools),
        parallel_tool_calls=parallel_tool_calls_field(fields),
        tool_results=tool_results,
    )
