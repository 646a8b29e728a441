// The chat page: history, the composer, the live reply, and what acts on messages (copy, edit,
// regenerate, retry). The sidebar, settings, theme and dialogs live in their own modules.
import { ComposerImages, renderMessageImages } from "./attachments.js";
import { editWarning, largerBudget, showContext } from "./context.js";
import { confirmDialog } from "./dialogs.js";
import { postForm } from "./http.js";
import { addToList, focusSearch, setDrawer, setListTitle, setupLibrary, showConversation } from "./library.js";
import { setupPrefs } from "./prefs.js";
import { copyText, renderInto } from "./render.js";
import { setupSettings, switchModel } from "./settings.js";
import { ConversationSocket } from "./socket.js";

const data = JSON.parse(document.getElementById("page-data").textContent);
const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const input = $("message");
const sendButton = $("send");
const stopButton = $("stop");
const modelSelect = $("model");
const jumpButton = $("jump-latest");
const csrfToken = document.querySelector("input[name=csrfmiddlewaretoken]").value;

let conversation = data.conversation;
let socket = null;
// The reply being streamed: {id, seq, content, reasoning, el}; seq orders deltas.
let live = null;
let renderScheduled = false;
// A send the server has not confirmed yet: restored into the composer if it is refused.
let pending = null;
const bubbles = new Map();
const messages = new Map(); // id -> the last message dict rendered (for Copy and Edit)
const thoughtFor = new Map(); // reply id -> seconds spent thinking, when seen live

// ---- rendering -------------------------------------------------------------------------------

function button(label, className, onClick, ariaLabel) {
  const el = document.createElement("button");
  el.type = "button";
  el.className = className;
  el.textContent = label;
  if (ariaLabel) el.setAttribute("aria-label", ariaLabel);
  el.addEventListener("click", onClick);
  return el;
}

function bubbleFor(message) {
  let el = bubbles.get(message.id);
  if (!el) {
    el = document.createElement("article");
    el.className = `message ${message.role}`;
    el.dataset.id = message.id;
    el.setAttribute("aria-label", message.role === "user" ? "You said" : "Assistant replied");
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("footer");
    meta.className = "meta";
    if (message.role === "assistant") {
      const reasoning = document.createElement("details");
      reasoning.className = "reasoning";
      reasoning.hidden = true;
      reasoning.innerHTML = "<summary>Thinking…</summary><div class=\"reasoning-body\"></div>";
      el.append(reasoning);
    }
    el.append(body, meta);
    messagesEl.append(el);
    bubbles.set(message.id, el);
    $("empty-state").hidden = true;
  }
  return el;
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
    renderReasoning(el, message.id, message.reasoning, message.status !== "streaming" || Boolean(message.content));
  }
  renderMeta(el, message);
  updateLastActions();
  return el;
}

// Thinking shows live, open; once the answer starts it folds to "Thought for N s".
function renderReasoning(el, id, text, answered) {
  const details = el.querySelector(".reasoning");
  if (!details || !text) return;
  const summary = details.querySelector("summary");
  if (details.hidden) {
    details.hidden = false;
    details.open = !answered;
  }
  details.querySelector(".reasoning-body").textContent = text;
  if (answered) {
    if (details.dataset.state !== "done") {
      details.dataset.state = "done";
      details.open = false;
    }
    const seconds = thoughtFor.get(id);
    summary.textContent = seconds != null ? `Thought for ${seconds} s` : "Thoughts";
  } else {
    summary.textContent = "Thinking…";
  }
}

function formatCost(value) {
  const cost = Number(value);
  if (!cost) return "$0";
  return cost < 0.01 ? `$${cost.toFixed(4)}` : `$${cost.toFixed(2)}`;
}

