// zserve chat page: talks to the gateway's OpenAI API (same origin), nothing else.
//
// One conversation per pane ("chat", "a", "b"); each pane keeps its own
// message history, streams through /v1/chat/completions (SSE) and shows time
// to first token and tokens/s under every answer. Stop aborts the fetch: the
// gateway sees the disconnect and cancels the request on the worker.
"use strict";

const KEY_STORE = "zserve.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  view: "chat",
  running: new Set(), // AbortControllers of answers still streaming
};

function pane(id, logId, modelId) {
  return { id, log: $(logId), model: $(modelId), history: [] };
}
const panes = {
  chat: pane("chat", "log", "model"),
  a: pane("a", "log-a", "model-a"),
  b: pane("b", "log-b", "model-b"),
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function notice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

// An OpenAI-shaped error body ({"error": {"message", "code"}}) as one line.
function errorText(status, body) {
  const e = body && body.error;
  if (e && e.message) return (e.code ? e.code + ": " : "") + e.message;
  return "HTTP " + status;
}

async function loadModels() {
  let r;
  try {
    r = await fetch("v1/models", { headers: headers() });
  } catch (e) {
    notice("cannot reach the gateway: " + e);
    return;
  }
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (r.status === 401) {
    $("keybar").hidden = false;
    notice(state.key ? errorText(r.status, body) : "");
    $("conn").textContent = "API key needed";
    return;
  }
  if (!r.ok) {
    notice(errorText(r.status, body));
    $("conn").textContent = "no models";
    return;
  }
  notice("");
  const names = (body.data || []).map((m) => m.id);
  const list = $("models");
  list.replaceChildren(...names.map((n) => Object.assign(document.createElement("option"), { value: n })));
  // Defaults: the first model everywhere, the second one (if any) in pane B.
  const defaults = { chat: names[0], a: names[0], b: names[1] || names[0] };
  for (const [id, p] of Object.entries(panes)) {
    if (!p.model.value && defaults[id]) p.model.value = defaults[id];
  }
  $("conn").textContent = names.length ? names.length + " model(s): " + names.join(", ") : "no models yet";
  document.body.dataset.models = names.join(",");
}

function addMessage(p, role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "you" : (role === "system" ? "system" : p.model.value || "assistant");
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const stats = document.createElement("div");
  stats.className = "stats";
  el.append(who, body, stats);
  p.log.append(el);
  p.log.scrollTop = p.log.scrollHeight;
  return { el, body, stats };
}

// The sampling settings and the reply format (response_format); throws
// with a message a person can act on when the schema box is not JSON.
function settings() {
  const t = parseFloat($("temperature").value);
  const n = parseInt($("max-tokens").value, 10);
  const out = { temperature: isNaN(t) ? 0.7 : t, max_tokens: isNaN(n) ? 256 : n };
  const format = $("format").value;
  if (format === "json_object") out.response_format = { type: "json_object" };
  if (format === "json_schema") {
    let schema;
    try {
      schema = JSON.parse($("schema").value);
    } catch (e) {
      throw new Error("the JSON schema box does not hold JSON: " + e.message);
    }
    out.response_format = { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
  }
  return out;
}

function fmtStats(s) {
  const parts = [];
  if (s.ttft !== null) parts.push("first token " + (s.ttft * 1000).toFixed(0) + " ms");
  if (s.tokens) parts.push(s.tokens + " tokens");
  if (s.rate !== null) parts.push(s.rate.toFixed(1) + " tok/s");
  if (s.note) parts.push(s.note);
  return parts.join(" · ");
}

// Read an SSE body; call onEvent(obj) for each "data: {...}" event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

// Ask one pane's model; the user message is already in p.history.
async function answer(p) {
  const view = addMessage(p, "assistant", "");
  view.el.classList.add("streaming");
  const ctl = new AbortController();
  state.running.add(ctl);
  syncButtons();
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...p.history);
  const t0 = performance.now();
  const stats = { ttft: null, tokens: 0, rate: null, note: "" };
  let first = null;
  let text = "";
  let failed = null;
  try {
    const req = {
      model: p.model.value.trim(),
      messages,
      stream: true,
      stream_options: { include_usage: true },
      ...settings(),
    };
    if (req.response_format) view.el.dataset.format = req.response_format.type;
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(req), signal: ctl.signal,
    });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      failed = errorText(r.status, body);
      if (r.status === 401) $("keybar").hidden = false;
    } else {
      let chunks = 0;
      await readEvents(r, (ev) => {
        if (ev.error) { failed = errorText(0, ev); return; }
        if (ev.usage) stats.tokens = ev.usage.completion_tokens;
        for (const c of ev.choices || []) {
          const piece = (c.delta && c.delta.content) || "";
          if (!piece) continue;
          const now = performance.now();
          if (first === null) { first = now; stats.ttft = (now - t0) / 1000; }
          chunks += 1;
          text += piece;
          view.body.textContent = text;
          const secs = (now - first) / 1000;
          if (!stats.tokens && secs > 0) stats.rate = chunks / secs;
          view.stats.textContent = fmtStats(stats);
          p.log.scrollTop = p.log.scrollHeight;
        }
      });
      if (!stats.tokens) stats.tokens = chunks;
    }
  } catch (e) {
    if (e.name === "AbortError") stats.note = "stopped";
    else failed = String(e);
  } finally {
    state.running.delete(ctl);
  }
  const end = performance.now();
  if (first !== null && stats.tokens > 1 && end > first) {
    stats.rate = (stats.tokens - 1) / ((end - first) / 1000);
  }
  view.el.classList.remove("streaming");
  if (failed) {
    view.el.classList.add("error");
    view.body.textContent = (text ? text + "\n" : "") + failed;
    view.stats.textContent = "";
    p.history.pop(); // the user turn that failed is not part of the conversation
  } else {
    p.history.push({ role: "assistant", content: text });
    view.stats.textContent = fmtStats(stats);
    view.el.dataset.done = stats.note || "done";
  }
  syncButtons();
}

function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.running.size) return;
  $("prompt").value = "";
  const targets = state.view === "chat" ? [panes.chat] : [panes.a, panes.b];
  for (const p of targets) {
    p.history.push({ role: "user", content: text });
    addMessage(p, "user", text);
  }
  // Both side-by-side answers stream at once.
  Promise.all(targets.map(answer));
}

function stop() {
  for (const ctl of state.running) ctl.abort();
}

function clearConversation() {
  const targets = state.view === "chat" ? [panes.chat] : [panes.a, panes.b];
  for (const p of targets) {
    p.history = [];
    p.log.replaceChildren();
  }
}

function syncButtons() {
  const busy = state.running.size > 0;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "0";
}

function showView(view) {
  state.view = view;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === view);
  $("view-chat").hidden = view !== "chat";
  $("view-side").hidden = view !== "side";
}

function init() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearConversation);
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showView(b.dataset.view));
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("format").addEventListener("change", () => { $("schema").hidden = $("format").value !== "json_schema"; });
  $("key-save").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    loadModels();
  });
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("key-save").click(); });
  syncButtons();
  loadModels();
}

init();
