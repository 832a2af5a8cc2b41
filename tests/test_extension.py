"""`LLMStreaming` in host apps, in-process with Flask's test client (the examples run it under
real gunicorn: tests/test_package.py)."""

from __future__ import annotations

from flask import Flask, session

from streaming import LLMStreaming
from streaming.config import Settings
from streaming.providers.base import Finish
from streaming.store.sqlite import SQLiteStore


def host_app(tmp_path, name: str, **config) -> Flask:
    """A host app with routes, a 404 page and a login of its own, the service under /ai."""
    app = Flask(name)
    app.config.update(SECRET_KEY="test", DATABASE_URL=f"sqlite:///{tmp_path / name}.db", DEMO_TTFT_MS=0,
                      DEMO_TOKENS_PER_S=0, **config)

    @app.get("/")
    def home():
        return "the host's home"

    @app.get("/login/<user>")
    def login(user: str):
        session["user"] = user
        return "signed in"

    @app.get("/boom")
    def boom():
        raise RuntimeError("the host's own failure")

    @app.errorhandler(404)
    def not_found(exc):
        return "<h1>the host's 404</h1>", 404

    LLMStreaming(app, url_prefix="/ai", identify=lambda: session.get("user"))
    return app


def ask(client, prompt: str, **fields) -> dict:
    response = client.post("/ai/chat/blocking", json={"prompt": prompt, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_mounted_under_a_prefix_beside_the_hosts_own_routes(tmp_path):
    app = host_app(tmp_path, "host")
    client = app.test_client()
    assert client.get("/").text == "the host's home"
    assert client.get("/nowhere").text == "<h1>the host's 404</h1>"  # its handlers stay its own
    app.config["PROPAGATE_EXCEPTIONS"] = False
    boom = client.get("/boom")
    assert boom.status_code == 500 and not boom.is_json  # Flask's own page, not the service's JSON
    assert client.get("/chat/blocking").text == "<h1>the host's 404</h1>"  # nothing at the root
    assert client.get("/ai/healthz").get_json()["auth"] == "identify"
    page = client.get("/ai/")
    assert 'data-base="/ai"' in page.text and "/ai/static/app.js" in page.text
    assert client.get("/ai/static/app.js").status_code == 200
    assert client.get("/ai/v1/nope").get_json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape
    client.get("/login/alice")
    response = client.post("/ai/chat", data="x" * 2_000_000, content_type="application/json")
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "body_too_large"


def test_identify_keeps_each_users_conversations_apart(tmp_path):
    client = host_app(tmp_path, "host").test_client()
    response = client.post("/ai/chat/blocking", json={"prompt": "hi"})
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthorized"
    client.get("/login/alice")
    mine = ask(client, "alice's question")
    assert [c["id"] for c in client.get("/ai/conversations").get_json()["conversations"]] == [mine["conversation_id"]]
    client.get("/login/bob")
    assert client.get("/ai/conversations").get_json()["conversations"] == []
    assert client.get(f"/ai/conversations/{mine['conversation_id']}").status_code == 404
    response = client.post("/ai/chat/blocking", json={"prompt": "again", "conversation_id": mine["conversation_id"]})
    assert response.status_code == 404


def test_settings_from_the_config_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOKENS", "40")
    monkeypatch.setenv("MAX_PROMPT_CHARS", "50")
    client = host_app(tmp_path, "host", MAX_PROMPT_CHARS=10).test_client()
    client.get("/login/alice")
    assert ask(client, "short")["usage"]["completion_tokens"] == 40  # from the environment
    assert client.post("/ai/chat/blocking", json={"prompt": "longer than ten"}).status_code == 400  # the config's


def test_two_apps_in_one_process_keep_their_services_apart(tmp_path):
    one, two = host_app(tmp_path, "one", DEMO_TOKENS=30), host_app(tmp_path, "two", DEMO_TOKENS=90)
    first, second = one.test_client(), two.test_client()
    for client in (first, second):
        client.get("/login/alice")
    made = ask(first, "in the first app")
    assert made["usage"]["completion_tokens"] == 30
    assert ask(second, "in the second")["usage"]["completion_tokens"] == 90
    assert second.get(f"/ai/conversations/{made['conversation_id']}").status_code == 404
    assert one.extensions["streaming"] is not two.extensions["streaming"]


class EchoProvider:
    """A provider passed in code: it answers with the prompt reversed."""

    name = "echo"
    default_model = "echo-1"

    def models(self) -> list[str]:
        return [self.default_model]

    def accepts(self, model: str) -> bool:
        return model in self.models()

    def stream(self, messages: list[dict], params: dict):
        return EchoReply(messages[-1]["content"][::-1])


class EchoReply:
    def __init__(self, text: str) -> None:
        self.text = text

    def __iter__(self):
        yield self.text
        yield Finish("stop")

    def close(self) -> None:
        pass


def test_provider_and_store_passed_in_code(tmp_path):
    app = Flask("host")
    store = SQLiteStore(str(tmp_path / "mine.db"), Settings())
    LLMStreaming(app, provider=EchoProvider(), store=store, page=False)
    client = app.test_client()
    answer = ask_at(client, "/chat/blocking", "stressed")
    assert answer["text"] == "desserts"
    assert store.conversation(answer["conversation_id"])["messages"][-1]["content"] == "desserts"
    assert client.get("/").status_code == 404  # no page
    assert client.get("/healthz").get_json()["provider"] == "echo"


def ask_at(client, path: str, prompt: str) -> dict:
    response = client.post(path, json={"prompt": prompt})
    assert response.status_code == 200, response.get_json()
    return response.get_json()
