// The chat page. Answers come from POST /chat/sse, read with fetch and parsed here: EventSource
// can neither POST a JSON body nor send an Authorization header. Whatever a user or the model
// wrote goes into the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "chat.apiKey";
const BASE = document.documentElement.dataset.base || ""; // where the API is mounted: "" or "/ai"
const PAGE = 50; // conversations listed at a time; "Older conversations" fetches the next ones
const state = { conversationId: null, controller: null, view: 0, olderThan: null };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- talking to the API -------------------------------------------------------------------

function headers(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(BASE + path, { ...options, headers: headers(options.headers) });
  if (!response.ok) throw await apiError(response);
  return response;
}

// Errors before a stream are JSON {"error": {"code", "message"}}; anything else (a proxy's own
// error page, say) is reported by its status.
async function apiError(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "the request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch {
    // not JSON: keep the status
  }
  if (response.status === 401) showKeyField(true);
  return Object.assign(new Error(message), { code });
}

// Server-Sent Events as the spec reads them: a line ends at \r\n, \n or a lone \r; "field: value"
// loses one leading space; lines starting with ":" are comments (our heartbeats); a blank line
// dispatches the event. The server's data is always one line of JSON.
class SSEParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.lastEventId = "";
    this.reset();
  }

  reset() {
    this.type = "message";
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    let end;
    // A \r at the very end may be the first half of a \r\n split across two chunks: wait.
    while ((end = /\r\n|\r(?!$)|\n/.exec(this.buffer))) {
      const line = this.buffer.slice(0, end.index);
      this.buffer = this.buffer.slice(end.index + end[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.onEvent(this.type, this.data.join("\n"), this.lastEventId);
      this.reset();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
  }
}

async function readEvents(response, onEvent) {
  if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    throw Object.assign(new Error("the server did not answer with an event stream"), { code: "bad_response" });
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder(); // UTF-8; {stream: true} keeps a character split across reads whole
  const parser = new SSEParser(onEvent);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(decoder.decode(value, { stream: true }));
  }
  parser.push(decoder.decode()); // an event without its final blank line is dropped, as in EventSource
}

// --- rendering messages ---------------------------------------------------------------------

const messages = $("messages");

// Keep the newest text in view, unless the reader scrolled up to read something earlier.
function keepScrolled(update) {
  const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 60;
  update();
  if (atBottom) messages.scrollTop = messages.scrollHeight;
}

// Fenced ``` blocks become <pre><code>; the text between keeps its line breaks (CSS pre-wrap).
// While an answer streams, an open fence is a code block up to the end of what has arrived.
function renderText(container, text) {
  const nodes = [];
  text.split("```").forEach((part, i, parts) => {
    if (i % 2 === 1) {
      let lang = "";
      const newline = part.indexOf("\n");
      if (newline >= 0 && /^[\w+#.-]*$/.test(part.slice(0, newline).trim())) {
        lang = part.slice(0, newline).trim();
        part = part.slice(newline + 1);
      }
      const pre = el("pre");
      if (lang) pre.dataset.lang = lang; // shown by CSS, so that it is not part of the text
      pre.append(el("code", "", part.replace(/\n$/, "")));
      nodes.push(pre);
      return;
    }
    // Drop the line breaks that only separate the text from the fences around it.
    if (i > 0) part = part.replace(/^\n/, "");
    if (i < parts.length - 1) part = part.replace(/\n$/, "");
    if (part) nodes.push(el("div", "text", part));
  });
  container.replaceChildren(...nodes);
}

// A tool call or a tool's result: a labelled block of its JSON (indented when it parses), apart
// from the answer's text.
function toolBlock(label, body) {
  let text = body;
  try {
    text = JSON.stringify(JSON.parse(body), null, 2);
  } catch {
    // not JSON: shown as it is
  }
  const block = el("div", "tool");
  const pre = el("pre");
  pre.append(el("code", "", text));
  block.append(el("div", "tool-label", label), pre);
  return block;
}

function addToolResult(message) {
  const article = el("article", "msg tool");
  article.append(toolBlock("Tool result", message.content));
  keepScrolled(() => messages.append(article));
}

function addUserMessage(text) {
  const article = el("article", "msg user");
  article.append(el("div", "text", text));
  keepScrolled(() => messages.append(article));
}

// One assistant message, its states shown through data-state: waiting (no text yet), streaming,
// done, stopped, error.
class Reply {
  constructor() {
    this.text = "";
    this.node = el("article", "msg assistant");
    this.indicator = el("div", "indicator", "connecting…");
    this.answer = el("div", "answer");
    this.note = el("div", "note");
    this.node.append(this.indicator, this.answer, this.note);
    this.setState("waiting");
    keepScrolled(() => messages.append(this.node));
  }

  get ended() {
    return ["done", "stopped", "error"].includes(this.node.dataset.state);
  }

  setState(name) {
    this.node.dataset.state = name;
    this.indicator.hidden = name !== "waiting";
  }

  event(event) {
    if (this.ended) return;
    if (event.type === "status") this.indicator.textContent = `${event.stage}…`;
    else if (event.type === "reasoning") this.addReasoning(event.text);
    else if (event.type === "delta" || event.type === "refusal") this.addText(event.text);
    else if (event.type === "done") this.finish(event.usage, event.duration_ms);
    else if (event.type === "error" && event.error.code === "stopped") this.stop();
    else if (event.type === "error") this.fail(event.error);
  }

  addReasoning(text) {
    if (!this.reasoning) {
      // A collapsible block before the answer, open while the model reasons.
      this.reasoning = el("details", "reasoning");
      this.reasoning.open = true;
      this.reasoning.append(el("summary", "", "Reasoning"), el("div", "text"));
      this.node.insertBefore(this.reasoning, this.answer);
    }
    keepScrolled(() => this.reasoning.lastChild.append(text));
  }

  addText(text) {
    if (!this.text && this.reasoning) this.reasoning.open = false;
    this.setState("streaming");
    this.text += text;
    keepScrolled(() => renderText(this.answer, this.text));
  }

  addToolCall(call) {
    this.setState("streaming");
    const block = toolBlock(`Tool call: ${call.function.name}`, call.function.arguments);
    keepScrolled(() => this.node.insertBefore(block, this.note));
  }

  finish(usage, durationMs) {
    this.setState("done");
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    if (durationMs != null) parts.push(`${(durationMs / 1000).toFixed(1)} s`);
    this.note.textContent = parts.join(" · ");
  }

  stop(label = "Stopped") {
    if (this.ended) return; // Stop pressed just as the answer ended: it stays done
    this.setState("stopped");
    this.note.textContent = label;
  }

  fail(error) {
    if (this.ended) return;
    this.setState("error");
    const code = error.code || "network_error";
    const box = el("div", "error", `${code}: ${error.message || "the answer failed"}`);
    box.setAttribute("role", "alert");
    this.note.replaceChildren(box);
  }
}

// A stored turn, as GET /conversations/<id> lists it.
function showStored(message) {
  if (message.role === "user") return addUserMessage(message.content);
  if (message.role === "tool") return addToolResult(message);
  const reply = new Reply();
  if (message.content) reply.addText(message.content);
  (message.tool_calls || []).forEach((call) => reply.addToolCall(call));
  if (message.status === "complete") {
    reply.finish(message.usage, message.duration_ms);
  } else if (message.status === "interrupted") {
    // Stopped by its reader ("stopped", "interrupted"), or cut short by a server restart
    // ("shutdown", "worker_lost").
    reply.stop(["stopped", "interrupted"].includes(message.error_code) ? "Stopped" : "Interrupted");
  } else if (message.status === "error") {
    reply.fail({ code: message.error_code, message: "the answer failed" });
  } else {
    reply.setState("streaming");
    reply.note.textContent = "Still being written…";
  }
}

// --- chatting -------------------------------------------------------------------------------

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  messages.setAttribute("aria-busy", String(on)); // screen readers read the answer once, whole
}

async function send(prompt) {
  const body = { prompt };
  if (state.conversationId) body.conversation_id = state.conversationId;
  addUserMessage(prompt);
  const reply = new Reply();
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  try {
    const response = await api("/chat/sse", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    // Known before the first event, so that even a stopped first answer continues its conversation.
    if (state.controller === controller) {
      state.conversationId = response.headers.get("X-Conversation-Id") || state.conversationId;
    }
    await readEvents(response, (type, data) => reply.event(JSON.parse(data)));
    if (!reply.ended) reply.fail({ code: "connection_lost", message: "the stream ended before the answer did" });
  } catch (error) {
    // Stop asks the server (below); when that fails, it aborts the request, which the server
    // notices too: either way it stops the model and keeps the turn as interrupted.
    if (controller.signal.aborted) reply.stop();
    else reply.fail(error);
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setStreaming(false);
    }
    loadConversations();
  }
}

// Stop ends the answer on whichever server produces it; the stream then ends with a "stopped"
// event, so the page shows exactly the text that was saved.
async function stop() {
  const controller = state.controller;
  if (!controller) return;
  try {
    if (!state.conversationId) throw new Error("no conversation yet");
    await api(`/conversations/${encodeURIComponent(state.conversationId)}/stop`, { method: "POST" });
  } catch {
    controller.abort();
  }
}

// Leaving a conversation stops its answer, as Stop does: nothing would read the rest.
function leave() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  setStreaming(false);
  state.view += 1;
  messages.replaceChildren();
  return state.view;
}