function renderMeta(el, message) {
  const meta = el.querySelector(".meta");
  meta.replaceChildren();
  const actions = document.createElement("div");
  actions.className = "actions";
  if (message.role === "user") {
    actions.append(button("Edit", "small-button edit", () => startEdit(message.id), "Edit message"));
    meta.append(actions);
    return;
  }
  if (message.status === "streaming") return;
  const parts = [];
  if (message.model) parts.push(message.model);
  if (message.prompt_tokens != null) {
    parts.push(`${message.prompt_tokens} in`, `${message.cached_tokens || 0} cached`, `${message.completion_tokens} out`);
    if (Number(message.cache_saved_usd) > 0) parts.push(`cache saved $${Number(message.cache_saved_usd).toFixed(4)}`);
  }
  if (message.cost_usd != null) parts.push(formatCost(message.cost_usd));
  if (message.ttft_ms != null) parts.push(`first token ${(message.ttft_ms / 1000).toFixed(2)} s`);
  if (message.status === "cancelled") parts.push("stopped");
  if (message.status === "interrupted") parts.push("interrupted");
  if (message.content) {
    actions.append(button("Copy", "small-button copy-message", (event) => copyText(event.currentTarget, messages.get(message.id).content), "Copy message"));
  }
  const failed = ["error", "interrupted", "cancelled"].includes(message.status);
  actions.append(button(failed ? "Retry" : "Regenerate", "small-button regenerate", () => regenerate(message.id)));
  if (message.status === "error" && message.finish_reason === "length" && !message.content) {
    actions.append(button("Retry with a larger budget", "small-button regenerate larger-budget",
      () => socket && socket.send({ type: "regenerate", message_id: message.id, max_output_tokens: largerBudget() })));
  }
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
    error.setAttribute("role", "alert");
    error.textContent = message.error;
    meta.append(error);
  }
}

// Regenerate / Retry exist only on the last reply, and not while anything streams.
function updateLastActions() {
  const articles = messagesEl.querySelectorAll("article.message");
  const last = articles[articles.length - 1];
  for (const regen of messagesEl.querySelectorAll(".regenerate")) {
    regen.hidden = regen.closest("article") !== last || live !== null;
  }
  for (const edit of messagesEl.querySelectorAll(".edit")) edit.disabled = live !== null;
}

function scheduleLiveRender() {
  if (renderScheduled) return;
  renderScheduled = true;
  requestAnimationFrame(() => {
    renderScheduled = false;
    if (!live) return;
    const el = bubbleFor({ id: live.id, role: "assistant" });
    const follow = nearBottom();
    if (live.content && live.reasoning && !thoughtFor.has(live.id)) {
      thoughtFor.set(live.id, Math.max(1, Math.round((performance.now() - live.thinkingSince) / 1000)));
    }
    renderInto(el.querySelector(".body"), live.content);
    renderReasoning(el, live.id, live.reasoning, Boolean(live.content));
    if (follow) scrollToBottom();
    else jumpButton.hidden = false;
  });
}

function nearBottom() {
  return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 80;
}

function scrollToBottom() {
  messagesEl.scrollTop = messagesEl.scrollHeight;
  jumpButton.hidden = true;
}

messagesEl.addEventListener("scroll", () => {
  if (nearBottom()) jumpButton.hidden = true;
  else if (live) jumpButton.hidden = false;
}, { passive: true });
jumpButton.addEventListener("click", () => {
  scrollToBottom();
  input.focus();
});

function startLive(id, seq = 0, content = "", reasoning = "") {
  live = { id, seq, content, reasoning, thinkingSince: performance.now(), heardAt: Date.now() };
  setStreaming(true);
}

// A reply that shows streaming but has been quiet for a while may have ended unheard (its end
// frame lost while the server's message bus was restarting): ask for the state, which carries
// the final form of a reply that ended. Cheap, and only while something shows streaming.
const QUIET_CHECK_MS = 3000;
setInterval(() => {
  if (live && socket && Date.now() - live.heardAt > QUIET_CHECK_MS) {
    live.heardAt = Date.now();
    socket.send({ type: "state" });
  }
}, 1000);

function setStreaming(on) {
  stopButton.hidden = !on;
  sendButton.hidden = on;
  updateLastActions();
}

function showError(message, retry = null) {
  $("composer-error-text").textContent = message || "";
  $("composer-error").hidden = !message;
  const retryButton = $("composer-retry");
  retryButton.hidden = !retry;
  retryButton.onclick = retry;
}

// The conversation's model is retired or gone: say so, and offer its successor in one click
// (the settings are kept; a reply that failed on the old model is retried on the new one).
function showModelGone(info) {
  const box = $("model-gone");
  $("model-gone-text").textContent = info.message;
  const button = $("model-gone-continue");
  button.hidden = !info.successor;
  box.hidden = false;
  if (!info.successor) return;
  button.textContent = `Continue with ${info.successor.name}`;
  if ([...modelSelect.options].some((o) => Number(o.value) === info.successor.id)) {
    modelSelect.value = String(info.successor.id);
    images.setModel();
  }
  button.onclick = async () => {
    try {
      if (conversation) await switchModel(conversation.id, info.successor.id);
    } catch (failure) {
      showError(failure.message);
      return;
    }
    box.hidden = true;
    showError("");
    $("announcer").textContent = `Continuing with ${info.successor.name}.`;
    if (info.retry && messages.has(info.retry)) regenerate(info.retry);
    else if (pending === null && input.value.trim()) send();
  };
}

