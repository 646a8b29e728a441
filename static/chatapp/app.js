// The chat page: history, the composer, and the live reply.
import { renderInto } from "./render.js";
import { ConversationSocket } from "./socket.js";
import { largerBudget, showContext } from "./context.js";
import { ComposerImages, renderMessageImages } from "./attachments.js";

const data = JSON.parse(document.getElementById("page-data").textContent);
const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const input = $("message");
const sendButton = $("send");
const stopButton = $("stop");
const modelSelect = $("model");
const errorEl = $("composer-error");
const csrfToken = document.querySelector("input[name=csrfmiddlewaretoken]").value;

let conversation = data.conversation;
let socket = null;
// The reply being streamed: {id, seq, content, reasoning, el}; seq orders deltas.
let live = null;
let renderScheduled = false;
const bubbles = new Map();

// ---- rendering -------------------------------------------------------------------------------

function bubbleFor(message) {
  let el = bubbles.get(message.id);
  if (!el) {
    el = document.createElement("article");
    el.className = `message ${message.role}`;
    el.dataset.id = message.id;
    el.setAttribute("aria-label", message.role === "user" ? "You said" : "Assistant replied");
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning";
    reasoning.hidden = true;
    reasoning.innerHTML = "<summary>Thinking…</summary><div class=\"reasoning-body\"></div>";
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("footer");
    meta.className = "meta";
    el.append(reasoning, body, meta);
    messagesEl.append(el);
    bubbles.set(message.id, el);
    $("empty-state").hidden = true;
  }
  return el;
}

function renderMessage(message) {
  const el = bubbleFor(message);
  el.dataset.status = message.status;
  const body = el.querySelector(".body");
  if (message.role === "user") {
    body.textContent = message.content;
    renderMessageImages(el, message.attachments);
  } else {
    renderInto(body, message.content);
  }
  const reasoning = el.querySelector(".reasoning");
  if (message.reasoning) {
    reasoning.hidden = false;
    reasoning.querySelector(".reasoning-body").textContent = message.reasoning;
  }
  renderMeta(el, message);
  return el;
}

function renderMeta(el, message) {
  const meta = el.querySelector(".meta");
  meta.replaceChildren();
  if (message.role !== "assistant") return;
  const parts = [];
  if (message.model) parts.push(message.model);
  if (message.prompt_tokens != null) {
    parts.push(`${message.prompt_tokens} in · ${message.cached_tokens || 0} cached · ${message.completion_tokens} out`);
    if (Number(message.cache_saved_usd) > 0) parts.push(`cache saved $${Number(message.cache_saved_usd).toFixed(4)}`);
  }
  if (message.ttft_ms != null) parts.push(`first token ${(message.ttft_ms / 1000).toFixed(2)} s`);
  if (message.status === "cancelled") parts.push("stopped");
  if (message.status === "interrupted") parts.push("interrupted");
  if (parts.length) {
    const span = document.createElement("span");
    span.textContent = parts.join(" · ");
    meta.append(span);
  }
  if (["error", "interrupted", "cancelled"].includes(message.status)) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "retry";
    retry.textContent = "Retry";
    retry.addEventListener("click", () => socket && socket.send({ type: "regenerate", message_id: message.id }));
    meta.append(retry);
  }
  if (message.status === "error" && message.finish_reason === "length" && !message.content) {
    const larger = document.createElement("button");
    larger.type = "button";
    larger.className = "retry larger-budget";
    larger.textContent = "Retry with a larger budget";
    larger.addEventListener("click", () => socket && socket.send({ type: "regenerate", message_id: message.id, max_output_tokens: largerBudget() }));
    meta.append(larger);
  }
  if (message.error) {
    const error = document.createElement("p");
    error.className = "error";
    error.setAttribute("role", "alert");
    error.textContent = message.error;
    meta.append(error);
  }
}

function scheduleLiveRender() {
  if (renderScheduled) return;
  renderScheduled = true;
  requestAnimationFrame(() => {
    renderScheduled = false;
    if (!live) return;
    const el = bubbleFor({ id: live.id, role: "assistant" });
    const follow = nearBottom();
    renderInto(el.querySelector(".body"), live.content);
    if (live.reasoning) {
      const reasoning = el.querySelector(".reasoning");
      reasoning.hidden = false;
      reasoning.querySelector(".reasoning-body").textContent = live.reasoning;
    }
    if (follow) scrollToBottom();
  });
}

function nearBottom() {
  return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 80;
}

function scrollToBottom() {
  messagesEl.scrollTop = messagesEl.scrollHeight;
}

function setStreaming(on) {
  stopButton.hidden = !on;
  sendButton.hidden = on;
}

function showError(message) {
  errorEl.textContent = message;
  errorEl.hidden = !message;
}

function setConnection(text) {
  const el = $("connection");
  el.textContent = text;
  el.hidden = !text;
}

// ---- frames from the server ------------------------------------------------------------------