function newChat() {
  leave();
  state.conversationId = null;
  markCurrent();
  closeSidebar();
  $("prompt").focus();
}

async function openConversation(id) {
  const view = leave();
  state.conversationId = id;
  markCurrent();
  closeSidebar();
  try {
    const conversation = await (await api(`/conversations/${encodeURIComponent(id)}`)).json();
    if (view === state.view) conversation.messages.forEach(showStored);
  } catch (error) {
    if (view === state.view) new Reply().fail(error);
  }
}

function conversationItem(c) {
  const button = el("button", "conversation", c.title || "(untitled)");
  button.type = "button";
  button.title = c.title || "";
  button.dataset.id = c.id;
  button.addEventListener("click", () => openConversation(c.id));
  const item = el("li");
  item.append(button);
  return item;
}

// The newest page of the list (again after each answer, which moves its conversation first).
async function loadConversations() {
  const list = $("conversations");
  const note = $("conversations-note");
  try {
    const page = await (await api(`/conversations?limit=${PAGE}`)).json();
    list.replaceChildren(...page.conversations.map(conversationItem));
    showOlder(page.next_before);
    note.hidden = page.conversations.length > 0;
    note.textContent = "No conversations yet.";
    markCurrent();
  } catch (error) {
    list.replaceChildren();
    showOlder(null);
    note.hidden = false;
    note.textContent = `Conversations unavailable: ${error.message}`;
  }
}