function setConnection(text) {
  const el = $("connection");
  el.textContent = text;
  el.hidden = !text;
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

// ---- frames from the server ------------------------------------------------------------------

const handlers = {
  state(frame) {
    showContext(frame.context);
    const reply = frame.reply;
    if (!reply) {
      // Nothing is streaming: if a reply ended while we were away, show its final form.
      if (frame.last) renderMessage(frame.last);
      live = null;
      setStreaming(false);
      return;
    }
    startLive(reply.message_id, reply.seq, reply.content, reply.reasoning);
    scheduleLiveRender();
  },
  message(frame) {
    images.sent(frame.message);
    if (pending && frame.client_id === pending.clientId) pending = null;
    renderMessage(frame.message);
    if (frame.title && conversation) setTitle(frame.title);
    const reply = frame.reply;
    // Frames without a seq are delivered at least once: a repeat must not reset a reply that
    // is already streaming or has ended.
    if (messages.has(reply.id)) return;
    if (!live || live.id !== reply.id) startLive(reply.id);
    renderMessage(reply);
    setStreaming(true);
    scrollToBottom();
  },
  "message.edited"(frame) {
    if (messages.has(frame.reply.id)) return; // a repeat
    removeAfter(frame.message.id);
    renderMessage(frame.message);
    startLive(frame.reply.id);
    renderMessage(frame.reply);
    setStreaming(true);
    scrollToBottom();
  },
  delta(frame) {
    if (!live || live.id !== frame.message_id) startLive(frame.message_id);
    live.heardAt = Date.now();
    if (frame.seq <= live.seq) return; // already in the snapshot
    if (frame.seq !== live.seq + 1) {
      // A gap (only after a lost connection): start again from a fresh snapshot, asked once;
      // the "state" frame replaces `live`, and later deltas up to its seq are dropped above.
      if (!live.resyncing) socket.send({ type: "state" });
      live.resyncing = true;
      return;
    }
    live.seq = frame.seq;
    if (frame.text) live.content += frame.text;
    if (frame.reasoning) live.reasoning += frame.reasoning;
    scheduleLiveRender();
  },
  "reply.replaced"(frame) {
    if (messages.has(frame.reply.id)) return; // a repeat
    removeAfter(frame.old_id - 1);
    startLive(frame.reply.id);
    renderMessage(frame.reply);
    scrollToBottom();
  },
  "layer.down"() {
    // The server lost its message bus (Redis): the reply goes on, frames wait until it is back.
    setConnection("Connection lost, reconnecting…");
  },
  "layer.up"() {
    setConnection("");
    socket.send({ type: "state" }); // pick up whatever was missed meanwhile
  },
  "reply.status"(frame) {
    if (live && live.id === frame.message_id) live.heardAt = Date.now();
    const el = bubbleFor({ id: frame.message_id, role: "assistant" });
    el.querySelector(".meta").textContent = frame.text;
  },
  "reply.end"(frame) {
    showContext(frame.context);
    const message = frame.message;
    if (live && live.id === message.id) live = null;
    const follow = nearBottom();
    renderMessage(message);
    setStreaming(false);
    $("announcer").textContent = message.status === "complete"
      ? "Reply finished."
      : message.status === "cancelled" ? "Reply stopped." : `Reply ended: ${message.error || message.status}.`;
    if (follow) scrollToBottom();
  },
  error(frame) {
    if (frame.code === "model_not_found" && frame.successor) {
      showModelGone({ message: "The provider no longer serves this model.", successor: frame.successor, retry: frame.message_id });
    }
    if (frame.code === "model_retired") {
      // Refused before anything was written: the message names the model to continue with.
      const successor = data.models.find((m) => frame.message.includes(`Continue with ${m.name}.`));
      if (successor) showModelGone({ message: frame.message.replace(`Continue with ${successor.name}.`, ""), successor });
    }
    // A reply's own failure is shown in its bubble (reply.end); others by the composer.
    if (frame.message_id) return;
    images.restore(); // a refused send keeps its images in the composer
    if (pending) {
      const refused = pending;
      pending = null;
      if (!input.value) input.value = refused.text;
      autosize();
      const retryable = !["empty", "too_long", "model_unavailable"].includes(frame.code);
      showError(frame.message, retryable ? () => { showError(""); send(); } : null);
    } else {
      showError(frame.message);
    }
  },
};

function onFrame(frame) {
  const handler = handlers[frame.type];
  if (handler) handler(frame);
}

function onStatus(status) {
  if (status === "open") setConnection("");
  else if (status === "reconnecting") setConnection("Connection lost, reconnecting…");
  else if (status === "refused") setConnection("This conversation is not available. Reload the page.");
}

function connect() {
  socket = new ConversationSocket(conversation.id, { onFrame, onStatus });
}

// ---- acting on messages ----------------------------------------------------------------------

function regenerate(id) {
  if (!socket) return;
  socket.send({ type: "regenerate", message_id: id });
}

function startEdit(id) {
  const el = bubbles.get(id);
  const message = messages.get(id);
  if (!el || !message || el.querySelector(".edit-form")) return;
  const body = el.querySelector(".body");
  const form = document.createElement("form");
  form.className = "edit-form";
  const area = document.createElement("textarea");
  area.value = message.content;
  area.rows = Math.min(10, message.content.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit message text");
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "primary";
  save.textContent = "Save and send";
  const cancel = button("Cancel", "", () => { form.remove(); body.hidden = false; });
  const row = document.createElement("div");
  row.className = "dialog-actions";
  row.append(cancel, save);
  form.append(area, row);
  body.hidden = true;
  body.after(form);
  area.focus();
  area.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { event.stopPropagation(); cancel.click(); }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = area.value;
    if (!text.trim()) return;
    const later = [...bubbles.keys()].filter((other) => other > id).length;
    if (later) {
      const sure = await confirmDialog({
        title: "Edit and resend?",
        body: `The ${later === 1 ? "reply" : `${later} later messages`} after this message will be replaced. ` +
          (editWarning() || "The provider's prefix cache is lost from this point, so the next reply re-reads the conversation from here at the full input price."),
        ok: "Replace and send",
      });
      if (!sure) return;
    }
    form.remove();
    body.hidden = false;
    socket.send({ type: "edit", message_id: id, text });
  });
}