const handlers = {
  state(frame) {
    showContext(frame.context);
    const reply = frame.reply;
    if (!reply) {
      // Nothing is streaming: if a reply ended while we were away, show its final form.
      if (frame.last) renderMessage(frame.last).classList.remove("streaming");
      live = null;
      setStreaming(false);
      return;
    }
    live = { id: reply.message_id, seq: reply.seq, content: reply.content, reasoning: reply.reasoning };
    setStreaming(true);
    scheduleLiveRender();
  },
  message(frame) {
    images.sent(frame.message);
    renderMessage(frame.message);
    if (frame.title && conversation) setTitle(frame.title);
    const reply = frame.reply;
    if (!live || live.id !== reply.id) {
      live = { id: reply.id, seq: 0, content: "", reasoning: "" };
    }
    renderMessage(reply).classList.add("streaming");
    setStreaming(true);
    scrollToBottom();
  },
  delta(frame) {
    if (!live || live.id !== frame.message_id) {
      live = { id: frame.message_id, seq: 0, content: "", reasoning: "" };
      setStreaming(true);
    }
    if (frame.seq <= live.seq) return; // already in the snapshot
    if (frame.seq !== live.seq + 1) {
      socket.send({ type: "state" }); // a gap: start again from a fresh snapshot
      return;
    }
    live.seq = frame.seq;
    if (frame.text) live.content += frame.text;
    if (frame.reasoning) live.reasoning += frame.reasoning;
    scheduleLiveRender();
  },
  "reply.replaced"(frame) {
    const old = bubbles.get(frame.old_id);
    if (old) old.remove();
    bubbles.delete(frame.old_id);
    live = { id: frame.reply.id, seq: 0, content: "", reasoning: "" };
    renderMessage(frame.reply).classList.add("streaming");
    setStreaming(true);
  },
  "reply.status"(frame) {
    const el = bubbleFor({ id: frame.message_id, role: "assistant" });
    el.querySelector(".meta").textContent = frame.text;
  },
  "reply.end"(frame) {
    showContext(frame.context);
    const message = frame.message;
    if (live && live.id === message.id) live = null;
    const el = renderMessage(message);
    el.classList.remove("streaming");
    setStreaming(false);
    $("announcer").textContent = message.status === "complete" ? "Reply finished." : `Reply ${message.status}.`;
    if (nearBottom()) scrollToBottom();
  },
  error(frame) {
    // A reply's own failure is shown in its bubble (reply.end); others by the composer.
    if (!frame.message_id) {
      showError(frame.message);
      images.restore(); // a refused send keeps its images in the composer
    }
  },
};

function onFrame(frame) {
  const handler = handlers[frame.type];
  if (handler) handler(frame);
}

function onStatus(status) {
  if (status === "open") setConnection("");
  else if (status === "reconnecting") setConnection("reconnecting…");
  else if (status === "refused") setConnection("This conversation is not available. Reload the page.");
}

function connect() {
  socket = new ConversationSocket(conversation.id, { onFrame, onStatus });
}

// ---- the composer ----------------------------------------------------------------------------

function setTitle(title) {
  $("chat-title").textContent = title || "New chat";
  document.title = `${title || "New chat"} · Kimi Chat`;
  const link = document.querySelector(`#conversation-list a[data-id="${conversation.id}"]`);
  if (link) link.textContent = title || "New chat";
}

async function createConversation() {
  const body = new FormData();
  body.append("model", modelSelect.value);
  const response = await fetch("/api/conversations/", {
    method: "POST",
    body,
    headers: { "X-CSRFToken": csrfToken },
    credentials: "same-origin",
  });
  const result = await response.json();
  if (!response.ok) throw new Error(result.message || "Could not start a conversation.");
  conversation = { id: result.id, title: "" };
  history.replaceState(null, "", result.url);
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.href = result.url;
  link.dataset.id = result.id;
  link.textContent = "New chat";
  link.setAttribute("aria-current", "page");
  item.append(link);
  const list = $("conversation-list");
  list.querySelector(".empty-list")?.remove();
  list.prepend(item);
  connect();
}

async function send() {
  const text = input.value;
  if ((!text.trim() && images.isEmpty()) || !stopButton.hidden) return;
  showError("");
  let attachments;
  try {
    attachments = await images.take(); // uploads started when added: usually already done
    if (!conversation) await createConversation();
  } catch (error) {
    images.restore();
    showError(error.message);
    return;
  }
  socket.send({ type: "send", text, model: Number(modelSelect.value), attachments });
  input.value = "";
  autosize();
}

function autosize() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
input.addEventListener("input", autosize);
const images = new ComposerImages({
  tray: $("attachment-tray"),
  button: $("attach"),
  input: $("attach-input"),
  note: $("attach-note"),
  dropTarget: $("chat"),
  csrfToken,
  models: data.models,
  getModelId: () => modelSelect.value,
  getConversationId: () => conversation && conversation.id,
  onError: showError,
});
modelSelect.addEventListener("change", () => images.setModel());
stopButton.addEventListener("click", () => socket && socket.send({ type: "stop" }));

// ---- start -----------------------------------------------------------------------------------

showContext(data.context);
for (const message of data.messages) {
  const el = renderMessage(message);
  if (message.status === "streaming") el.classList.add("streaming");
}
scrollToBottom();
if (conversation) connect();
input.focus();
