"""The OpenAI-compatible API, so that the official SDK and tools built on it are clients too:
`POST /v1/chat/completions` (streamed or whole) and `GET /v1/models`.

A request maps onto the engine like any other: the last message, the user's, is the prompt (or
the last messages, `tool` results of the calls the assistant message before them made, are the
turn's input); system (and `developer`) messages are joined into the system prompt; the messages
before the input are the history. When they are exactly a stored
conversation of the same key (same system prompt, same turns), the request is that
conversation's next turn; when they are one but for its failed or interrupted last turn, and the
prompt is that turn's (an SDK's retry), it replaces that turn; otherwise they start a new
conversation. Its id is in the `X-Conversation-Id` header. With `"store": false` nothing of the
request is kept once the answer ends.

What a strict client can rely on:
- Text and function tools: a message's content is a string or a list of `{"type": "text",
  "text": ...}` parts (joined with newlines); `name` on a message is ignored; an assistant's
  `tool_calls` (content null) and a `tool` message's `tool_call_id` are kept, and a result whose
  call the assistant before it did not make is a 400 naming the message; images and audio are a 400.
- The request is checked against the type the official SDK publishes for it
  (`openai.types.chat.completion_create_params`, with pydantic, strictly): a field it lacks is a
  400 ("unrecognized request argument(s)", as at OpenAI), and so is a value of the wrong type
  (`param` names the field). The fields the service does not read itself are passed on to the
  provider (`ChatRequest.options`), which declares those it honours: another is a 400 naming it
  (docs/openai-compatibility.md has the table). `n` > 1 gives every choice, by `index`; the turn
  saved in the conversation is choice 0.
- `max_completion_tokens` and `max_tokens` are the same limit (giving both, different, is a 400).
- Errors are `{"error": {"message", "type", "param", "code"}}` with the status that the SDK maps
  to its exception classes; `code` is this service's stable code. A failure after the stream
  started is a `data: {"error": ...}` frame (the SDK raises `APIError`) and ends the stream.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from . import openai_errors
from .engine import Answer
from .errors import ApiError
from .openai_errors import about, bad, http_error
from .params import (
    ChatRequest,
    invalid,
    number_field,
    parallel_tool_calls_field,
    request_fields,
    text_field,
    tool_choice_field,
    tool_result_message,
    tools_field,
)
from .sdk_types import request_types
from .tool_calls import unknown_call
from .turns import begin_answer, collect, service, streamed
from .wire import OpenAIFraming

bp = Blueprint("openai_api", __name__, url_prefix="/v1")
openai_errors.init_app(bp)

SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")
# The fields this service reads itself; every other field of the SDK's type that is set (and
# asks for something: `NOTHING`) is an option passed on to the provider, which must honour it.
OWN_FIELDS = frozenset(
    {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "stream", "stream_options", "store",
     "tools", "tool_choice", "parallel_tool_calls"}
)
NOTHING: dict[str, tuple] = {
    "n": (1,), "stop": ("", []), "logprobs": (False,), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "functions": ([],), "function_call": ("none",),
}


@bp.before_app_request
def unrouted() -> Response | None:
    """An unknown path or method under /v1 fails before any view, where no blueprint handler is
    asked: answer it here, in OpenAI's shape too."""
    exc = request.routing_exception
    if exc is None:  # (every request that has a view)
        return None
    under = service().url_prefix + bp.url_prefix + "/"
    if isinstance(exc, HTTPException) and (exc.code or 0) >= 400 and request.path.startswith(under):
        return http_error(exc)
    return None


# -- the request --------------------------------------------------------------------------------


MESSAGE_FIELDS = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}  # beyond role, content and name


