// picochat's chat page. Plain JavaScript, no dependencies, no build step.
//
// - One API: replies come from POST /v1/chat/completions with stream: true, the same endpoint any OpenAI client
//   uses. Server-sent events are parsed with a buffer, so an event split across network chunks is never lost, and a
//   malformed event is shown as an error rather than skipped.
// - Tool calls and their outputs arrive in each delta's `parts` (a picochat extension: {type: "text" | "python" |
//   "python_output", text}); they are shown as their own blocks and sent back as parts, so history round-trips.
// - Every piece of user and model text is inserted with textContent / text nodes: never as HTML.
// - Conversations and settings live in localStorage; Stop aborts the request (the server then stops generating).

"use strict";

(() => {
  const STORE_KEY = "picochat.conversations";
  const SETTINGS_KEY = "picochat.settings";
  const DEFAULTS = { temperature: 0.8, topK: 50, maxTokens: "", system: "", apiKey: "" };
  const $ = (id) => document.getElementById(id);

  let conversations = loadJSON(STORE_KEY, []);
  let settings = { ...DEFAULTS, ...loadJSON(SETTINGS_KEY, {}) };
  let currentId = conversations.length ? conversations[0].id : null;
  let controller = null; // the AbortController of the reply being generated
  let editing = null; // index of the user message being edited
  const nodes = new WeakMap(); // message object -> its DOM node
  let renderPending = false;
  let lastSave = 0;

  // ---------------------------------------------------------------------------------------------------------
  // Storage

  function loadJSON(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  }

  function save() {
    lastSave = Date.now();
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(conversations));
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
    } catch (error) {
      setStatus(`could not save conversations (${error.name})`);
    }
  }

  function newId() {
    return window.crypto && crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  }

  function current() {
    return conversations.find((conversation) => conversation.id === currentId) || null;
  }

  // ---------------------------------------------------------------------------------------------------------
  // DOM helpers: text goes in as text, always

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(label, className, onClick) {
    const node = element("button", className, label);
    node.type = "button";
    node.addEventListener("click", onClick);
    return node;
  }

  function setStatus(text) {
    $("model-status").textContent = text;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Rendering

  function render() {
    renderSidebar();
    renderMessages();
    setBusy(controller !== null);
  }

  function renderSidebar() {
    const list = $("conversation-list");
    list.replaceChildren();
    const sorted = [...conversations].sort((a, b) => b.updated - a.updated);
    for (const conversation of sorted) {
      const item = element("li", conversation.id === currentId ? "current" : "");
      item.append(
        button(conversation.title || "New chat", "open", () => openConversation(conversation.id)),
        button("\u00d7", "delete", () => deleteConversation(conversation.id)),
      );
      item.lastChild.setAttribute("aria-label", "Delete conversation");
      list.append(item);
    }
  }

  function renderMessages() {
    const container = $("messages");
    const nearBottom = container.scrollHeight - container.scrollTop - container.clientHeight < 80;
    container.replaceChildren();
    const conversation = current();
    if (!conversation) return;
    conversation.messages.forEach((message, index) => container.append(renderMessage(message, index)));
    if (nearBottom || controller) container.scrollTop = container.scrollHeight;
  }

  function renderMessage(message, index) {
    const node = element("div", `message ${message.role}`);
    nodes.set(message, node);
    if (message.role === "user" && editing === index) {
      node.append(renderEditor(message, index));
      return node;
    }
    const body = element("div", "body");
    node.append(body);
    fillMessage(node, message, index);
    return node;
  }

  // The parts of a message node that change while a reply streams in.
  function fillMessage(node, message, index) {
    const body = node.querySelector(".body");
    body.replaceChildren();
    node.querySelectorAll(".notice, .error, .actions").forEach((child) => child.remove());
    node.classList.toggle("streaming", Boolean(message.streaming));
    if (message.role === "user") {
      body.textContent = message.content;
    } else {
      renderParts(body, message.parts || []);
    }
    if (message.notice) node.append(element("div", "notice", message.notice));
    if (message.stopped) node.append(element("div", "notice", "stopped"));
    if (message.error) node.append(element("div", "error", message.error));
    if (message.streaming) return;
    const actions = element("div", "actions");
    if (message.role === "user") {
      actions.append(button("Edit", "edit-message", () => startEditing(index)));
    } else {
      actions.append(button("Regenerate", "regenerate", () => regenerate(index)));
      if (message.meta) actions.append(element("span", "meta", message.meta));
    }
    node.append(actions);
  }

  function renderParts(container, parts) {
    for (const part of parts) {
      if (part.type === "text") {
        renderProse(container, part.text);
      } else {
        const block = element("div", `tool ${part.type === "python" ? "python" : "python_output"}`);
        block.append(
          element("div", "label", part.type === "python" ? "tool call" : "tool output"),
          element("pre", null, part.text),
        );
        container.append(block);
      }
    }
  }

  // ``` fences become monospaced code blocks (a fence still open while streaming too), `spans` inline code.
  function renderProse(container, text) {
    const pieces = text.split("```");
    pieces.forEach((piece, index) => {
      if (index % 2 === 1) {
        const newline = piece.indexOf("\n");
        const hasLanguage = newline >= 0 && /^[\w+.#-]*$/.test(piece.slice(0, newline).trim()); // ```python
        const code = hasLanguage ? piece.slice(newline + 1) : piece;
        const pre = element("pre");
        pre.append(element("code", null, code));
        container.append(pre);
        return;
      }
      if (index > 0) piece = piece.replace(/^\n/, ""); // the line break that closes a fence
      if (index < pieces.length - 1) piece = piece.replace(/\n$/, ""); // the one before a fence opens
      if (!piece) return;
      const prose = element("div", "text");
      for (const span of piece.split(/(`[^`\n]+`)/)) {
        if (span.length > 2 && span.startsWith("`") && span.endsWith("`")) {
          prose.append(element("code", null, span.slice(1, -1)));
        } else if (span) {
          prose.append(document.createTextNode(span));
        }
      }
      container.append(prose);
    });
  }

  function renderEditor(message, index) {
    const editor = element("div", "edit");
    const field = element("textarea");
    field.value = message.content;
    const done = () => {
      editing = null;
      render();
    };
    const actions = element("div", "actions");
    actions.append(
      button("Save & regenerate", "save-edit", () => {
        const text = field.value.trim();
        if (!text) return;
        const conversation = current();
        conversation.messages = conversation.messages.slice(0, index);
        conversation.messages.push({ role: "user", content: text });
        if (index === 0) conversation.title = titleOf(text);
        editing = null;
        generate(conversation);
      }),
      button("Cancel", "cancel-edit", done),
    );
    editor.append(field, actions);
    setTimeout(() => field.focus(), 0);
    return editor;
  }

  // Re-render only the streaming message, at most once per frame.
  function scheduleUpdate(conversation, message) {
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(() => {
      renderPending = false;
      const node = nodes.get(message);
      if (conversation.id === currentId && node && node.isConnected) {
        fillMessage(node, message, conversation.messages.indexOf(message));
        const container = $("messages");
        container.scrollTop = container.scrollHeight;
      }
      if (Date.now() - lastSave > 1000) save(); // a reload mid-reply keeps what came so far
    });
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("send").disabled = busy || !$("input").value.trim();
    document.querySelectorAll(".message .actions button").forEach((node) => (node.disabled = busy));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Conversations

  function titleOf(text) {
    const line = text.replace(/\s+/g, " ").trim();
    return line.length > 40 ? `${line.slice(0, 40)}\u2026` : line;
  }

  function newConversation() {
    if (controller) controller.abort();
    const conversation = { id: newId(), title: "New chat", updated: Date.now(), messages: [] };
    conversations.push(conversation);
    currentId = conversation.id;
    editing = null;
    save();
    render();
    closeSidebar();
    $("input").focus();
  }

  function openConversation(id) {
    if (controller) controller.abort();
    currentId = id;
    editing = null;
    render();
    closeSidebar();
  }

  function deleteConversation(id) {
    if (controller && id === currentId) controller.abort();
    conversations = conversations.filter((conversation) => conversation.id !== id);
    if (id === currentId) currentId = conversations.length ? conversations[conversations.length - 1].id : null;
    save();
    render();
  }

  function send(text) {
    let conversation = current();
    if (!conversation) {
      newConversation();
      conversation = current();
    }
    if (!conversation.messages.length) conversation.title = titleOf(text);
    conversation.messages.push({ role: "user", content: text });
    generate(conversation);
  }

  function startEditing(index) {
    if (controller) return;
    editing = index;
    render();
  }

  function regenerate(index) {
    if (controller) return;
    const conversation = current();
    conversation.messages = conversation.messages.slice(0, index);
    generate(conversation);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Slash commands: settings from the keyboard. Their results show above the composer and never enter the
  // conversation, so message indices (edit, regenerate) always match what is on screen.

  const COMMANDS = {
    "/temperature": { key: "temperature", field: "temperature", hint: "0 to 2", check: (v) => v >= 0 && v <= 2 },
    "/topk": { key: "topK", field: "top-k", hint: "0 (off) or more", check: (v) => Number.isInteger(v) && v >= 0 },
    "/maxtokens": {
      key: "maxTokens", field: "max-tokens", hint: "1 or more", check: (v) => Number.isInteger(v) && v >= 1,
    },
  };
  const HELP = "/temperature [T]  /topk [K]  /maxtokens [N]  /system [text]  /clear (new chat)  /help";

  function runCommand(line) {
    const [name, ...rest] = line.split(/\s+/);
    const value = rest.join(" ");
    if (name === "/help") return showNotice(HELP);
    if (name === "/clear") {
      newConversation();
      return showNotice("new chat");
    }
    if (name === "/system") {
      settings.system = line.slice(name.length).trim();
      $("system-prompt").value = settings.system;
      save();
      return showNotice(settings.system ? "system prompt set" : "system prompt cleared");
    }
    const command = COMMANDS[name];
    if (!command) return showNotice(`unknown command ${name}; ${HELP}`);
    if (value === "") {
      const now = settings[command.key] === "" ? "the server's default" : settings[command.key];
      return showNotice(`${name.slice(1)} is ${now}`);
    }
    const number = Number(value);
    if (!Number.isFinite(number) || !command.check(number)) return showNotice(`${name} expects ${command.hint}`);
    settings[command.key] = String(number);
    $(command.field).value = settings[command.key];
    save();
    showNotice(`${name.slice(1)} set to ${number}`);
  }

  function showNotice(text) {
    const notice = $("notice");
    notice.textContent = text;
    notice.hidden = false;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Talking to the API

  function requestBody(conversation) {
    const messages = [];
    if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
    for (const message of conversation.messages) {
      if (message.role === "user") messages.push({ role: "user", content: message.content });
      else messages.push({ role: "assistant", content: message.parts || [] });
    }
    const body = { model: "picochat", messages, stream: true, stream_options: { include_usage: true } };
    if (settings.temperature !== "") body.temperature = Number(settings.temperature);
    if (settings.topK !== "") body.top_k = Number(settings.topK);
    if (settings.maxTokens !== "") body.max_tokens = Number(settings.maxTokens);
    return body;
  }

  async function generate(conversation) {
    const reply = { role: "assistant", parts: [], streaming: true };
    conversation.messages.push(reply);
    conversation.updated = Date.now();
    controller = new AbortController();
    render();
    const started = performance.now();
    let tokens = null;
    try {
      const headers = { "Content-Type": "application/json" };
      if (settings.apiKey) headers.Authorization = `Bearer ${settings.apiKey}`;
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers,
        body: JSON.stringify(requestBody(conversation)),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const dropped = Number(response.headers.get("X-Picochat-Dropped-Messages") || 0);
      if (dropped > 0) {
        reply.notice = `${dropped} older messages did not fit the model's context and were left out of this reply.`;
      }
      await readEvents(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message || "generation failed");
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          const parts = delta.parts || (delta.content ? [{ type: "text", text: delta.content }] : []);
          for (const part of parts) addPart(reply.parts, part);
        }
        scheduleUpdate(conversation, reply);
      });
    } catch (error) {
      if (error.name === "AbortError") reply.stopped = true;
      else reply.error = error.message || String(error);
    } finally {
      const seconds = (performance.now() - started) / 1000;
      const rate = (tokens / Math.max(seconds, 1e-3)).toFixed(1);
      if (tokens !== null) reply.meta = `${tokens} tokens \u00b7 ${rate} tok/s`;
      delete reply.streaming;
      controller = null;
      conversation.updated = Date.now();
      save();
      render();
    }
  }

  function addPart(parts, part) {
    if (typeof part.text !== "string" || !part.text) return;
    const last = parts[parts.length - 1];
    if (last && last.type === part.type) last.text += part.text;
    else parts.push({ type: part.type, text: part.text });
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch {
      // not JSON: fall through to the status line
    }
    return `${response.status} ${response.statusText}`;
  }

  // Server-sent events: blocks separated by a blank line; "data:" lines carry JSON; "[DONE]" ends the stream.
  async function readEvents(response, onChunk) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          throw new Error("the server sent a malformed event");
        }
        onChunk(chunk);
      }
      if (done) {
        if (buffer.trim()) throw new Error("the stream ended in the middle of an event");
        throw new Error("the stream ended before the reply was complete");
      }
    }
  }

  async function checkHealth() {
    try {
      const response = await fetch("/health");
      const health = await response.json();
      const state = health.ready ? "" : " \u00b7 starting";
      setStatus(`${health.model} \u00b7 context ${health.context_length} tokens${state}`);
    } catch {
      setStatus("server not reachable");
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Wiring

  function closeSidebar() {
    document.body.classList.remove("sidebar-open");
  }

  function bindSetting(id, key) {
    const field = $(id);
    field.value = settings[key];
    field.addEventListener("change", () => {
      settings[key] = field.value;
      save();
    });
  }

  function start() {
    bindSetting("temperature", "temperature");
    bindSetting("top-k", "topK");
    bindSetting("max-tokens", "maxTokens");
    bindSetting("system-prompt", "system");
    bindSetting("api-key", "apiKey");
    const input = $("input");
    input.addEventListener("input", () => {
      input.style.height = "auto";
      input.style.height = `${input.scrollHeight}px`;
      $("send").disabled = controller !== null || !input.value.trim();
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (!text || controller) return;
      input.value = "";
      input.style.height = "auto";
      $("notice").hidden = true;
      if (/^\/[a-z]+(\s|$)/.test(text)) runCommand(text);
      else send(text);
      $("send").disabled = true;
    });
    $("stop").addEventListener("click", () => controller && controller.abort());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && controller) controller.abort();
    });
    $("new-chat").addEventListener("click", newConversation);
    $("toggle-settings").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
    $("backdrop").addEventListener("click", closeSidebar);
    $("backdrop").hidden = false;
    // A reply that was streaming when the page closed is kept as it was, marked stopped.
    for (const conversation of conversations) {
      for (const message of conversation.messages) {
        if (message.streaming) {
          delete message.streaming;
          message.stopped = true;
        }
      }
    }
    render();
    checkHealth();
  }

  start();
})();
