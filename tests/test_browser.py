"""The chat page in a real headless Chromium (Debian's chromium and chromium-driver), driven by
Selenium against real gunicorn: streaming as it arrives, Stop, conversations, errors, API keys,
inert markup, Chinese text and a phone-sized screen."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from streaming.providers.demo import answer_tokens

from .conftest import needs, wait_for
from .fake_upstream import FakeUpstream

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SLOW = {"DEMO_TOKENS_PER_S": 20, "DEMO_TOKENS": 60}


def demo_answer(prompt: str, turn: int = 1, tokens: int = 60) -> str:
    return "".join(answer_tokens(prompt, turn, tokens))


@pytest.fixture
def browser(tmp_path):
    needs(CHROMIUM.exists() and CHROMEDRIVER.exists(),
          "Chromium not installed: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
        # Whatever a test did, the page never broke its own policy nor threw.
        logs = [entry["message"] for entry in driver.get_log("browser")]
        assert not [m for m in logs if "Content Security Policy" in m or "Uncaught" in m], logs
    finally:
        driver.quit()


class ChatPage:
    """The page as a user sees it, plus one-shot reads of its state through JavaScript."""

    def __init__(self, driver: webdriver.Chrome, url: str) -> None:
        self.driver, self.url = driver, url

    def open(self) -> ChatPage:
        self.driver.get(self.url + "/")
        self.wait(lambda: self.js("return document.readyState") == "complete", "the page to load")
        return self

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, predicate, what: str, timeout: float = 30.0):
        """Poll `predicate`; an element it holds that the page redrew meanwhile (the list is
        redrawn when an answer ends) is looked up again at the next poll."""
        return WebDriverWait(
            self.driver, timeout, poll_frequency=0.02, ignored_exceptions=(StaleElementReferenceException,)
        ).until(lambda _: predicate(), message=f"timed out waiting for {what}")

    def send(self, text: str) -> None:
        self.find("#prompt").send_keys(text)
        self.find("#send").click()

    def reply(self) -> dict | None:
        """The last assistant message, read in one go."""
        return self.js(
            """
            const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
            if (!m) return null;
            const indicator = m.querySelector('.indicator'), error = m.querySelector('.error');
            return {state: m.dataset.state, answer: m.querySelector('.answer').textContent,
                    note: m.querySelector('.note').textContent, error: error && error.textContent,
                    indicator: indicator.hidden ? null : indicator.textContent};
            """
        )

    def wait_reply(self, *states: str, timeout: float = 30.0) -> dict:
        return self.wait(
            lambda: (r := self.reply()) is not None and r["state"] in states and r, f"a reply in state {states}",
            timeout,
        )

    def titles(self) -> list[str]:
        """The conversation list, read in one go."""
        return self.js("return [...document.querySelectorAll('#conversations .conversation')].map(b => b.innerText)")

    def conversation_button(self, title: str):
        return self.wait(
            lambda: next((b for b in self.find_all("#conversations .conversation") if b.text == title), None),
            f"{title!r} in the conversation list",
        )

    def open_conversation(self, title: str) -> None:
        """Click the conversation in the list, as a user does once it is there."""

        def click() -> bool:
            self.conversation_button(title).click()  # stale when the list was redrawn: tried again
            return True

        self.wait(click, f"{title!r} to be clicked")


def conversations(server, **kwargs) -> list[dict]:
    return server.get("/conversations", **kwargs).json()["conversations"]


def stored_turn(server, conversation_id: str, **kwargs) -> dict | None:
    """The last assistant turn once it is no longer streaming."""
    turn = server.get(f"/conversations/{conversation_id}", **kwargs).json()["messages"][-1]
    return turn if turn["status"] != "streaming" else None


def test_the_page_and_its_policy(serve):
    server = serve()
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Content-Security-Policy"] == CSP
    # No inline script, style or handler that the policy would have to allow.
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/app.js" defer>']
    assert not re.search(r"<style|\sstyle=|\son\w+=", page.text)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page.text
    for asset, media_type in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        response = requests.get(server.url + asset, timeout=10)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith(media_type)
    # The API's own answers are not the page's: the policy stays on the page.
    assert "Content-Security-Policy" not in server.get("/healthz").headers


def test_answer_streams_into_the_page(serve, browser, tmp_path):
    server = serve(DEMO_TTFT_MS=800, **SLOW)
    page = ChatPage(browser, server.url).open()
    assert not page.find("#key-box").is_displayed()  # the server says it is open: no key to ask for
    page.send("hello")
    # The `status` event shows while the model has not answered yet.
    page.wait(lambda: (r := page.reply()) and r["indicator"] == "thinking…", "the thinking indicator")
    assert page.find("#stop").is_displayed() and not page.find("#send").is_displayed()

    lengths: list[int] = []

    def done_after_growing() -> bool:
        reply = page.reply()
        if not lengths or len(reply["answer"]) != lengths[-1]:
            lengths.append(len(reply["answer"]))
        return reply["state"] == "done"

    page.wait(done_after_growing, "the answer to be done")
    # Seen growing through many lengths as it was written, not appearing whole at the end.
    assert len(set(lengths)) >= 5, lengths
    assert lengths == sorted(lengths)
    reply = page.reply()
    assert reply["answer"] == demo_answer("hello")
    assert reply["note"].startswith("60 tokens · ") and reply["indicator"] is None and reply["error"] is None
    assert page.find("#send").is_displayed() and not page.find("#stop").is_displayed()
    assert page.find(".msg.user").text == "hello"
    page.wait(lambda: page.conversation_button("hello").get_attribute("aria-current") == "true", "it to be current")
    page.driver.save_screenshot(str(tmp_path / "desktop.png"))


def test_line_breaks_and_code_blocks(serve, browser):
    server = serve()
    page = ChatPage(browser, server.url).open()
    prompt = page.find("#prompt")
    lines = ["Two lines:", "second line", "```python", "print('hi')", "```"]
    for i, line in enumerate(lines):
        prompt.send_keys(line)
        if i < len(lines) - 1:
            prompt.send_keys(Keys.SHIFT, Keys.ENTER, Keys.NULL)  # Shift+Enter: a new line, not sent yet
    assert page.find_all("#messages .msg") == []
    prompt.send_keys(Keys.ENTER)  # Enter sends
    reply = page.wait_reply("done")
    assert reply["answer"] == demo_answer("\n".join(lines)).replace("\n```python\n", "").replace("\n```", "")
    user = page.find(".msg.user")
    assert user.text == "\n".join(lines)
    answer = page.find(".msg.assistant .answer")
    code = answer.find_element(By.CSS_SELECTOR, "pre code")
    assert code.get_property("textContent") == "print('hi')"
    assert code.find_element(By.XPATH, "..").get_attribute("data-lang") == "python"
    first = answer.find_element(By.CSS_SELECTOR, ".text")
    assert first.text == 'This is turn 1. You said: "Two lines:\nsecond line'  # the line break is rendered
    assert first.value_of_css_property("white-space") == "pre-wrap"


def test_reasoning_is_shown_apart_from_the_answer(serve, browser):
    with FakeUpstream() as upstream:
        upstream.tokens, upstream.reasoning_tokens = 8, 3
        server = serve(
            LLM_PROVIDER="openai", OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-x", LLM_MODEL="fake-model"
        )
        page = ChatPage(browser, server.url).open()
        page.send("why")
        reply = page.wait_reply("done")
    assert reply["answer"] == upstream.expected_text("why")
    reasoning = page.find(".msg.assistant details.reasoning")
    assert reasoning.get_property("textContent") == "Reasoning" + "think " * 3
    assert reasoning.get_property("open") is False  # folded away once the answer began
    answer = page.find(".msg.assistant .answer")
    assert reasoning.value_of_css_property("color") != answer.value_of_css_property("color")
    reasoning.find_element(By.TAG_NAME, "summary").click()
    assert reasoning.find_element(By.CSS_SELECTOR, ".text").text.strip() == "think think think"


def test_stop_interrupts_the_answer(serve, browser):
    server = serve(DEMO_TOKENS_PER_S=20, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)
    page = ChatPage(browser, server.url).open()
    page.send("tell me everything")
    page.wait(lambda: len(page.wait_reply("streaming")["answer"]) > 40, "some of the answer")
    page.find("#stop").click()
    reply = page.wait_reply("stopped")
    assert reply["note"] == "Stopped" and reply["error"] is None
    assert page.find("#send").is_displayed() and not page.find("#stop").is_displayed()

    # Stop went to the server (POST /conversations/<id>/stop), which kept exactly what the page shows.
    (conversation,) = conversations(server)
    turn = wait_for(lambda: stored_turn(server, conversation["id"]), what="the interrupted turn")
    assert turn["status"] == "interrupted" and turn["error_code"] == "stopped"
    assert turn["content"] == reply["answer"]
    assert len(turn["content"]) < len(demo_answer("tell me everything", 1, 5000))
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answer to end")

    # Seen again after a reload, from the list.
    page.driver.refresh()
    page.open_conversation("tell me everything")
    reply = page.wait_reply("stopped")
    assert reply["answer"] == turn["content"] and reply["note"] == "Stopped"


def test_conversation_reloads_from_the_list_and_continues(serve, browser):
    server = serve()
    page = ChatPage(browser, server.url).open()
    page.send("first question")
    assert page.wait_reply("done")["answer"] == demo_answer("first question")

    page.driver.refresh()
    page.wait(lambda: page.titles() == ["first question"], "the conversation list")
    assert page.find_all("#messages .msg") == []
    page.open_conversation("first question")
    page.wait(lambda: len(page.find_all("#messages .msg")) == 2, "the stored turn")
    assert page.find(".msg.user").text == "first question"
    reply = page.wait_reply("done")
    assert reply["answer"] == demo_answer("first question") and reply["note"].startswith("60 tokens")

    page.send("second question")  # continues it: the model knows this is the second turn
    page.wait(lambda: len(page.find_all("#messages .msg.assistant")) == 2, "the second reply")
    assert page.wait_reply("done")["answer"] == demo_answer("second question", turn=2)
    (conversation,) = conversations(server)
    assert len(server.get(f"/conversations/{conversation['id']}").json()["messages"]) == 4

    page.find("#new-chat").click()
    assert page.find_all("#messages .msg") == []
    page.send("a fresh start")
    assert page.wait_reply("done")["answer"] == demo_answer("a fresh start", turn=1)
    page.wait(lambda: page.titles() == ["a fresh start", "first question"], "both conversations, newest first")


def test_older_conversations_are_a_click_away(serve, browser):
    server = serve(DEMO_TOKENS=3)
    prompts = [f"conversation {i}" for i in range(53)]
    for prompt in prompts:
        assert server.post("/chat/blocking", json={"prompt": prompt}).ok
    page = ChatPage(browser, server.url).open()
    page.wait(lambda: page.titles() == prompts[::-1][:50], "the newest 50")
    older = page.find("#older")
    assert older.is_displayed() and older.text == "Older conversations"
    older.click()
    page.wait(lambda: page.titles() == prompts[::-1], "all of them, newest first")
    assert not page.find("#older").is_displayed()
    page.open_conversation("conversation 0")
    assert page.wait_reply("done")["answer"] == demo_answer("conversation 0", tokens=3)


def test_markup_in_a_prompt_stays_text(serve, browser):
    server = serve()
    page = ChatPage(browser, server.url).open()
    prompt = '<script>alert(1)</script><img src=x onerror="window.pwned=1;alert(2)"> <b>bold</b>'
    page.send(prompt)
    reply = page.wait_reply("done")
    assert reply["answer"] == demo_answer(prompt)
    page.conversation_button(prompt)  # the title, as text, in the list as well
    with pytest.raises(NoAlertPresentException):
        page.driver.switch_to.alert.accept()
    assert page.find_all("#messages img, #messages script, #messages b, #sidebar img") == []
    assert page.js("return window.pwned") is None
    assert page.find(".msg.user").text == prompt
    assert prompt in page.find(".msg.assistant .answer").text


def test_chinese_text(serve, browser):
    server = serve(**SLOW)
    page = ChatPage(browser, server.url).open()
    prompt = "用中文解释生成器，并举一个例子"
    page.send(prompt)
    reply = page.wait_reply("done")
    assert reply["answer"] == demo_answer(prompt)
    assert reply["answer"].startswith(f"这是第 1 轮对话。你说：「{prompt}」。")
    assert page.find(".msg.user").text == prompt
    assert page.find(".msg.assistant .answer").text == demo_answer(prompt)
    page.conversation_button(prompt)


def test_an_error_event_is_shown_as_an_error(serve, browser):
    server = serve(DEMO_FAIL_AFTER=4)
    page = ChatPage(browser, server.url).open()
    page.send("hi")
    reply = page.wait_reply("error")
    assert reply["answer"] == "This is turn 1."  # what came before the failure stays
    assert reply["error"] == "upstream_error: the demo model failed after 4 tokens"
    error = page.find(".msg.assistant .error")
    assert error.get_attribute("role") == "alert"
    assert error.value_of_css_property("color") != page.find(".msg.assistant .answer").value_of_css_property("color")


def test_errors_before_the_stream_are_shown(serve, browser):
    server = serve(DEMO_TOKENS_PER_S=20, DEMO_TOKENS=5000, HEARTBEAT_S=0.2, MAX_PROMPT_CHARS=40)
    page = ChatPage(browser, server.url).open()

    page.send("x" * 41)  # 400
    reply = page.wait_reply("error")
    assert reply["error"] == "invalid_request: 'prompt' is longer than 40 characters" and reply["answer"] == ""

    page.send("start")
    page.wait_reply("streaming")
    page.find("#stop").click()
    page.wait_reply("stopped")
    (conversation,) = conversations(server)
    wait_for(lambda: stored_turn(server, conversation["id"]), what="the interrupted turn")

    # Another client is answering in this conversation: 409.
    other = requests.post(
        server.url + "/chat/sse", json={"prompt": "elsewhere", "conversation_id": conversation["id"]},
        stream=True, timeout=30,
    )
    try:
        assert other.status_code == 200
        page.send("here too")
        reply = page.wait_reply("error")
        assert reply["error"] == "conversation_busy: an answer is still streaming in this conversation"
    finally:
        other.close()
    wait_for(lambda: stored_turn(server, conversation["id"]), what="the other answer to end")

    # The conversation was deleted meanwhile: 404.
    assert requests.delete(f"{server.url}/conversations/{conversation['id']}", timeout=10).status_code == 204
    page.send("still there?")
    assert page.wait_reply("error")["error"] == "not_found: no such conversation"
    assert page.find("#send").is_displayed()


def test_too_many_streams_is_shown(serve, browser):
    server = serve(DEMO_TOKENS_PER_S=20, DEMO_TOKENS=5000, HEARTBEAT_S=0.2, MAX_STREAMS_PER_WORKER=1)
    page = ChatPage(browser, server.url).open()
    other = requests.post(server.url + "/chat/sse", json={"prompt": "hog"}, stream=True, timeout=30)
    try:
        assert other.status_code == 200
        page.send("me too")
        assert page.wait_reply("error")["error"] == "too_many_streams: this worker is at its limit of 1 streams"
    finally:
        other.close()
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the other answer to end")
    page.send("now?")
    assert page.wait_reply("streaming")["error"] is None
    page.find("#stop").click()
    page.wait_reply("stopped")


def test_api_key_from_the_field(serve, browser):
    key = "sk-page-key"
    server = serve(API_KEYS=f"{key},sk-other")
    page = ChatPage(browser, server.url).open()
    # The server wants keys: the field is open, and nothing works without one.
    page.wait(lambda: page.find("#api-key").is_displayed(), "the API key field")
    page.wait(lambda: "API key is required" in page.find("#conversations-note").text, "the list to need a key")
    page.send("hi")
    assert page.wait_reply("error")["error"].startswith("unauthorized: an API key is required")

    page.find("#api-key").send_keys(key, Keys.ENTER)
    page.wait(lambda: page.find("#conversations-note").text == "No conversations yet.", "the list to load")
    page.send("with a key")
    assert page.wait_reply("done")["answer"] == demo_answer("with a key")
    # Sent as `Authorization: Bearer <key>`: the conversation is this key's.
    bearer = {"Authorization": f"Bearer {key}"}
    assert [c["title"] for c in conversations(server, headers=bearer)] == ["with a key"]

    page.driver.refresh()  # kept in localStorage
    page.open_conversation("with a key")
    assert page.wait_reply("done")["answer"] == demo_answer("with a key")
    assert page.find("#api-key").get_property("value") == key
    assert page.find("#key-box").get_property("open") is False  # a key is set: folded away


def test_phone_screen(serve, browser, tmp_path):
    server = serve(**SLOW)
    # A phone's viewport: without the viewport meta the page would lay out 980 px wide.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    page = ChatPage(browser, server.url).open()

    def within_width(*selectors: str) -> None:
        width = page.js("return window.innerWidth")
        assert width == 390
        assert page.js("return document.documentElement.scrollWidth") <= width  # nothing scrolls sideways
        for selector in selectors:
            element = page.find(selector)
            assert element.is_displayed(), selector
            rect = element.rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= width, (selector, rect)

    within_width("#prompt", "#send", "#new-chat", "#toggle-list")
    assert not page.find("#sidebar").is_displayed()  # the list folds away on a phone

    prompt = "请用中文写一段很长的回答，解释流式输出为什么能让用户更快看到结果"
    page.send(prompt)
    page.wait_reply("streaming")
    within_width("#prompt", "#stop")
    assert page.wait_reply("done")["answer"] == demo_answer(prompt)
    within_width("#prompt", "#send", ".msg.user", ".msg.assistant")
    page.driver.save_screenshot(str(tmp_path / "phone.png"))

    page.find("#toggle-list").click()
    # It slides in: wait until it is all on screen.
    page.wait(lambda: page.find("#sidebar").is_displayed() and page.find("#sidebar").rect["x"] == 0, "the list")
    within_width("#sidebar", "#conversations .conversation")
    page.driver.save_screenshot(str(tmp_path / "phone-list.png"))
    page.find("#conversations .conversation").click()
    page.wait(lambda: not page.find("#sidebar").is_displayed(), "the list to close")
    assert page.wait_reply("done")["answer"] == demo_answer(prompt)


def test_tool_calls_and_results_are_shown_as_such(serve, browser):
    """A conversation an agent had over /v1 with a tool: the call is a labelled block of its name
    and arguments, not answer text; its result is a block of its own; the answer quotes it."""
    server = serve()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    messages = [{"role": "user", "content": "ask get_weather"}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        message = client.chat.completions.create(model="demo", messages=messages, tools=[tool]).choices[0].message
        (call,) = message.tool_calls
        messages += [message, {"role": "tool", "tool_call_id": call.id, "content": "<b>21 degrees</b>"}]
        answer = client.chat.completions.create(model="demo", messages=messages, tools=[tool]).choices[0].message
    page = ChatPage(browser, server.url).open()
    page.open_conversation("ask get_weather")
    page.wait(lambda: len(page.find_all("#messages .msg")) == 4, "the stored turns")
    first, last = page.find_all("#messages .msg.assistant")
    assert first.find_element(By.CSS_SELECTOR, ".answer").text == ""
    assert first.find_element(By.CSS_SELECTOR, ".tool-label").text == "Tool call: get_weather"
    shown = first.find_element(By.CSS_SELECTOR, ".tool code").text
    assert json.loads(shown) == json.loads(call.function.arguments) and shown != call.function.arguments  # indented
    result = page.find(".msg.tool")
    assert result.find_element(By.CSS_SELECTOR, ".tool-label").text == "Tool result"
    assert result.find_element(By.CSS_SELECTOR, "code").text == "<b>21 degrees</b>"  # as text, not markup
    assert last.find_element(By.CSS_SELECTOR, ".answer").text == answer.content.strip()
    assert 'returned: "<b>21 degrees</b>"' in answer.content
