"""An agent loop over Chat Completions with the official SDK: the model asks for tools, this
script runs them and sends their results back, until the model answers in text.

Against the service on the demo model it runs offline, with nothing to set up:

    gunicorn -c gunicorn.conf.py app:app &
    python examples/tool_agent.py "What do get_weather and get_time say for Lisbon?"

`OPENAI_BASE_URL` (default http://localhost:8000/v1) and `MODEL` (default demo) choose the server.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime

from openai import OpenAI


def get_weather(city: str, **_: object) -> str:
    return f"21 degrees and clear in {city}"


def get_time(**_: object) -> str:
    return datetime.now(UTC).strftime("%H:%M UTC")


FUNCTIONS = {"get_weather": get_weather, "get_time": get_time}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                      "parameters": {"type": "object", "properties": {}}}},
]


def run(question: str, client: OpenAI, model: str, max_rounds: int = 5) -> str:
    messages: list = [{"role": "user", "content": question}]
    for _ in range(max_rounds):
        message = client.chat.completions.create(model=model, messages=messages, tools=TOOLS).choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message)
        for call in message.tool_calls:
            result = FUNCTIONS[call.function.name](**json.loads(call.function.arguments))
            print(f"[{call.function.name}({call.function.arguments}) -> {result}]", file=sys.stderr)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    raise RuntimeError(f"no answer after {max_rounds} rounds of tool calls")


if __name__ == "__main__":
    client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                    api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    question = " ".join(sys.argv[1:]) or "What do get_weather and get_time say?"
    print(run(question, client, os.environ.get("MODEL", "demo")))