def read_message(message: object) -> dict:
    """`{"role", "content"}`, the content as one text; an assistant's `tool_calls` (its content
    may then be null: "") and a tool's `tool_call_id` as they are stored (see `read_tool_call`)."""
    if not isinstance(message, dict):
        raise invalid("a message must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"a message's 'role' must be one of: {', '.join(ROLES)}")
    known = ("role", "content", "name", *MESSAGE_FIELDS.get(role, ()))
    unsupported = sorted(k for k, v in message.items() if k not in known and v not in (None, []))
    if unsupported:
        raise invalid(f"unsupported message field(s): {', '.join(unsupported)}")
    if role == "tool":
        return tool_result_message({"tool_call_id": message.get("tool_call_id"), "content": message_text(message)})
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise invalid("'tool_calls' must be a list")
        content = message_text(message) if message.get("content") is not None else ""
        calls = [read_tool_call(call, i) for i, call in enumerate(calls)]
        return {"role": role, "content": content, "tool_calls": calls}
    return {"role": role, "content": message_text(message)}


def read_tool_call(call: object, index: int) -> dict:
    """A call of an assistant's message, exactly as this service streamed it (so that a history
    sent back is the stored conversation): `{"id", "type": "function", "function": {"name",
    "arguments"}}`."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function" or \
            not all(isinstance(v, str) for v in (call.get("id"), function.get("name"), function.get("arguments"))):
        raise invalid(f"tool_calls[{index}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    return {"id": call["id"], "type": "function",
            "function": {"name": function["name"], "arguments": function["arguments"]}}


def message_text(message: dict) -> str:
    """A message's content as one text."""
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or part.get("text") is None:
                raise invalid("only text content parts are supported: {'type': 'text', 'text': ...}")
        return "\n".join(text_field(part, "text") for part in content)
    if not isinstance(content, str):
        raise invalid("a message's 'content' must be a string or a list of text parts")
    return text_field(message, "content")


def check_fields(fields: dict) -> None:
    """A 400 for a field that the SDK's type of the request lacks, or whose value is not of its type
    (`param` names it). `messages` and `tools` are iterables there, which pydantic checks only as
    they are read: `read_message` checks them. `model` may be left out: the provider's default."""
    known, streamed, whole = request_types("chat.completion_create_params", "CompletionCreateParams")
    unknown = sorted(set(fields) - known)
    if unknown:
        raise invalid(f"unrecognized request argument(s): {', '.join(unknown)}")
    try:
        (streamed if fields.get("stream") is True else whole).validate_python(fields, strict=True)
    except ValidationError as exc:
        errors = [e for e in exc.errors(include_url=False, include_input=False) if e["loc"] != ("model",)
                  or e["type"] != "missing"]
        if errors:
            raise type_error(errors) from None


def type_error(errors: list) -> ApiError:
    """pydantic's errors about one request, as a 400 about the first field they name."""
    field = errors[0]["loc"][0]  # the request is a dict: every error is about one of its fields
    same = [e for e in errors if e["loc"][0] == field]
    if len(same) > 1:  # a union's every member failed: no one message is the right one
        return bad(field, f"invalid '{field}': it has none of the shapes that OpenAI's API accepts for it")
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in same[0]["loc"])[1:]
    return bad(param, f"invalid '{param}': {same[0]['msg'].replace('Input should', 'it should')}")


BOUNDS = {"n": (1, 128), "top_logprobs": (0, 20)}  # OpenAI's


def request_options(fields: dict) -> dict:
    """The fields passed on to the provider: those set that the service does not read itself."""
    for name in BOUNDS.keys() & fields.keys():
        with about(name):
            number_field(fields, name, int, *BOUNDS[name])
    if (fields.get("n") or 1) > 1 and fields.get("tools"):  # choice 0's tool calls are the only ones relayed
        raise bad("n", "'n' > 1 with 'tools' is not supported here")
    if fields.get("top_logprobs") is not None and not fields.get("logprobs"):  # as at OpenAI
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return {k: v for k, v in fields.items() if k not in OWN_FIELDS and v is not None and v not in NOTHING.get(k, ())}


def chat_request(fields: dict, max_prompt_chars: int) -> ChatRequest:
    """The checked request, mapped onto the engine's."""
    check_fields(fields)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list")
    system, history, positions = [], [], []
    for i, message in enumerate(messages):
        with about(f"messages[{i}]"):
            message = read_message(message)
        if message["role"] in SYSTEM_ROLES:
            system.append(message)
        else:
            history.append(message)
            positions.append(i)
    unknown = unknown_call(history)
    if unknown is not None:
        raise bad(f"messages[{positions[unknown]}]", f"messages[{positions[unknown]}]: no assistant message before it"
                  f" made a tool call with the id {history[unknown]['tool_call_id']!r}")
    prompt, tool_results = "", ()
    last = f"messages[{len(messages) - 1}]"
    if messages[-1]["role"] == "tool":  # the tools' results are this turn's input
        answered = next(i for i in range(len(history), 0, -1) if history[i - 1]["role"] != "tool")
        history, tool_results = history[:answered], tuple(history[answered:])
    elif messages[-1].get("role") != "user":
        raise bad(last, "the last message must be the user's, or the results of the tools it called")
    else:
        prompt = history.pop()["content"]
        if not prompt or len(prompt) > max_prompt_chars:
            raise bad(last, f"the last message must hold 1 to {max_prompt_chars} characters")
    system_prompt = "\n\n".join(m["content"] for m in system) or None
    if system_prompt and len(system_prompt) > max_prompt_chars:
        raise bad("messages", f"the system messages hold more than {max_prompt_chars} characters")
    limits = {}
    for name in ("max_completion_tokens", "max_tokens"):
        with about(name):
            limits[name] = number_field(fields, name, int, 1, 1_000_000)
    if None not in limits.values() and len(set(limits.values())) > 1:
        raise bad("max_tokens", "give one of 'max_tokens' and 'max_completion_tokens'")
    with about("temperature"):
        temperature = number_field(fields, "temperature", float, 0, 2)
    with about("model"):
        model = text_field(fields, "model", 200)
    store = fields.get("store")
    if store is not None and not isinstance(store, bool):
        raise bad("store", "'store' must be true or false")
    with about("tools"):
        tools = tools_field(fields)
    with about("tool_choice"):
        tool_choice = tool_choice_field(fields, tools)
    with about("parallel_tool_calls"):
        parallel_tool_calls = parallel_tool_calls_field(fields)
    return ChatRequest(
        prompt=prompt,
        model=model,
        system=system_prompt,
        max_tokens=limits["max_completion_tokens"] or limits["max_tokens"],
        temperature=temperature,
        history=tuple(history),
        store=store is not False,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        tool_results=tool_results,
        options=request_options(fields),
    )


