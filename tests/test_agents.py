"""Function tools on /v1/responses and the whole agent loop with the `openai-agents` package, on
the demo model (which calls the tools that a prompt names, with schema-valid arguments, and
quotes their results), through real gunicorn (gevent); and the demo's max_output_tokens."""

from __future__ import annotations

import json

import openai
import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from .conftest import start_server
from .test_responses_api import checked

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"], "additionalProperties": False},
    "strict": True,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("agents"), "gevent", {"DEMO_TOKENS": "10"})
    yield server
    server.stop()


@pytest.fixture
def sdk(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def weather(arguments: str) -> str:
    """What the client's tool answers: its arguments must be what the schema asks."""
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and isinstance(args["city"], str) and isinstance(args["days"], int)
    return f"sunny in {args['city']} for {args['days']} days"


def test_streamed_function_call_then_its_output_by_previous_response_id(sdk):
    events = checked(list(sdk.responses.create(model="demo", input="what does get_weather say?", tools=[WEATHER],
                                               stream=True)))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.arguments == ""
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert len(deltas) > 1 and "".join(deltas) == done.arguments and done.item_id == added.item.id
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.status == "completed"
    call = final.output[0]
    assert (call.type, call.status, call.call_id, call.arguments) == ("function_call", "completed",
                                                                       added.item.call_id, done.arguments)
    result = weather(call.arguments)

    answer = sdk.responses.create(model="demo", previous_response_id=final.id, tools=[WEATHER],
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}])
    assert f'The tool get_weather returned: "{result}".' in answer.output_text
    assert sdk.responses.retrieve(answer.id).previous_response_id == final.id


def test_stream_helper_with_a_function_tool_and_the_history_sent_back(sdk):
    question = {"role": "user", "content": "call get_weather please"}
    with sdk.responses.stream(model="demo", input=[question], tools=[WEATHER]) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.parsed_arguments == json.loads(call.arguments)
    result = weather(call.arguments)
    # No previous_response_id: the client sends the whole conversation back, as agents do.
    history = [question, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                          "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": result}]
    with sdk.responses.stream(model="demo", input=history, tools=[WEATHER]) as stream:
        answer = stream.get_final_response()
    assert f'The tool get_weather returned: "{result}".' in answer.output_text
    # An output for a call that was never made is a 400 naming the item.
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(model="demo", input=[question, {**history[2], "call_id": "call_unknown"}])
    assert raised.value.body["param"] == "input[1]"


@pytest.mark.parametrize("kind", ["responses", "responses_chained", "chat_completions"])
def test_an_agent_with_a_function_tool_runs_its_loop(server, kind):
    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str, days: int) -> str:
        """The weather in a city for some days."""
        calls.append({"city": city, "days": days})
        return f"sunny in {city} for {days} days"

    sent = []  # the bodies the agent's client sent

    async def record(request) -> None:
        sent.append(json.loads(request.content))

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]}))
    model_class = OpenAIChatCompletionsModel if kind == "chat_completions" else OpenAIResponsesModel
    agent = Agent(name="forecaster", instructions="Answer with the tools.", tools=[get_weather],
                  model=model_class(model="demo", openai_client=client))
    # Chained: the tool's output goes back with previous_response_id instead of the whole history.
    result = Runner.run_sync(agent, "What does get_weather say for Paris?",
                             auto_previous_response_id=kind == "responses_chained")

    assert len(calls) == 1 and isinstance(calls[0]["city"], str) and isinstance(calls[0]["days"], int)
    quoted = f"sunny in {calls[0]['city']} for {calls[0]['days']} days"
    assert f'The tool get_weather returned: "{quoted}".' in result.final_output
    assert len(sent) == 2  # the model asks, the client runs the tool, the model answers
    if kind == "responses_chained":  # the second request is the tool's output after the first response
        assert sent[1]["previous_response_id"].startswith("resp_")
        assert [item["type"] for item in sent[1]["input"]] == ["function_call_output"]


def test_the_demo_stops_at_max_output_tokens(sdk):
    response = sdk.responses.create(model="demo", input="count", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output_text == "This is turn"
