"""OpenAI's Responses API: `POST /v1/responses` (streamed or whole) and `GET /v1/responses/<id>`
(the stored response, or `?stream=true&starting_after=N` to follow a live one from event N+1).

A request maps onto the engine's ChatRequest as a Chat Completions request does, so that any
OpenAI-compatible upstream answers it: `instructions` and system/developer messages are the
system prompt; the input's last message, the user's, is the prompt; the input before it is the
history. A response is an assistant turn of a stored conversation: `resp_<message id>`.
`previous_response_id` continues that turn's conversation (its next turn, when that response is
its last and the request adds no history; otherwise a new conversation that starts with the
chain up to it and the input's earlier items). With `"store": false` nothing of the request is
kept once the answer ends.

Fields are checked against the SDK's published request type
(`openai.types.responses.response_create_params`, validated with pydantic): an unknown field is
a 400, as is a type the API would refuse, and a field this service cannot honour unless it asks
for nothing (`NOTHING`). Errors are OpenAI's (`openai_errors`), with `param`.
"""

from __future__ import annotations

import re
import time

from flask import Blueprint, Response, g, jsonify, request

from . import openai_errors
from .chat import replay
from .errors import ApiError
from .openai_errors import about, bad
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
from .wire import ResponsesFraming

bp = Blueprint("responses_api", __name__, url_prefix="/v1")
openai_errors.init_app(bp)

SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant")
TEXT_PARTS = ("input_text", "output_text")
# The request type's fields that this service honours (top_p, user, metadata and reasoning's
# effort as Chat's options, which the provider must honour).
HONOURED = frozenset(
    "model input instructions previous_response_id store stream max_output_tokens tools tool_choice"
    " parallel_tool_calls reasoning temperature top_p metadata user".split()
)
# The type's other fields, accepted only when null or one of these values, which ask for nothing
# this service lacks.
NOTHING: dict[str, tuple] = {
    "include": ([],),
    "truncation": ("disabled",),
    "text": ({"format": {"type": "text"}},),
    "background": (False,),
    "service_tier": ("auto", "default"),
    "stream_options": ({},),
}
RESPONSE_ID_CHARS = 5 + 32  # "resp_" and a message id


def check_types(fields: dict) -> None:
    """Unknown fields, and values whose type the API refuses, are a 400 naming the field."""
    from pydantic import ValidationError

    names, streamed, whole = request_types("responses.response_create_params", "ResponseCreateParams")
    unknown = sorted(set(fields) - names)
    if unknown:
        raise bad(unknown[0], f"unrecognized request argument(s): {', '.join(unknown)}")
    try:
        (streamed if fields.get("stream") is True else whole).validate_python(fields, strict=True)
    except ValidationError as exc:
        # A union's every member fails: the deepest failure is the member the client meant.
        error = max(exc.errors(), key=lambda e: len(e["loc"]))
        loc = error["loc"]  # the field, maybe a union member's name, then maybe an item's index
        index = next((part for part in loc[1:3] if isinstance(part, int)), None)
        param = str(loc[0]) if index is None else f"{loc[0]}[{index}]"
        raise bad(param, f"'{param}' is not of the type the API defines: {error['msg']}") from None
    for name in sorted(names - HONOURED):
        if fields.get(name) is not None and fields[name] not in NOTHING.get(name, ()):
            raise bad(name, f"'{name}' is not supported by this server")


# -- the request --------------------------------------------------------------------------------


def is_text_part(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str)


def content_text(content: object, what: str = "a message's 'content'") -> str:
    """A message's content (or a tool's output) as one text: a string, or text parts joined
    with newlines."""
    if isinstance(content, str):
        return text_field({"content": content}, "content")
    if isinstance(content, list) and content and all(is_text_part(part) for part in content):
        return "\n".join(text_field(part, "text") for part in content)
    raise invalid(f"{what} must be a string or a list of input_text (or output_text) parts")


