// Images in the composer and in sent messages.
//
// Three ways in: the "Attach image" button (a real <input type="file" multiple accept="image/*">),
// drag-and-drop onto the chat, and paste. An image stays in the browser until Send: clicking its
// thumbnail opens the editor (editor.js) to crop, mark up and redact it, and only then, at Send,
// is one file uploaded per image (XMLHttpRequest, for progress): the edited PNG when it was
// edited, never its original. Until then the tray shows the size that will be sent, computed by
// the server's own sizing rule, and the file's bytes; once uploaded, the server's exact figures
// ("1920×1080 → 1568×882, 412 KB"). Uploads are not tied to a conversation: the send binds them.
import { openEditor } from "./editor.js";

const UPLOAD_URL = "/api/attachments/";
const PDF_PREVIEW_URL = "/api/attachments/pdf-preview/";
// images.py: the short side is kept at least this long, tall images are tiled instead.
const MIN_SHORT_SIDE = 1080;
const DEFAULT_MAX_EDGE = 3000;

// The size the server will send (images.py `_plan`), so the tray can say it before any upload.
export function plannedSize(width, height, maxEdge = DEFAULT_MAX_EDGE) {
  const long = Math.max(width, height);
  const short = Math.min(width, height);
  if (long <= maxEdge) return `${width}×${height}`;
  const fit = maxEdge / long;
  if (Math.round(short * fit) >= Math.min(short, MIN_SHORT_SIDE, maxEdge)) {
    return `${Math.max(1, Math.round(width * fit))}×${Math.max(1, Math.round(height * fit))}`;
  }
  return `tiles of up to ${Math.min(short, maxEdge)}×${maxEdge}`;
}

function isVideo(file) {
  return (file.type || "").startsWith("video/") || /\.(mp4|m4v|mov|webm)$/i.test(file.name || "");
}

function isPdf(file) {
  return file.type === "application/pdf" || /\.pdf$/i.test(file.name || "");
}

