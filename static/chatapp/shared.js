// The read-only shared view (/shared/<id>/): the conversation's text, thinking, images and
// per-reply stats, a reply followed live while it streams (the same state / seq / delta frames
// as the owner's page, on /ws/shared/<id>/), and "Continue as my copy". When the share is
// revoked the server says so and closes the socket: the page clears what it showed and stops.
import { renderMessageImages } from "./attachments.js";
import { postForm } from "./http.js";
import { setupPrefs } from "./prefs.js";
import { renderInto } from "./render.js";
import { ConversationSocket } from "./socket.js";

const data = JSON.parse(document.getElementById("page-data").textContent);
const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const bubbles = new Map();
const messages = new Map();
let live = null; // {id, seq, content, reasoning}
let socket = null;
let ended = false;

function button(label, className, onClick) {
  const el = document.createElement("button");
  el.type = "button";
  el.className = className;
  el.textContent = label;
  el.addEventListener("click", onClick);
  return el;
}

function bubbleFor(message) {
  let el = bubbles.get(message.id);
  if (!el) {
    el = document.createElement("article");
    el.className = `message ${message.role}`;
    el.dataset.id = message.id;
    el.setAttribute("aria-label", message.role === "user" ? "Question" : "Assistant replied");
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("footer");
    meta.className = "meta";
    if (message.role === "assistant") {
      const reasoning = document.createElement("details");
      reasoning.className = "reasoning";
      reasoning.hidden = true;
      reasoning.innerHTML = "<summary>Thoughts</summary><div class=\"reasoning-body\"></div>";
      el.append(reasoning);
    }
    el.append(body, meta);
    // Keep id order whatever order frames arrive in.
    const after = [...bubbles.keys()].filter((id) => id > message.id).sort((a, b) => a - b)[0];
    if (after !== undefined) messagesEl.insertBefore(el, bubbles.get(after));
    else messagesEl.append(el);
    bubbles.set(message.id, el);
    $("empty-state").hidden = true;
  }
  return el;
}

function renderReasoning(el, text, streaming) {
  const details = el.querySelector(".reasoning");
  if (!details || !text) return;
  details.hidden = false;
  details.querySelector("summary").textContent = streaming ? "Thinking…" : "Thoughts";
  details.querySelector(".reasoning-body").textContent = text;
}

function formatCost(value) {
  const cost = Number(value);
  if (!cost) return "$0";
  return cost < 0.01 ? `$${cost.toFixed(4)}` : `$${cost.toFixed(2)}`;
}

function renderMessage(message) {
  messages.set(message.id, message);
  const el = bubbleFor(message);
  el.dataset.status = message.status;
  el.classList.toggle("streaming", message.status === "streaming");
  const body = el.querySelector(".body");
  if (message.role === "user") {
    body.textContent = message.content;
    renderMessageImages(el, message.attachments);
  } else {
    renderInto(body, message.content);
    renderReasoning(el, message.reasoning, message.status === "streaming" && !message.content);
  }
  const meta = el.querySelector(".meta");
  meta.replaceChildren();
  if (message.role !== "assistant" || message.status === "streaming") return;
  const parts = [];
  if (message.model) parts.push(message.model);
  if (message.prompt_tokens != null) {
    parts.push(`${message.prompt_tokens} in`, `${message.cached_tokens || 0} cached`, `${message.completion_tokens} out`);
  }
  if (message.cost_usd != null) parts.push(formatCost(message.cost_usd));
  if (message.ttft_ms != null) parts.push(`first token ${(message.ttft_ms / 1000).toFixed(2)} s`);
  if (message.status === "cancelled") parts.push("stopped");
  if (message.status === "interrupted") parts.push("interrupted");
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(button("Continue from here", "small-button fork-here", () => fork(message.id)));
  meta.append(actions);
  if (parts.length) {
    const span = document.createElement("span");
    span.className = "stats";
    span.textContent = parts.join(" · ");
    meta.append(span);
  }
  if (message.error) {
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = message.error;
    meta.append(error);
  }
}

// As on the owner's page: a reply that shows streaming but has been quiet for a while may have
// ended unheard (its end frame lost while the message bus restarted): ask for the state.
const QUIET_CHECK_MS = 3000;
setInterval(() => {
  if (live && !live.heardAt) live.heardAt = Date.now();
  if (live && socket && !ended && Date.now() - live.heardAt > QUIET_CHECK_MS) {
    live.heardAt = Date.now();
    socket.send({ type: "state" });
  }
}, 1000);