def read_item(item: object, messages: list[dict]) -> None:
    """Append the input item to `messages` as a Chat message; function calls join the assistant
    message before them."""
    if not isinstance(item, dict):
        raise invalid("an input item must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise invalid(f"a message's 'role' must be one of: {', '.join(ROLES)}")
        messages.append({"role": role, "content": content_text(item.get("content"))})
    elif kind == "function_call":
        if not all(isinstance(item.get(name), str) for name in ("call_id", "name", "arguments")):
            raise invalid("a function_call item needs 'call_id', 'name' and 'arguments' (strings)")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        if messages and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = content_text(item.get("output"), "a function_call_output's 'output'")
        messages.append(tool_result_message({"tool_call_id": item.get("call_id"), "content": output}))
    elif kind != "reasoning":  # the model's own, from an earlier output: a Chat upstream takes none back
        raise invalid(f"input items of type {kind!r} are not supported (message, function_call,"
                      " function_call_output and reasoning are)")


def read_input(value: object) -> tuple[list[dict], list[int]]:
    """The input as Chat messages, and the input item that each one begins with."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], [0]
    if not isinstance(value, list) or not value:
        raise bad("input", "'input' must be a string or a non-empty list of items")
    messages: list[dict] = []
    positions: list[int] = []
    for i, item in enumerate(value):
        with about(f"input[{i}]"):
            read_item(item, messages)
        positions += [i] * (len(messages) - len(positions))
    return messages, positions


def function_tools(fields: dict) -> tuple[dict, ...]:
    """Responses' function tools (`{"type": "function", "name", "parameters", "strict",
    "description"}`) as Chat's, checked as Chat's are (`params.tools_field`)."""
    tools = fields.get("tools") or []
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad(f"tools[{i}]", f"tools[{i}]: only tools of type 'function' are supported")
        if set(tool) - {"type", "name", "parameters", "strict", "description"}:
            raise bad(f"tools[{i}]", f"tools[{i}] may hold type, name, parameters, strict and description")
        function = {k: v for k, v in tool.items() if k != "type" and v is not None}
        converted.append({"type": "function", "function": function})
    try:
        return tools_field({"tools": converted})
    except ApiError as exc:  # its message names `tools[i].function.<field>`: Chat's shape
        exc.message = exc.message.replace(".function", "")
        named = re.match(r"tools\[\d+\]", exc.message)
        exc.param = named.group() if named else "tools"
        raise


def chat_tool_choice(fields: dict, tools: tuple[dict, ...]) -> str | dict | None:
    """Responses' `tool_choice` ("none", "auto", "required", `{"type": "function", "name"}`) as
    Chat's."""
    choice = fields.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or set(choice) != {"type", "name"}:
            raise bad("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or"
                      " {'type': 'function', 'name': ...}")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if not tools and choice in ("none", "auto"):  # asks for nothing
        return None
    with about("tool_choice"):
        return tool_choice_field({"tool_choice": choice}, tools)


def message_of(response_id: object) -> str | None:
    """The message id that a response id names, when it is one of this service's."""
    if isinstance(response_id, str) and len(response_id) == RESPONSE_ID_CHARS and response_id.startswith("resp_"):
        message_id = response_id[5:]
        if all(c in "0123456789abcdef" for c in message_id):
            return message_id
    return None


def stored_turn(response_id: str) -> tuple[dict, dict]:
    """The owner's message (with its events) and conversation that `response_id` names; 404."""
    svc, message_id = service(), message_of(response_id)
    message = message_id and svc.store.message(message_id, g.key_id)
    conversation = message and message["role"] == "assistant" and svc.store.conversation(
        message["conversation_id"], g.key_id)
    if not conversation:
        raise ApiError(404, "not_found", f"no response with id {response_id!r}")
    return message, conversation


def as_message(stored: dict) -> dict:
    """A stored message as the conversation's message (see `store.sql.stored_message`)."""
    message = {"role": stored["role"], "content": stored["content"]}
    if stored.get("tool_calls"):
        message["tool_calls"] = stored["tool_calls"]
    if stored.get("tool_call_id") is not None:
        message["tool_call_id"] = stored["tool_call_id"]
    return message


def chain(response_id: str) -> tuple[dict, list[dict], bool]:
    """The conversation of `response_id`, its messages up to that response, and whether that
    response is its last."""
    message, conversation = stored_turn(response_id)
    turns = conversation["messages"]
    upto = next(i for i, m in enumerate(turns) if m["id"] == message["id"]) + 1
    return conversation, [as_message(m) for m in turns[:upto]], upto == len(turns)


def response_request(fields: dict, max_prompt_chars: int) -> ChatRequest:
    """The checked request, mapped onto the engine's. It continues `previous_response_id`'s
    conversation (its next turn) when that response is the conversation's last, the input adds
    no history and the request is stored; otherwise its history is the chain up to that
    response, then the input's earlier items."""
    messages, positions = read_input(fields.get("input"))
    with about("instructions"):
        instructions = text_field(fields, "instructions", max_prompt_chars)
    system = [instructions] if instructions else []
    system += [m["content"] for m in messages if m["role"] in SYSTEM_ROLES]
    history = [m for m in messages if m["role"] not in SYSTEM_ROLES]
    positions = [p for p, m in zip(positions, messages, strict=True) if m["role"] not in SYSTEM_ROLES]
    last = f"input[{len(fields['input']) - 1}]" if isinstance(fields["input"], list) else "input"
    prompt, tool_results = "", ()
    if history and history[-1]["role"] == "tool":  # the tools' results are this turn's input
        answered = next((i for i in range(len(history), 0, -1) if history[i - 1]["role"] != "tool"), 0)
        history, tool_results = history[:answered], tuple(history[answered:])
    elif not history or history[-1]["role"] != "user":
        raise bad(last, "the input's last item must be the user's message, or the outputs of the functions called")
    else:
        prompt = history.pop()["content"]
        if not prompt or len(prompt) > max_prompt_chars:
            raise bad(last, f"the input's last message must hold 1 to {max_prompt_chars} characters")
    system_prompt = "\n\n".join(system) or None
    if system_prompt and len(system_prompt) > max_prompt_chars:
        raise bad("instructions", f"the instructions hold more than {max_prompt_chars} characters")
    store = fields.get("store") is not False
    conversation_id, earlier = None, []
    if fields.get("previous_response_id") is not None:
        with about("previous_response_id"):
            conversation, earlier, at_end = chain(fields["previous_response_id"])
        if store and at_end and not history:
            conversation_id = conversation["id"]
        system_prompt = system_prompt or conversation["system"]
    unknown = unknown_call([*earlier, *history, *tool_results], len(earlier))
    if unknown is not None:
        where = f"input[{positions[unknown - len(earlier)]}]"
        raise bad(where, f"{where}: no function_call before it has the call_id"
                  f" {[*earlier, *history, *tool_results][unknown]['tool_call_id']!r}")
    with about("max_output_tokens"):
        max_tokens = number_field(fields, "max_output_tokens", int, 1, 1_000_000)
    with about("temperature"):
        temperature = number_field(fields, "temperature", float, 0, 2)
    with about("top_p"):
        number_field(fields, "top_p", float, 0, 1)
    with about("model"):
        model = text_field(fields, "model", 200)
    tools = function_tools(fields)
    with about("parallel_tool_calls"):
        parallel_tool_calls = parallel_tool_calls_field(fields)
    return ChatRequest(
        prompt=prompt,
        conversation_id=conversation_id,
        model=model,
        system=system_prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        history=() if conversation_id else (*earlier, *history),
        store=store,
        tools=tools,
        tool_choice=chat_tool_choice(fields, tools),
        parallel_tool_calls=parallel_tool_calls,
        tool_results=tool_results,
        options=chat_options(fields),
        echo=echoed(fields),
    )


def chat_options(fields: dict) -> dict:
    """The fields passed on to the provider, in Chat's words (which it must honour:
    `turns.check_options`)."""
    reasoning = fields.get("reasoning") or {}
    if reasoning.get("summary") is not None or reasoning.get("generate_summary") is not None:
        raise bad("reasoning", "reasoning summaries are not supported (the upstream's reasoning is streamed as is)")
    options = {"top_p": fields.get("top_p"), "user": fields.get("user"), "metadata": fields.get("metadata"),
               "reasoning_effort": reasoning.get("effort")}
    return {k: v for k, v in options.items() if v is not None}


def echoed(fields: dict) -> dict:
    """What a Response says of the request that made it (but for when: `created_at`)."""
    return {
        "instructions": fields.get("instructions"),
        "previous_response_id": fields.get("previous_response_id"),
        "max_output_tokens": fields.get("max_output_tokens"),
        "temperature": fields.get("temperature"),
        "top_p": fields.get("top_p"),
        "tools": fields.get("tools") or [],
        "tool_choice": fields.get("tool_choice") or "auto",
        "parallel_tool_calls": fields.get("parallel_tool_calls") is not False,
        "reasoning": fields.get("reasoning"),
        "metadata": fields.get("metadata") or {},
        "user": fields.get("user"),
        "store": fields.get("store") is not False,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
    }


def stored_echo(message: dict, conversation: dict) -> dict:
    """What a stored Response says of its request: what was kept with its answer; for an answer
    saved without it (from before it was kept, or made by another API), what the conversation
    keeps and the defaults for the rest."""
    if message["request"] is not None:
        return {"created_at": int(message["created_at"]), **message["request"]}
    turns = conversation["messages"]
    at = next(i for i, m in enumerate(turns) if m["id"] == message["id"])
    previous = next((m["id"] for m in reversed(turns[:at]) if m["role"] == "assistant"), None)
    return {**echoed({}), "created_at": int(message["created_at"]), "instructions": conversation["system"],
            "previous_response_id": previous and f"resp_{previous}"}


# -- the endpoints ------------------------------------------------------------------------------


@bp.post("/responses")
def create() -> Response:
    fields = request_fields(request)
    check_types(fields)
    chat = response_request(fields, service().settings.max_prompt_chars)
    stream = fields.get("stream") is True
    answer = begin_answer(chat, resumable=stream)
    framing = ResponsesFraming({"created_at": int(time.time()), **chat.echo})
    if stream:
        return streamed(answer, framing)
    framing.encode(collect(answer), 0)
    return whole(framing, answer.conversation_id, answer.message_id)


@bp.get("/responses/<response_id>")
def retrieve(response_id: str) -> Response:
    stream = request.args.get("stream", "false")
    if stream not in ("true", "false"):
        raise bad("stream", "'stream' must be true or false")
    starting_after = request.args.get("starting_after")
    if starting_after is not None and (stream != "true" or not starting_after.isascii()
                                       or not starting_after.isdigit() or len(starting_after) > 18):
        raise bad("starting_after", "'starting_after' must be an event's sequence number, with 'stream=true'")
    message, conversation = stored_turn(response_id)
    framing = ResponsesFraming(stored_echo(message, conversation), int(starting_after or -1))
    if stream == "true":  # the whole stream again, from its start: its sequence numbers are the log's
        response = replay(message["id"], framing, 0)
        if response is None:
            raise ApiError(404, "not_found", f"no response with id {response_id!r}")
        return response
    answer = service().live.get(message["id"])
    events = answer.events(0) if answer is not None else message["events"]
    framing.encode(events or [{"type": "start", "message_id": message["id"], "model": message["model"]}], 0)
    return whole(framing, conversation["id"], message["id"])


def whole(framing: ResponsesFraming, conversation_id: str, message_id: str) -> Response:
    response = jsonify(framing.response())
    response.headers.update({"X-Conversation-Id": conversation_id, "X-Message-Id": message_id})
    return response