function imageSize(blob) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(blob);
    const image = new Image();
    image.onload = () => { URL.revokeObjectURL(url); resolve([image.naturalWidth, image.naturalHeight]); };
    image.onerror = () => { URL.revokeObjectURL(url); resolve(null); }; // e.g. HEIC: the server reads it
    image.src = url;
  });
}

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
    const label = image.recording ? `screen recording, ${image.recording.seconds.toFixed(1)} s` : image.label;
    const caption = el("figcaption", { class: "muted small" }, label);
    if (image.note) caption.title = image.note;
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
      this.button.title = `Attach images, PDFs or screen recordings (or paste / drop them). ${who}`;
    } else {
      this.button.disabled = true;
      this.note.textContent = `${model.name} cannot see images. ${who}`;
      this.note.hidden = false;
      this.button.title = this.note.textContent;
    }
    this.refreshWarning();
  }

  takesVideo() {
    return Boolean(this.currentModel()?.video);
  }

  refreshWarning() {
    for (const item of this.items) if (item.kind === "recording" && item.recording) this.describeRecording(item);
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
    for (const file of files) {
      if (isPdf(file)) this.addPdf(file);
      else if (isVideo(file)) this.addRecording(file);
      else this.addOne(file);
    }
  }

  // The tray entry every kind shares: thumbnail (or page strip), name, label, progress, error.
  itemNode(item, thumb) {
    const { name } = item;
    const progress = el("progress", { max: 100, value: 0, "aria-label": `Uploading ${name}`, hidden: true });
    const label = el("span", { class: "attachment-label" });
    const error = el("span", { class: "attachment-error", role: "alert" });
    const remove = el("button", { type: "button", class: "attachment-remove", "aria-label": `Remove ${name}`, title: `Remove ${name}` }, "×");
    remove.addEventListener("click", () => this.remove(item));
    const info = el("div", { class: "attachment-info" }, el("span", { class: "attachment-name" }, name), label, progress, error);
    const node = el("div", { role: "listitem", class: `attachment attachment-${item.kind}`, "data-state": item.state }, thumb, info, remove);
    Object.assign(item, { node, info, progress, label, error });
    this.items.push(item);
    this.tray.append(node);
    this.tray.hidden = false;
  }

  setState(item, state) {
    item.state = state;
    item.node.dataset.state = state;
  }

  addOne(file) {
    const name = file.name || "pasted image";
    const item = { key: ++this.counter, kind: "image", file, name, state: "local", ids: [], edit: null };
    const preview = URL.createObjectURL(file);
    const img = el("img", { alt: "", src: preview });
    img.addEventListener("error", () => img.removeAttribute("src")); // e.g. HEIC in Chromium
    const thumb = el("button", { type: "button", class: "attachment-thumb", "aria-label": `Edit ${name}`, title: `Edit ${name}: crop, mark up, redact` }, img);
    thumb.addEventListener("click", () => this.edit(item));
    Object.assign(item, { img, thumb, preview });
    this.itemNode(item, thumb);
    this.describeLocal(item);
  }

  // Before upload: the pixels the server will send and the bytes that will leave the browser.
  async describeLocal(item) {
    const blob = item.edit?.blob || item.file;
    const size = await imageSize(blob);
    if (item.state !== "local") return;
    const maxEdge = this.currentModel()?.max_image_edge || DEFAULT_MAX_EDGE;
    const pixels = size ? `${size[0]}×${size[1]} → ${plannedSize(size[0], size[1], maxEdge)}, ` : "";
    const edited = item.edit?.blob ? "edited · " : "";
    item.label.textContent = `${edited}${pixels}≈ ${formatBytes(blob.size)} · uploads when sent`;
  }

  async edit(item) {
    if (item.state !== "local") return; // uploaded: what was sent is what the server has
    let result;
    try {
      result = await openEditor({ file: item.file, state: item.edit?.state, name: item.name });
    } catch (error) {
      this.onError(error.message);
      return;
    }
    if (!result || item.state !== "local") return;
    // The layers stay editable until the send; no layers left = the image as it was added.
    item.edit = { blob: result.blob, state: result.state, note: result.note };
    URL.revokeObjectURL(item.preview);
    item.preview = URL.createObjectURL(result.blob || item.file);
    item.img.src = item.preview;
    item.node.dataset.edited = result.blob ? "true" : "false";
    this.describeLocal(item);
  }

  // One multipart POST with upload progress; resolves with [status, parsed JSON] (or null if
  // cancelled). Every failure becomes a message for the user.
  post(item, url, body) {
    const xhr = new XMLHttpRequest();
    item.xhr = xhr;
    item.progress.hidden = false;
    item.progress.value = 0;
    return new Promise((resolve) => {
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) item.progress.value = Math.round((event.loaded / event.total) * 100);
      });
      xhr.addEventListener("load", () => {
        item.progress.hidden = true;
        let result;
        try {
          result = JSON.parse(xhr.responseText);
        } catch {
          result = { message: `The upload failed (HTTP ${xhr.status}).` };
        }
        resolve([xhr.status, result]);
      });
      xhr.addEventListener("error", () => {
        item.progress.hidden = true;
        resolve([0, { message: "The upload failed: the connection was lost. Remove the file and try again." }]);
      });
      xhr.addEventListener("abort", () => resolve(null));
      xhr.open("POST", url);
      xhr.setRequestHeader("X-CSRFToken", this.csrfToken);
      xhr.send(body);
    });
  }

  form(file, name) {
    const body = new FormData();
    body.append("file", file, name);
    const conversationId = this.getConversationId();
    if (conversationId) body.append("conversation", conversationId);
    body.append("model", this.getModelId());
    return body;
  }

  upload(item) {
    this.setState(item, "uploading");
    item.label.textContent = "";
    let body;
    // The edited image replaces the original entirely: the original is never sent.
    if (item.edit?.blob) {
      const base = item.name.replace(/\.[^.]*$/, "") || "image";
      body = this.form(item.edit.blob, `${base}.png`);
      if (item.edit.note) body.append("note", item.edit.note);
    } else {
      body = this.form(item.file, item.name);
    }
    item.done = this.post(item, UPLOAD_URL, body).then((answer) => {
      if (!answer) return;
      const [status, result] = answer;
      if (status === 201) this.uploaded(item, result);
      else this.failed(item, result.message || `The upload failed (HTTP ${status}).`);
    });
  }

  uploaded(item, result) {
    this.setState(item, "done");
    item.ids = [result.id];
    item.node.dataset.id = result.id;
    item.label.textContent = result.label;
    item.img.src = result.thumbnail_url; // what will be sent: oriented, any format shown
    item.thumb.disabled = true;
    URL.revokeObjectURL(item.preview);
  }

  failed(item, message) {
    this.setState(item, "failed");
    item.progress.hidden = true;
    item.error.textContent = message;
  }

  // -- PDFs: pick pages, each sent as an image --

  addPdf(file) {
    const name = file.name || "document.pdf";
    const item = { key: ++this.counter, kind: "pdf", file, name, state: "previewing", ids: [], pages: [], picked: new Set() };
    const strip = el("div", { class: "pdf-pages", role: "group", "aria-label": `Pages of ${name}` });
    item.strip = strip;
    this.itemNode(item, strip);
    item.label.textContent = "Reading pages…";
    item.done = this.post(item, PDF_PREVIEW_URL, this.form(file, name)).then((answer) => {
      if (!answer) return;
      const [status, result] = answer;
      if (status !== 200) {
        this.failed(item, result.message || `The PDF could not be read (HTTP ${status}).`);
        return;
      }
      this.setState(item, "ready");
      item.pages = result.pages;
      item.max = result.max_pages;
      item.picked = new Set(result.default_pages);
      for (const page of result.pages) {
        const content = page.thumbnail
          ? el("img", { src: page.thumbnail, alt: "" })
          : el("span", { class: "pdf-page-blank" });
        const toggle = el("button", { type: "button", class: "pdf-page", "aria-label": `Page ${page.number}`, "aria-pressed": "false", title: `Page ${page.number}: sent as ${page.send_size}` }, content, el("span", {}, String(page.number)));
        toggle.addEventListener("click", () => this.togglePage(item, page.number));
        page.toggle = toggle;
        strip.append(toggle);
      }
      this.describePdf(item);
    });
  }

  togglePage(item, number) {
    if (item.state !== "ready") return;
    if (item.picked.has(number)) item.picked.delete(number);
    else if (item.picked.size < item.max) item.picked.add(number);
    this.describePdf(item);
  }

  pickedPages(item) {
    return [...item.picked].sort((a, b) => a - b);
  }

  describePdf(item) {
    const picked = this.pickedPages(item);
    for (const page of item.pages) {
      page.toggle.setAttribute("aria-pressed", String(item.picked.has(page.number)));
      page.toggle.disabled = !item.picked.has(page.number) && item.picked.size >= item.max;
    }
    const sizes = [...new Set(picked.map((n) => item.pages[n - 1].send_size))];
    item.label.textContent = picked.length
      ? `${picked.length} of ${item.pages.length} pages (${picked.join(", ")}) · each sent as an image: ${sizes.join(", ")} · up to ${item.max}`
      : `Pick the pages to send (up to ${item.max}) or remove the PDF.`;
  }

  uploadPdf(item) {
    const pages = this.pickedPages(item);
    this.setState(item, "uploading");
    const body = this.form(item.file, item.name);
    body.append("pages", pages.join(","));
    item.label.textContent = `Rendering ${pages.length === 1 ? "page" : "pages"} ${pages.join(", ")}…`;
    item.done = this.post(item, UPLOAD_URL, body).then((answer) => {
      if (!answer) return;
      const [status, result] = answer;
      if (status !== 201) {
        this.failed(item, result.message || `The PDF could not be attached (HTTP ${status}).`);
        return;
      }
      this.setState(item, "done");
      item.ids = result.attachments.map((a) => a.id);
      item.label.textContent = result.attachments.map((a) => a.label).join(" · ");
    });
  }

  // -- screen recordings: normalised on the server at once; sent as video or as key frames --

  addRecording(file) {
    const name = file.name || "recording";
    const item = { key: ++this.counter, kind: "recording", file, name, state: "uploading", ids: [] };
    const img = el("img", { alt: "" });
    const thumb = el("div", { class: "attachment-thumb" }, img);
    item.img = img;
    this.itemNode(item, thumb);
    item.label.textContent = `${formatBytes(file.size)} · preparing the recording…`;
    item.done = this.post(item, UPLOAD_URL, this.form(file, name)).then((answer) => {
      if (!answer) return;
      const [status, result] = answer;
      if (status !== 201) {
        this.failed(item, result.message || `The recording could not be attached (HTTP ${status}).`);
        return;
      }
      this.setState(item, "done");
      item.ids = [result.id];
      item.recording = result.recording;
      img.src = result.thumbnail_url;
      this.describeRecording(item);
    });
  }

  // The composer says which of the two will happen before sending.
  describeRecording(item) {
    const model = this.currentModel();
    const recording = item.recording;
    item.node.dataset.sendAs = this.takesVideo() ? "video" : "frames";
    item.label.textContent = this.takesVideo()
      ? `Sent as video: ${recording.as_video}`
      : `Sent as ${recording.as_frames}` + (model ? ` (${model.name} takes no video)` : "");
  }

  remove(item) {
    if (item.state === "uploading" || item.state === "previewing") item.xhr?.abort();
    if (item.state === "done") {
      for (const id of item.ids) {
        fetch(`${UPLOAD_URL}${id}/`, {
          method: "DELETE",
          headers: { "X-CSRFToken": this.csrfToken },
          credentials: "same-origin",
        }).catch(() => {}); // unsent uploads also expire on the server
      }
    }
    if (item.preview) URL.revokeObjectURL(item.preview);
    item.node.remove();
    this.items = this.items.filter((other) => other !== item);
    this.tray.hidden = !this.items.length;
    if (!this.items.length) this.setModel();
  }

  // -- sending --

  isEmpty() {
    return !this.items.some((item) => ["local", "previewing", "ready", "uploading", "done"].includes(item.state));
  }

  // Uploads what is still only in the browser (images, picked PDF pages), waits for every
  // upload; refuses while a failed one is in the tray, so a message never goes out without a
  // file the user meant to send.
  async take() {
    const refuse = (item) => new Error(`${item.name}: ${item.error.textContent} Remove it to send.`);
    const failedBefore = this.items.find((item) => item.state === "failed");
    if (failedBefore) throw refuse(failedBefore);
    await Promise.all(this.items.filter((item) => item.state === "previewing").map((item) => item.done));
    for (const item of this.items) {
      if (item.state === "local") this.upload(item);
      else if (item.state === "ready") {
        if (!item.picked.size) throw new Error(`${item.name}: pick at least one page, or remove the PDF.`);
        this.uploadPdf(item);
      }
    }
    await Promise.all(this.items.map((item) => item.done));
    const failed = this.items.find((item) => item.state === "failed");
    if (failed) throw refuse(failed);
    const ready = this.items.filter((item) => item.state === "done");
    for (const item of ready) this.setState(item, "sending");
    return ready.flatMap((item) => item.ids);
  }

  // The server refused the send: the files stay in the tray, ready to try again.
  restore() {
    for (const item of this.items) {
      if (item.state === "sending") this.setState(item, "done");
    }
  }

  // The user's message was saved with these files: clear them from the composer.
  sent(message) {
    const ids = new Set((message.attachments || []).map((a) => a.id));
    for (const item of [...this.items]) {
      if (item.ids.length && item.ids.every((id) => ids.has(id))) {
        item.state = "sent";
        this.remove(item);
      }
    }
  }
}