def stream_options(fields: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream, options = fields.get("stream"), fields.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    if options is None:
        return bool(stream), False
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad("stream_options", "'stream_options' may hold 'include_usage' (and 'include_obfuscation', ignored)")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", "'include_usage' must be true or false")
    return True, bool(include_usage)


# -- the endpoints ------------------------------------------------------------------------------


@bp.post("/chat/completions")
def chat_completions() -> Response:
    fields = request_fields(request)
    chat = chat_request(fields, service().settings.max_prompt_chars)
    stream, include_usage = stream_options(fields)
    created = int(time.time())
    answer = begin_answer(chat)
    if stream:
        return streamed(answer, OpenAIFraming(created, include_usage))
    return completion(answer, created)


def completion(answer: Answer, created: int) -> Response:
    """The whole answer as a `chat.completion` object."""
    events = collect(answer)
    end = events[-1]
    refusal = "".join(e["text"] for e in events if e["type"] == "refusal")
    # A model that refuses says so in `refusal`, and its `content` is null (as OpenAI's is).
    message = {"role": "assistant", "content": answer.text or (None if refusal else ""), "refusal": refusal or None}
    reasoning = "".join(e["text"] for e in events if e["type"] == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    add_tool_calls(message, answer)
    response = jsonify(
        id=f"chatcmpl-{answer.message_id}",
        object="chat.completion",
        created=created,
        model=events[0]["model"],
        choices=[
            {"index": 0, "message": message, "logprobs": logprobs_of(events), "finish_reason": end["finish_reason"]},
            *other_choices(events),
        ],
        usage=end["usage"],
    )
    response.headers.update({"X-Conversation-Id": answer.conversation_id, "X-Message-Id": answer.message_id})
    return response


def logprobs_of(events: list[dict]) -> dict | None:
    """The answer's (choice 0's) `logprobs`, when it has any."""
    content = [entry for e in events if e["type"] == "logprobs" for entry in e["content"]]
    return {"content": content, "refusal": None} if content else None


def other_choices(events: list[dict]) -> list[dict]:
    """The choices after the answer (`n` > 1), whole, by `index`."""
    choices: dict[int, dict] = {}
    for event in (e for e in events if e["type"] == "choice"):
        choice = choices.setdefault(event["index"], {"index": event["index"], "text": [], "logprobs": [],
                                                     "finish_reason": None})
        choice["text"].append(event.get("text", ""))
        choice["logprobs"] += event.get("logprobs", ())
        choice["finish_reason"] = event.get("finish_reason") or choice["finish_reason"]
    return [
        {"index": c["index"], "message": {"role": "assistant", "content": "".join(c["text"])},
         "logprobs": {"content": c["logprobs"], "refusal": None} if c["logprobs"] else None,
         "finish_reason": c["finish_reason"]}
        for c in sorted(choices.values(), key=lambda c: c["index"])
    ]


def add_tool_calls(message: dict, answer: Answer) -> None:
    """The answer's tool calls on its whole message, whose content is then null when it has no text."""
    calls = answer.tool_calls
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None


@bp.get("/models")
def models() -> Response:
    return jsonify(object="list", data=[model_object(name) for name in service().provider.models()])


@bp.get("/models/<path:name>")
def model(name: str) -> Response:
    if name not in service().provider.models():
        raise ApiError(404, "model_not_found", f"no model named {name!r}")
    return jsonify(model_object(name))


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": service().provider.name}