function renderLive() {
  if (!live) return;
  live.heardAt = Date.now();
  const el = bubbleFor({ id: live.id, role: "assistant" });
  el.dataset.status = "streaming";
  el.classList.add("streaming");
  renderInto(el.querySelector(".body"), live.content);
  renderReasoning(el, live.reasoning, !live.content);
  messagesEl.scrollTop = messagesEl.scrollHeight;
}

function removeAfter(id) {
  for (const [otherId, el] of [...bubbles]) {
    if (otherId > id) {
      el.remove();
      bubbles.delete(otherId);
      messages.delete(otherId);
    }
  }
}

function setConnection(text) {
  $("connection").textContent = text;
  $("connection").hidden = !text;
}

function showEnded(text) {
  ended = true;
  live = null;
  setConnection("");
  const box = $("shared-ended");
  box.textContent = `${text} Reload to check again.`;
  box.hidden = false;
  // The view closes: what it showed goes too (a revoke takes effect in open views at once).
  messagesEl.replaceChildren();
  bubbles.clear();
  messages.clear();
  $("fork-last").disabled = true;
  if (socket) socket.close();
}

const handlers = {
  state(frame) {
    if (!frame.reply) {
      if (frame.last) renderMessage(frame.last);
      live = null;
      return;
    }
    live = { id: frame.reply.message_id, seq: frame.reply.seq, content: frame.reply.content, reasoning: frame.reply.reasoning };
    renderLive();
  },
  message(frame) {
    renderMessage(frame.message);
    if (frame.title) $("chat-title").textContent = frame.title;
    if (messages.has(frame.reply.id)) return;
    live = { id: frame.reply.id, seq: 0, content: "", reasoning: "" };
    renderMessage(frame.reply);
  },
  "message.edited"(frame) {
    if (messages.has(frame.reply.id)) return;
    removeAfter(frame.message.id);
    renderMessage(frame.message);
    live = { id: frame.reply.id, seq: 0, content: "", reasoning: "" };
    renderMessage(frame.reply);
  },
  "reply.replaced"(frame) {
    if (messages.has(frame.reply.id)) return;
    removeAfter(frame.old_id - 1);
    live = { id: frame.reply.id, seq: 0, content: "", reasoning: "" };
    renderMessage(frame.reply);
  },
  delta(frame) {
    if (!live || live.id !== frame.message_id) live = { id: frame.message_id, seq: 0, content: "", reasoning: "" };
    if (frame.seq <= live.seq) return;
    if (frame.seq !== live.seq + 1) {
      if (!live.resyncing) socket.send({ type: "state" });
      live.resyncing = true;
      return;
    }
    live.seq = frame.seq;
    if (frame.text) live.content += frame.text;
    if (frame.reasoning) live.reasoning += frame.reasoning;
    renderLive();
  },
  "reply.status"() { if (live) live.heardAt = Date.now(); },
  "reply.end"(frame) {
    if (live && live.id === frame.message.id) live = null;
    renderMessage(frame.message);
    $("announcer").textContent = "Reply finished.";
  },
  "layer.down"() { setConnection("Connection lost, reconnecting…"); },
  "layer.up"() { setConnection(""); socket.send({ type: "state" }); },
  "share.revoked"(frame) { showEnded(frame.message); },
  error(frame) {
    const box = $("composer-error");
    box.textContent = frame.message;
    box.hidden = false;
  },
};

function onStatus(status) {
  if (ended) return;
  if (status === "open") setConnection("");
  else if (status === "reconnecting") setConnection("Connection lost, reconnecting…");
  else if (status === "refused" || status === "gone") showEnded("This conversation is no longer shared with you.");
}

async function fork(messageId) {
  const box = $("composer-error");
  box.hidden = true;
  try {
    const copy = await postForm(data.share.fork_url, messageId ? { message: messageId } : {});
    location.assign(copy.url);
  } catch (failure) {
    box.textContent = failure.message;
    box.hidden = false;
  }
}

setupPrefs();
$("fork-last").addEventListener("click", () => fork(null));
for (const message of data.messages) {
  if (message.status === "streaming") continue; // the socket's state frame brings its text
  renderMessage(message);
}
if (!data.messages.length) $("empty-state").hidden = false;
messagesEl.scrollTop = messagesEl.scrollHeight;
socket = new ConversationSocket(data.conversation.id, {
  path: data.share.socket,
  onFrame: (frame) => { const handler = handlers[frame.type]; if (handler) handler(frame); },
  onStatus,
});