// The next page, below the ones listed: those last updated before the last one listed.
async function loadOlder() {
  const button = $("older");
  button.disabled = true;
  try {
    const before = encodeURIComponent(state.olderThan);
    const page = await (await api(`/conversations?limit=${PAGE}&before=${before}`)).json();
    const listed = new Set([...document.querySelectorAll("#conversations .conversation")].map((b) => b.dataset.id));
    $("conversations").append(...page.conversations.filter((c) => !listed.has(c.id)).map(conversationItem));
    showOlder(page.next_before);
    markCurrent();
  } catch (error) {
    $("conversations-note").hidden = false;
    $("conversations-note").textContent = `Older conversations unavailable: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

function showOlder(nextBefore) {
  state.olderThan = nextBefore;
  $("older").hidden = nextBefore === null || nextBefore === undefined;
}

function markCurrent() {
  for (const button of document.querySelectorAll("#conversations .conversation")) {
    if (button.dataset.id === state.conversationId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

// --- the API key ----------------------------------------------------------------------------

// /healthz says whether the server wants keys (auth: "api_key" or "open"). A server that does not
// say gets the field, folded away.
function showKeyField(open) {
  const box = $("key-box");
  box.hidden = false;
  if (open) {
    box.open = true;
    $("sidebar").classList.add("open");
  }
}

async function loadAuthMode() {
  let auth;
  try {
    auth = (await (await api("/healthz")).json()).auth;
  } catch {
    // unknown: keep the default
  }
  if (auth === "open" || auth === "identify") $("key-box").hidden = true; // no key to give
  else showKeyField(auth === "api_key" && !localStorage.getItem(KEY_STORAGE));
}

function setUpKeyField() {
  const input = $("api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  const save = () => {
    const key = input.value.trim();
    if (key === (localStorage.getItem(KEY_STORAGE) || "")) return;
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    // Conversations belong to a key: another key sees other ones.
    newChat();
    loadConversations();
  };
  input.addEventListener("change", save);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    save();
  });
}

// --- wiring ---------------------------------------------------------------------------------

function closeSidebar() {
  $("sidebar").classList.remove("open");
  $("toggle-list").setAttribute("aria-expanded", "false");
}

function setUp() {
  const composer = $("composer");
  const prompt = $("prompt");
  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || state.controller) return;
    prompt.value = "";
    send(text);
  });
  // Enter sends and Shift+Enter breaks the line; but not the Enter that confirms an input method's
  // composition (Chinese, Japanese), nor on touch screens, whose keyboards have no Shift+Enter.
  const touch = window.matchMedia("(pointer: coarse)");
  prompt.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    if (touch.matches) return;
    event.preventDefault();
    composer.requestSubmit();
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("older").addEventListener("click", loadOlder);
  $("toggle-list").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("toggle-list").setAttribute("aria-expanded", String(open));
  });
  setUpKeyField();
  loadAuthMode();
  loadConversations();
  prompt.focus();
}

setUp();
