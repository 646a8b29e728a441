// Images in the composer and in sent messages.
//
// Three ways in: the "Attach image" button (a real <input type="file" multiple accept="image/*">),
// drag-and-drop onto the chat, and paste. Each file uploads at once (XMLHttpRequest, for upload
// progress) to POST /api/attachments/, so Send only has to name the ids. The server detects the
// type from the content and answers with what will actually be sent ("1920×1080 → 1568×882,
// 412 KB"), shown under the thumbnail. Uploads are not tied to a conversation: the send binds them.

const UPLOAD_URL = "/api/attachments/";

function formatBytes(n) {
  if (n < 1024 * 1024) return `${Math.max(1, Math.round(n / 1024))} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key in node && !key.includes("-")) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child != null));
  return node;
}

// ---- sent messages ---------------------------------------------------------------------------

// Thumbnails in a message bubble (before its text); a click opens the full image.
export function renderMessageImages(bubble, attachments) {
  bubble.querySelector(".message-images")?.remove();
  if (!attachments || !attachments.length) return;
  const list = el("div", { class: "message-images" });
  for (const image of attachments) {
    const link = el(
      "a",
      { href: image.url, target: "_blank", rel: "noopener", class: "message-image" },
      el("img", { src: image.thumbnail_url, alt: image.name, loading: "lazy" }),
    );
    const caption = el("figcaption", { class: "muted small" }, image.label);
    if (image.part_urls && image.part_urls.length > 1) {
      caption.append(" · ");
      image.part_urls.forEach((url, index) => {
        if (index) caption.append(" ");
        caption.append(el("a", { href: url, target: "_blank", rel: "noopener" }, `tile ${index + 1}`));
      });
    }
    list.append(el("figure", {}, link, caption));
  }
  const body = bubble.querySelector(".body");
  bubble.insertBefore(list, body);
}

// ---- the composer ----------------------------------------------------------------------------

export class ComposerImages {
  // options: {tray, button, input, note, dropTarget, csrfToken, models, getModelId,
  //           getConversationId, onError}
  constructor(options) {
    Object.assign(this, options);
    this.items = []; // {key, file, name, state: uploading|done|failed|sending, id, xhr, node, ...}
    this.counter = 0;
    this.button.addEventListener("click", () => this.input.click());
    this.input.addEventListener("change", () => {
      this.add([...this.input.files]);
      this.input.value = ""; // choosing the same file again still fires "change"
    });
    document.addEventListener("paste", (event) => this.onPaste(event));
    this.dropTarget.addEventListener("dragover", (event) => this.onDragOver(event));
    this.dropTarget.addEventListener("dragleave", (event) => {
      if (!this.dropTarget.contains(event.relatedTarget)) this.dropTarget.classList.remove("dropping");
    });
    this.dropTarget.addEventListener("drop", (event) => this.onDrop(event));
    this.setModel(this.getModelId());
  }

  // -- which models can see --

  visionNames() {
    return this.models.filter((m) => m.vision).map((m) => m.name);
  }

  currentModel() {
    const id = String(this.getModelId());
    return this.models.find((m) => String(m.id) === id) || null;
  }

  canSee() {
    const model = this.currentModel();
    return !model || model.vision;
  }

  setModel() {
    const model = this.currentModel();
    const names = this.visionNames();
    const who = names.length ? `Models that can see images: ${names.join(", ")}.` : "No model here can see images.";
    if (this.canSee()) {
      this.button.disabled = false;
      // Still the button's description (aria-describedby reads hidden text), just not shown.
      this.note.textContent = who;
      this.note.hidden = true;
      this.button.title = `Attach images (or paste / drop them). ${who}`;
    } else {
      this.button.disabled = true;
      this.note.textContent = `${model.name} cannot see images. ${who}`;
      this.note.hidden = false;
      this.button.title = this.note.textContent;
    }
    this.refreshWarning();
  }

  refreshWarning() {
    // Images already in the tray but a text-only model picked: say so before Send refuses.
    const model = this.currentModel();
    if (!this.canSee() && this.items.length) {
      this.note.textContent = `${model.name} cannot see images: remove them or pick another model. ` +
        `Models that can: ${this.visionNames().join(", ")}.`;
    }
  }

  // -- ways in --

  onPaste(event) {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return; // plain text pastes go on as usual
    event.preventDefault();
    this.add(files);
  }

  onDragOver(event) {
    if (!event.dataTransfer || ![...event.dataTransfer.types].includes("Files")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = this.canSee() ? "copy" : "none";
    this.dropTarget.classList.add("dropping");
  }

  onDrop(event) {
    this.dropTarget.classList.remove("dropping");
    const files = [...(event.dataTransfer?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    this.add(files);
  }

  add(files) {
    if (!files.length) return;
    if (!this.canSee()) {
      this.onError(this.note.textContent || "This model cannot see images.");
      return;
    }
    this.onError("");
    for (const file of files) this.addOne(file);
  }

  addOne(file) {
    const name = file.name || "pasted image";
    const item = { key: ++this.counter, file, name, state: "uploading", id: null };
    const preview = URL.createObjectURL(file);
    const img = el("img", { alt: "", src: preview });
    img.addEventListener("error", () => img.removeAttribute("src")); // e.g. HEIC in Chromium
    const progress = el("progress", { max: 100, value: 0, "aria-label": `Uploading ${name}` });
    const label = el("span", { class: "attachment-label" });
    const error = el("span", { class: "attachment-error", role: "alert" });
    const remove = el("button", { type: "button", class: "attachment-remove", "aria-label": `Remove ${name}`, title: `Remove ${name}` }, "×");
    remove.addEventListener("click", () => this.remove(item));
    const node = el(
      "div",
      { role: "listitem", class: "attachment", "data-state": "uploading" },
      el("div", { class: "attachment-thumb" }, img),
      el(
        "div",
        { class: "attachment-info" },
        el("span", { class: "attachment-name" }, name),
        el("span", { class: "attachment-size muted" }, formatBytes(file.size)),
        progress,
        label,
        error,
      ),
      remove,
    );
    Object.assign(item, { node, img, progress, label, error, preview });
    this.items.push(item);
    this.tray.append(node);
    this.tray.hidden = false;
    this.upload(item);
  }

  upload(item) {
    const body = new FormData();
    body.append("file", item.file, item.name);
    const conversationId = this.getConversationId();
    if (conversationId) body.append("conversation", conversationId);
    body.append("model", this.getModelId());
    const xhr = new XMLHttpRequest();
    item.xhr = xhr;
    item.done = new Promise((resolve) => {
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) item.progress.value = Math.round((event.loaded / event.total) * 100);
      });
      xhr.addEventListener("load", () => {
        let result = {};
        try {
          result = JSON.parse(xhr.responseText);
        } catch {
          result = { message: `The upload failed (HTTP ${xhr.status}).` };
        }
        if (xhr.status === 201) this.uploaded(item, result);
        else this.failed(item, result.message || `The upload failed (HTTP ${xhr.status}).`);
        resolve();
      });
      xhr.addEventListener("error", () => {
        this.failed(item, "The upload failed: the connection was lost. Remove the image and try again.");
        resolve();
      });
      xhr.addEventListener("abort", () => resolve());
    });
    xhr.open("POST", UPLOAD_URL);
    xhr.setRequestHeader("X-CSRFToken", this.csrfToken);
    xhr.send(body);
  }

  uploaded(item, result) {
    item.state = "done";
    item.id = result.id;
    item.node.dataset.state = "done";
    item.node.dataset.id = result.id;
    item.progress.hidden = true;
    item.label.textContent = result.label;
    item.img.src = result.thumbnail_url; // what will be sent: oriented, any format shown
    URL.revokeObjectURL(item.preview);
  }

  failed(item, message) {
    item.state = "failed";
    item.node.dataset.state = "failed";
    item.progress.hidden = true;
    item.error.textContent = message;
  }

  remove(item) {
    if (item.state === "uploading") item.xhr?.abort();
    if (item.id && item.state === "done") {
      fetch(`${UPLOAD_URL}${item.id}/`, {
        method: "DELETE",
        headers: { "X-CSRFToken": this.csrfToken },
        credentials: "same-origin",
      }).catch(() => {}); // unsent uploads also expire on the server
    }
    URL.revokeObjectURL(item.preview);
    item.node.remove();
    this.items = this.items.filter((other) => other !== item);
    this.tray.hidden = !this.items.length;
    if (!this.items.length) this.setModel();
  }

  // -- sending --

  isEmpty() {
    return !this.items.some((item) => item.state === "uploading" || item.state === "done");
  }

  // Waits for uploads still running; refuses while a failed one is in the tray.
  async take() {
    await Promise.all(this.items.map((item) => item.done));
    const failed = this.items.find((item) => item.state === "failed");
    if (failed) throw new Error(`${failed.name}: ${failed.error.textContent} Remove it to send.`);
    const ready = this.items.filter((item) => item.state === "done");
    for (const item of ready) {
      item.state = "sending";
      item.node.dataset.state = "sending";
    }
    return ready.map((item) => item.id);
  }

  // The server refused the send: the images stay in the tray, ready to try again.
  restore() {
    for (const item of this.items) {
      if (item.state === "sending") {
        item.state = "done";
        item.node.dataset.state = "done";
      }
    }
  }

  // The user's message was saved with these images: clear them from the composer.
  sent(message) {
    const ids = new Set((message.attachments || []).map((a) => a.id));
    for (const item of [...this.items]) {
      if (ids.has(item.id)) {
        item.state = "sent";
        this.remove(item);
      }
    }
  }
}
