"""The rest of Chat Completions (issue 15, item 2), through real gunicorn with the official `openai`
SDK: requests checked against the SDK's own types, every field a provider cannot honour a 400
naming it, the fields a relay passes upstream (tests/fake_upstream.py records what it got),
`logprobs` and `n` choices relayed, and what the demo model does with each field it honours."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from .conftest import start_server
from .fake_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi there"}]
# Every field the relay passes on, with a value that asks for something.
PASSED_ON = {
    "stop": ["\n\n"], "seed": 7, "top_p": 0.5, "presence_penalty": 0.5, "frequency_penalty": -0.5,
    "logit_bias": {"50256": -100}, "response_format": {"type": "json_object"}, "reasoning_effort": "low",
    "user": "u-1", "metadata": {"team": "a"}, "prediction": {"type": "content", "content": "hi"},
    "service_tier": "flex", "verbosity": "low", "safety_identifier": "s-1", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "explicit", "ttl": "30m"},
}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
# Fields no provider here honours: what they add to an answer (audio, search results, ...) is not relayed.
NEVER = {
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto",
    "moderation": {"model": "omni-moderation-latest"},
}
WRONG_TYPES = [
    ({"n": "2"}, "n"),
    ({"n": 1.5}, "n"),
    ({"seed": True}, "seed"),
    ({"stop": 5}, "stop"),
    ({"top_p": "high"}, "top_p"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logit_bias": {"50256": "ban"}}, "logit_bias.50256"),
    ({"metadata": {"team": 1}}, "metadata.team"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # no `json_schema`
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"reasoning_effort": "enormous"}, "reasoning_effort"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"user": 5}, "user"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"n": 2, "tools": TOOLS}, "n"),  # other choices' tool calls are not relayed
]


class City(pydantic.BaseModel):
    name: str
    population: int
    coastal: bool
    districts: list[str]


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def conversations(server) -> int:
    return len(server.get("/conversations?limit=200").json()["conversations"])


def by_choice(chunks) -> dict[int, str]:
    """The text of each choice of a streamed answer, as a client accumulates it."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def saved_answer(server, response) -> str:
    conversation = server.get(f"/conversations/{response.headers['X-Conversation-Id']}").json()
    return conversation["messages"][-1]["content"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("demo"), "gevent", {"DEMO_TOKENS": "30"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    server = start_server(tmp_path_factory.mktemp("relay"), "gthread", {
        "LLM_PROVIDER": "openai", "OPENAI_BASE_URL": upstream.base_url, "OPENAI_API_KEY": "sk-test",
        "LLM_MODEL": "fake-model"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def claude(tmp_path_factory, upstream):
    server = start_server(tmp_path_factory.mktemp("claude"), "gevent", {
        "LLM_PROVIDER": "anthropic", "ANTHROPIC_BASE_URL": upstream.root_url, "ANTHROPIC_API_KEY": "sk-ant",
        "LLM_MODEL": "fake-claude"})
    yield server
    server.stop()


# -- the check against the SDK's types -----------------------------------------------------------


def test_unknown_fields_and_wrong_types_are_400s_naming_the_field(demo):
    before = conversations(demo)
    with sdk(demo) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="demo", messages=HI, extra_body={"frobnicate": 1, "nn": 2})
        assert info.value.message.endswith("unrecognized request argument(s): frobnicate, nn")
        for case, param in WRONG_TYPES:
            with pytest.raises(openai.BadRequestError) as info:
                client.post("/chat/completions", body={"model": "demo", "messages": HI, **case}, cast_to=object)
            body = info.value.body
            assert (body["param"], body["code"], body["type"]) == (param, "invalid_request", "invalid_request_error")
            assert body["message"].startswith(("invalid ", f"'{param}'")) and "pydantic" not in body["message"], case
            assert len(body["message"]) < 120, body["message"]  # a sentence, not a dump
    assert conversations(demo) == before  # nothing was stored


@pytest.mark.parametrize("server_name", ["demo", "relay", "claude"])
def test_what_a_provider_cannot_honour_is_a_400_naming_it(request, upstream, server_name):
    server = request.getfixturevalue(server_name)
    refused = dict(NEVER)
    if server_name == "claude":  # Anthropic has no seed, choices, logprobs, JSON mode, ... of OpenAI's
        refused |= {k: v for k, v in PASSED_ON.items() if k not in ("stop", "top_p", "user")}
        refused |= {"n": 2, "logprobs": True, "top_logprobs": 2, "tools": TOOLS}
    asked, before = len(upstream.requests), conversations(server)
    with sdk(server) as client:
        for name, value in refused.items():
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as info:
                    client.chat.completions.create(model="demo" if server_name == "demo" else "m", messages=HI,
                                                   stream=stream, extra_body={name: value})
                assert info.value.param == name and info.value.code == "invalid_request", name
                assert f"'{name}' is not supported" in info.value.message
    assert len(upstream.requests) == asked and conversations(server) == before  # refused before anything


def test_fields_that_ask_for_nothing_are_taken_by_any_provider(claude, upstream):
    with sdk(claude) as client:
        answer = client.chat.completions.create(model="m", messages=HI, n=1, stop=[], logprobs=False,
                                                response_format={"type": "text"}, seed=None)
    assert answer.choices[0].message.content == upstream.expected_text("hi there")
    assert not {"n", "stop", "logprobs", "response_format", "seed", "stop_sequences"} & set(upstream.requests[-1])


# -- the relay ----------------------------------------------------------------------------------


def test_the_relay_passes_every_field_upstream(relay, upstream):
    with sdk(relay) as client:
        client.chat.completions.create(model="fake-model", messages=HI, **PASSED_ON)
        sent = upstream.requests[-1]
        assert {k: sent.get(k) for k in PASSED_ON} == PASSED_ON
        client.chat.completions.create(model="fake-model", messages=HI, stream=True, n=1, stop="x", logprobs=False)
        sent = upstream.requests[-1]
        assert sent["stop"] == "x" and not {"n", "logprobs"} & set(sent)  # what asks for nothing is not sent


def test_the_relay_relays_logprobs_and_choices_streamed_and_whole(relay, upstream):
    expected = {i: upstream.expected_text("hi there", choice=i) for i in range(3)}
    asked = {"model": "fake-model", "messages": HI, "n": 3, "logprobs": True, "top_logprobs": 2}
    with sdk(relay) as client:
        raw = client.chat.completions.with_raw_response.create(**asked)
        whole = raw.parse()
        chunks = list(client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
        with client.chat.completions.stream(**asked) as stream:
            final = stream.get_final_completion()
    assert upstream.requests[-1]["n"] == 3 and upstream.requests[-1]["top_logprobs"] == 2
    assert {c.index: c.message.content for c in whole.choices} == expected == by_choice(chunks)
    assert {c.index: c.message.content for c in final.choices} == expected
    for answer in (whole, final):
        for choice in answer.choices:
            tokens = [entry.token for entry in choice.logprobs.content]
            assert "".join(tokens) == expected[choice.index] and choice.finish_reason == "stop"
            first = choice.logprobs.content[0]
            assert first.logprob == -0.25 and [t.token for t in first.top_logprobs] == [first.token, " lorem"]
    # Each content chunk carries its own token's logprobs, as the upstream's did.
    content = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert all([e.token for e in c.logprobs.content] == [c.delta.content] for c in content)
    assert chunks[-1].usage.completion_tokens == 3 * upstream.tokens
    assert saved_answer(relay, raw) == expected[0]  # the conversation's turn is choice 0


# -- the demo -----------------------------------------------------------------------------------


def test_the_demo_stops_at_a_stop_string(demo):
    with sdk(demo) as client:
        whole = client.chat.completions.create(model="demo", messages=HI)
        text = whole.choices[0].message.content
        cut = client.chat.completions.create(model="demo", messages=HI, stop=["nothing like it", "said"])
        chunks = list(client.chat.completions.create(model="demo", messages=HI, stop="said", stream=True))
    assert cut.choices[0].message.content == text[:text.index("said")] == by_choice(chunks)[0]
    assert cut.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"


def test_the_demo_gives_n_choices_and_saves_choice_0(demo):
    with sdk(demo) as client:
        one = client.chat.completions.create(model="demo", messages=HI).choices[0].message.content
        raw = client.chat.completions.with_raw_response.create(model="demo", messages=HI, n=3)
        whole = raw.parse()
        chunks = list(client.chat.completions.create(model="demo", messages=HI, n=3, stream=True,
                                                     stream_options={"include_usage": True}))
        with client.chat.completions.stream(model="demo", messages=HI, n=3) as stream:
            final = stream.get_final_completion()
    texts = {c.index: c.message.content for c in whole.choices}
    assert list(texts) == [0, 1, 2] and texts[0] == one and len(set(texts.values())) == 3
    assert all(t.startswith('This is turn 1. You said: "hi there".') for t in texts.values())
    assert by_choice(chunks) == texts == {c.index: c.message.content for c in final.choices}
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == 3 * 30
    assert saved_answer(demo, raw) == texts[0]


def test_the_demo_gives_logprobs(demo):
    with sdk(demo) as client:
        whole = client.chat.completions.create(model="demo", messages=HI, logprobs=True, top_logprobs=3)
        chunks = list(client.chat.completions.create(model="demo", messages=HI, logprobs=True, stream=True))
    choice = whole.choices[0]
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content
    for entry in choice.logprobs.content:
        assert entry.logprob == 0.0 and bytes(entry.bytes).decode() == entry.token
        assert [t.logprob for t in entry.top_logprobs] == [0.0, -9999.0, -9999.0]
        assert entry.top_logprobs[0].token == entry.token and entry.token not in [t.token for t in
                                                                                   entry.top_logprobs[1:]]
    content = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert [e.token for c in content for e in c.logprobs.content] == [e.token for e in choice.logprobs.content]
    assert all(e.top_logprobs == [] for c in content for e in c.logprobs.content)  # top_logprobs unset: none


def test_the_demo_answers_in_json(demo):
    with sdk(demo) as client:
        whole = client.chat.completions.create(model="demo", messages=HI, response_format={"type": "json_object"},
                                               max_tokens=1000)
        parsed = client.chat.completions.parse(model="demo", messages=HI, response_format=City, max_tokens=1000)
        with client.chat.completions.stream(model="demo", messages=HI, response_format=City,
                                            max_tokens=1000) as stream:
            streamed = stream.get_final_completion()
    answer = json.loads(whole.choices[0].message.content)["answer"]
    assert answer.startswith('This is turn 1. You said: "hi there".')
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.districts and streamed.choices[0].message.parsed == city


def test_the_demo_takes_seed_and_sampling_knobs_as_a_deterministic_model_does(demo):
    knobs = {k: v for k, v in PASSED_ON.items() if k not in ("stop", "response_format")}
    with sdk(demo) as client:
        plain = client.chat.completions.create(model="demo", messages=HI)
        tuned = client.chat.completions.create(model="demo", messages=HI, **knobs)
    assert tuned.choices[0].message.content == plain.choices[0].message.content


# -- Anthropic -----------------------------------------------------------------------------------


def test_anthropic_maps_stop_top_p_and_user(claude, upstream):
    with sdk(claude) as client:
        client.chat.completions.create(model="m", messages=HI, stop="\n\n", top_p=0.5, user="u-1")
        sent = upstream.requests[-1]
        assert (sent["stop_sequences"], sent["top_p"], sent["metadata"]) == (["\n\n"], 0.5, {"user_id": "u-1"})
        list(client.chat.completions.create(model="m", messages=HI, stop=["a", "b"], stream=True))
        assert upstream.requests[-1]["stop_sequences"] == ["a", "b"]