// ---- the composer ----------------------------------------------------------------------------

function setTitle(title) {
  conversation.title = title;
  $("chat-title").textContent = title || "New chat";
  document.title = `${title || "New chat"} · Kimi Chat`;
  setListTitle(conversation.id, title);
}

async function createConversation() {
  const result = await postForm("/api/conversations/", { model: modelSelect.value }, "Could not start a conversation.");
  conversation = { id: result.id, title: "" };
  history.replaceState(null, "", result.url);
  addToList(conversation, result.url);
  showConversation(conversation);
  connect();
  return conversation;
}

async function ensureConversation() {
  return conversation || createConversation();
}

async function send() {
  const text = input.value;
  if ((!text.trim() && images.isEmpty()) || !stopButton.hidden) return;
  showError("");
  let attachments;
  try {
    attachments = await images.take(); // uploads started when added: usually already done
    await ensureConversation();
  } catch (error) {
    images.restore();
    showError(error.message, () => { showError(""); send(); });
    return;
  }
  pending = { text, clientId: `c${Date.now()}${Math.random().toString(16).slice(2, 8)}` };
  socket.send({ type: "send", text, model: Number(modelSelect.value), attachments, client_id: pending.clientId });
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

// ---- keyboard --------------------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  const mod = event.ctrlKey || event.metaKey;
  if (mod && !event.shiftKey && event.key.toLowerCase() === "k") {
    event.preventDefault();
    focusSearch();
  } else if (mod && event.shiftKey && event.key.toLowerCase() === "o") {
    event.preventDefault();
    location.assign("/");
  } else if (event.key === "Escape" && !document.querySelector("dialog[open]")) {
    if (!stopButton.hidden) {
      event.preventDefault();
      stopButton.click();
    } else if ($("layout").classList.contains("drawer-open")) {
      setDrawer(false);
    }
  }
});

// ---- start -----------------------------------------------------------------------------------

setupPrefs();
setupLibrary({
  getConversation: () => conversation,
  onRenamed: (title) => setTitle(title),
});
setupSettings({
  models: data.models,
  settings: data.settings,
  ensureConversation,
  hasMessages: () => bubbles.size > 0,
  onSaved: () => { $("announcer").textContent = "Settings saved."; },
});
showConversation(conversation);
showContext(data.context);
if (data.model_gone) showModelGone(data.model_gone);
for (const message of data.messages) renderMessage(message);
scrollToBottom();
if (conversation) connect();
sendButton.disabled = false; // enabled once the page can actually send
input.focus();
