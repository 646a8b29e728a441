// The screenshot editor: crop, mark up and redact an image in the browser, before it is uploaded.
//
// openEditor({file, state, name}) shows a modal <dialog> with a canvas and resolves to
// {blob, state, note, width, height} (Done) or null (Cancel). `state` holds the edit history, so
// "Edit" again reopens with every layer intact; the original file never leaves this module:
// the composer uploads only the returned blob, a PNG drawn from scratch by the canvas (no
// metadata), in which every redaction is an opaque box painted over everything else.
//
// Coordinates are in the original image's pixels. Plain canvas 2D, no library: the shapes are
// few and simple, and a vendored drawing library would weigh more than this whole file.

const TOOLS = [
  { id: "rect", key: "r", label: "Rectangle" },
  { id: "arrow", key: "a", label: "Arrow" },
  { id: "highlight", key: "h", label: "Highlighter" },
  { id: "marker", key: "m", label: "Number marker" },
  { id: "text", key: "t", label: "Text label" },
  { id: "redact", key: "x", label: "Redact" },
  { id: "crop", key: "c", label: "Crop" },
];
const COLOUR = "#e5243b";
const HIGHLIGHT = "rgba(255, 214, 0, 0.38)";
const REDACT = "#000000";
const MIN_BOX = 3; // px: a click without a drag makes no box
const TEXT_MAX = 60;

let dialog = null;
let ui = null;

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

function build() {
  const tools = el("div", { class: "editor-tools", role: "toolbar", "aria-label": "Editing tools" });
  const buttons = new Map();
  for (const tool of TOOLS) {
    const button = el(
      "button",
      { type: "button", class: `editor-tool tool-${tool.id}`, title: `${tool.label} (${tool.key.toUpperCase()})`, "aria-pressed": "false" },
      tool.label,
    );
    button.dataset.tool = tool.id;
    buttons.set(tool.id, button);
    tools.append(button);
  }
  const text = el("input", { type: "text", class: "editor-text", maxLength: TEXT_MAX, placeholder: "Label text", "aria-label": "Label text", hidden: true });
  const undo = el("button", { type: "button", title: "Undo (Ctrl+Z)" }, "Undo");
  const redo = el("button", { type: "button", title: "Redo (Ctrl+Shift+Z)" }, "Redo");
  tools.append(text, undo, redo);
  const canvas = el("canvas", { class: "editor-canvas", "aria-label": "Image being edited", role: "img" });
  const hint = el("p", { class: "muted small editor-hint" });
  const cancel = el("button", { type: "button" }, "Cancel");
  const done = el("button", { type: "button", class: "primary" }, "Done");
  const title = el("h2", { id: "editor-title" }, "Edit image");
  dialog = el(
    "dialog",
    { class: "dialog editor-dialog", "aria-labelledby": "editor-title" },
    title,
    tools,
    el("div", { class: "editor-stage" }, canvas),
    hint,
    el("div", { class: "dialog-actions" }, cancel, done),
  );
  document.body.append(dialog);
  ui = { title, tools, buttons, text, undo, redo, canvas, hint, cancel, done };
}

// ---- the session -----------------------------------------------------------------------------

class Session {
  constructor(image, state) {
    this.image = image;
    this.ops = state ? [...state.ops] : [];
    this.undone = state ? [...state.undone] : [];
    this.tool = "rect";
    this.draft = null;
  }

  get state() {
    return { ops: [...this.ops], undone: [...this.undone] };
  }

  crop() {
    const crops = this.ops.filter((op) => op.type === "crop");
    const last = crops[crops.length - 1];
    return last ? last.box : { x: 0, y: 0, w: this.image.naturalWidth, h: this.image.naturalHeight };
  }

  push(op) {
    this.ops.push(op);
    this.undone = [];
  }

  undo() {
    if (this.ops.length) this.undone.push(this.ops.pop());
  }

  redo() {
    if (this.undone.length) this.ops.push(this.undone.pop());
  }

  markerCount() {
    return this.ops.filter((op) => op.type === "marker").length;
  }
}

function normalise(a, b) {
  return { x: Math.min(a.x, b.x), y: Math.min(a.y, b.y), w: Math.abs(a.x - b.x), h: Math.abs(a.y - b.y) };
}

function clampBox(box, width, height) {
  const x = Math.max(0, Math.min(width, box.x));
  const y = Math.max(0, Math.min(height, box.y));
  return { x, y, w: Math.max(0, Math.min(width, box.x + box.w) - x), h: Math.max(0, Math.min(height, box.y + box.h) - y) };
}

// ---- drawing ---------------------------------------------------------------------------------

function lineWidth(width, height) {
  return Math.max(2, Math.round(Math.max(width, height) / 400));
}

function drawOp(ctx, op, scale, number) {
  ctx.save();
  ctx.lineWidth = scale * 1.5;
  ctx.strokeStyle = COLOUR;
  ctx.fillStyle = COLOUR;
  ctx.lineJoin = "round";
  ctx.lineCap = "round";
  if (op.type === "rect") {
    ctx.strokeRect(op.box.x, op.box.y, op.box.w, op.box.h);
  } else if (op.type === "highlight") {
    ctx.fillStyle = HIGHLIGHT;
    ctx.fillRect(op.box.x, op.box.y, op.box.w, op.box.h);
  } else if (op.type === "arrow") {
    const { x1, y1, x2, y2 } = op;
    const angle = Math.atan2(y2 - y1, x2 - x1);
    const head = scale * 7;
    ctx.beginPath();
    ctx.moveTo(x1, y1);
    ctx.lineTo(x2, y2);
    ctx.stroke();
    ctx.beginPath();
    ctx.moveTo(x2, y2);
    ctx.lineTo(x2 - head * Math.cos(angle - 0.45), y2 - head * Math.sin(angle - 0.45));
    ctx.lineTo(x2 - head * Math.cos(angle + 0.45), y2 - head * Math.sin(angle + 0.45));
    ctx.closePath();
    ctx.fill();
  } else if (op.type === "marker") {
    const radius = scale * 7;
    ctx.beginPath();
    ctx.arc(op.x, op.y, radius, 0, Math.PI * 2);
    ctx.fill();
    ctx.fillStyle = "#ffffff";
    ctx.font = `bold ${Math.round(radius * 1.25)}px system-ui, sans-serif`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(String(number), op.x, op.y + radius * 0.05);
  } else if (op.type === "text") {
    const size = Math.round(scale * 9);
    ctx.font = `600 ${size}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    const width = ctx.measureText(op.text).width;
    ctx.fillStyle = "rgba(255, 255, 255, 0.9)";
    ctx.fillRect(op.x - size * 0.25, op.y - size * 0.2, width + size * 0.5, size * 1.4);
    ctx.fillStyle = COLOUR;
    ctx.fillText(op.text, op.x, op.y);
  } else if (op.type === "redact") {
    ctx.fillStyle = REDACT;
    ctx.fillRect(op.box.x, op.box.y, op.box.w, op.box.h);
  }
  ctx.restore();
}

// Paints the image and its layers into ctx, whose origin is the crop's top-left. Redactions go
// last so nothing drawn later (an arrow, a label) can sit on top of one: each stays uniform.
function paint(ctx, session, { draft = null, showCrop = false } = {}) {
  const { image } = session;
  const width = image.naturalWidth;
  const height = image.naturalHeight;
  const scale = lineWidth(width, height);
  ctx.drawImage(image, 0, 0);
  const ops = draft ? [...session.ops, draft] : session.ops;
  let number = 0;
  const redactions = [];
  for (const op of ops) {
    if (op.type === "marker") number += 1;
    if (op.type === "redact") redactions.push(op);
    else if (op.type !== "crop") drawOp(ctx, op, scale, number);
  }
  for (const op of redactions) drawOp(ctx, op, scale, 0);
  if (showCrop) {
    const box = draft && draft.type === "crop" ? draft.box : session.crop();
    if (box.w < width || box.h < height) {
      ctx.save();
      ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
      ctx.beginPath();
      ctx.rect(0, 0, width, height);
      ctx.rect(box.x, box.y, box.w, box.h);
      ctx.fill("evenodd");
      ctx.setLineDash([scale * 3, scale * 3]);
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = scale;
      ctx.strokeRect(box.x, box.y, box.w, box.h);
      ctx.restore();
    }
  }
}

function render(session) {
  const { canvas } = ui;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  paint(ctx, session, { draft: session.draft, showCrop: true });
  ui.undo.disabled = !session.ops.length;
  ui.redo.disabled = !session.undone.length;
}

// The uploaded image: the crop of the original with every layer burnt in, as a fresh PNG.
function exportBlob(session) {
  const box = session.crop();
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(box.w));
  canvas.height = Math.max(1, Math.round(box.h));
  const ctx = canvas.getContext("2d");
  ctx.translate(-Math.round(box.x), -Math.round(box.y));
  paint(ctx, session);
  return new Promise((resolve, reject) => {
    canvas.toBlob((blob) => (blob ? resolve({ blob, width: canvas.width, height: canvas.height }) : reject(new Error("The edited image could not be encoded."))), "image/png");
  });
}

// ---- what the model is told ------------------------------------------------------------------

function plural(count, one, many) {
  return count === 1 ? one : `${count} ${many}`;
}

// A short note sent after the image, so "what does marker 2 point at?" works. Only layers inside
// the crop count; redacted regions are named so the model does not read them as content.
export function describe(state, crop) {
  const inside = (op) => {
    if (!crop) return true;
    const x = op.box ? op.box.x + op.box.w / 2 : op.type === "arrow" ? op.x2 : op.x;
    const y = op.box ? op.box.y + op.box.h / 2 : op.type === "arrow" ? op.y2 : op.y;
    return x >= crop.x && y >= crop.y && x <= crop.x + crop.w && y <= crop.y + crop.h;
  };
  const ops = state.ops;
  let number = 0;
  const markers = [];
  for (const op of ops) {
    if (op.type !== "marker") continue;
    number += 1;
    if (inside(op)) markers.push(number);
  }
  const count = (type) => ops.filter((op) => op.type === type && inside(op)).length;
  const labels = ops.filter((op) => op.type === "text" && inside(op)).map((op) => `"${op.text}"`);
  const parts = [];
  if (markers.length === 1) parts.push(`a numbered marker ${markers[0]}`);
  else if (markers.length) {
    const contiguous = markers[markers.length - 1] - markers[0] === markers.length - 1;
    parts.push(`numbered markers ${contiguous ? `${markers[0]}-${markers[markers.length - 1]}` : markers.join(", ")}`);
  }
  const rects = count("rect");
  if (rects) parts.push(plural(rects, "a red rectangle around a region", "red rectangles around regions"));
  const arrows = count("arrow");
  if (arrows) parts.push(plural(arrows, "a red arrow pointing at something", "red arrows pointing at things"));
  const highlights = count("highlight");
  if (highlights) parts.push(plural(highlights, "a highlighted region", "highlighted regions"));
  if (labels.length) parts.push(`text label${labels.length > 1 ? "s" : ""} ${labels.join(", ")}`);
  const redactions = count("redact");
  const sentences = [];
  if (parts.length) {
    const list = parts.length > 1 ? `${parts.slice(0, -1).join(", ")} and ${parts[parts.length - 1]}` : parts[0];
    sentences.push(`The user marked up this image: it has ${list}.`);
  }
  if (redactions) {
    sentences.push(`${redactions === 1 ? "A solid black box hides" : `${redactions} solid black boxes hide`} redacted content.`);
  }
  return sentences.join(" ");
}

// ---- input -----------------------------------------------------------------------------------

function point(event) {
  const rect = ui.canvas.getBoundingClientRect();
  return {
    x: Math.round(((event.clientX - rect.left) * ui.canvas.width) / rect.width),
    y: Math.round(((event.clientY - rect.top) * ui.canvas.height) / rect.height),
  };
}

function setTool(session, tool) {
  session.tool = tool;
  for (const [id, button] of ui.buttons) button.setAttribute("aria-pressed", String(id === tool));
  ui.text.hidden = tool !== "text";
  const hints = {
    rect: "Drag to draw a rectangle around what matters.",
    arrow: "Drag from the tail to the point of the arrow.",
    highlight: "Drag over a region to highlight it.",
    marker: "Click to place the next numbered marker.",
    text: "Type the label above, then click where it goes.",
    redact: "Drag over anything private: it is blacked out here, before upload, and its pixels never leave your browser.",
    crop: "Drag the part of the image to keep.",
  };
  ui.hint.textContent = hints[tool];
  if (tool === "text") ui.text.focus();
}

function attach(session, finish) {
  const { canvas } = ui;
  let start = null;
  const width = session.image.naturalWidth;
  const height = session.image.naturalHeight;
  const down = (event) => {
    if (event.button !== undefined && event.button !== 0) return;
    event.preventDefault(); // no text selection or scrolling; so focus the canvas ourselves,
    canvas.focus(); // keeping the tool shortcuts working after a label was typed
    const at = point(event);
    if (session.tool === "marker") {
      session.push({ type: "marker", x: at.x, y: at.y });
      render(session);
      return;
    }
    if (session.tool === "text") {
      const text = ui.text.value.trim().slice(0, TEXT_MAX);
      if (!text) {
        ui.text.focus();
        return;
      }
      session.push({ type: "text", x: at.x, y: at.y, text });
      render(session);
      return;
    }
    start = at;
    canvas.setPointerCapture?.(event.pointerId);
  };
  const draftFor = (at) => {
    if (session.tool === "arrow") return { type: "arrow", x1: start.x, y1: start.y, x2: at.x, y2: at.y };
    return { type: session.tool, box: clampBox(normalise(start, at), width, height) };
  };
  const move = (event) => {
    if (!start) return;
    event.preventDefault();
    session.draft = draftFor(point(event));
    render(session);
  };
  const up = (event) => {
    if (!start) return;
    const op = draftFor(point(event));
    start = null;
    session.draft = null;
    const big = op.type === "arrow" ? Math.hypot(op.x2 - op.x1, op.y2 - op.y1) >= MIN_BOX : op.box.w >= MIN_BOX && op.box.h >= MIN_BOX;
    if (big) session.push(op);
    render(session);
  };
  const cancelDraft = () => {
    start = null;
    session.draft = null;
    render(session);
  };
  const key = (event) => {
    const mod = event.ctrlKey || event.metaKey;
    const typing = event.target === ui.text;
    if (mod && event.key.toLowerCase() === "z") {
      event.preventDefault();
      if (event.shiftKey) session.redo();
      else session.undo();
      render(session);
    } else if (mod && event.key.toLowerCase() === "y") {
      event.preventDefault();
      session.redo();
      render(session);
    } else if (event.key === "Enter" && !typing && event.target.tagName !== "BUTTON") {
      event.preventDefault();
      finish(true);
    } else if (!mod && !event.altKey && !typing) {
      const tool = TOOLS.find((t) => t.key === event.key.toLowerCase());
      if (tool) {
        event.preventDefault();
        setTool(session, tool.id);
      }
    }
  };
  const pick = (event) => {
    const button = event.target.closest("[data-tool]");
    if (button) setTool(session, button.dataset.tool);
  };
  const undo = () => { session.undo(); render(session); };
  const redo = () => { session.redo(); render(session); };
  const textKey = (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      ui.hint.textContent = "Now click where the label goes.";
      canvas.focus();
    }
  };
  canvas.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  canvas.addEventListener("pointerup", up);
  canvas.addEventListener("pointercancel", cancelDraft);
  dialog.addEventListener("keydown", key);
  ui.tools.addEventListener("click", pick);
  ui.undo.addEventListener("click", undo);
  ui.redo.addEventListener("click", redo);
  ui.text.addEventListener("keydown", textKey);
  return () => {
    canvas.removeEventListener("pointerdown", down);
    canvas.removeEventListener("pointermove", move);
    canvas.removeEventListener("pointerup", up);
    canvas.removeEventListener("pointercancel", cancelDraft);
    dialog.removeEventListener("keydown", key);
    ui.tools.removeEventListener("click", pick);
    ui.undo.removeEventListener("click", undo);
    ui.redo.removeEventListener("click", redo);
    ui.text.removeEventListener("keydown", textKey);
  };
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => resolve({ image, url });
    image.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error("This image cannot be edited in the browser (it is still sent as it is)."));
    };
    image.src = url;
  });
}

// ---- entry point -----------------------------------------------------------------------------

export async function openEditor({ file, state = null, name = "image" }) {
  if (!dialog) build();
  const { image, url } = await loadImage(file);
  const session = new Session(image, state);
  ui.canvas.width = image.naturalWidth;
  ui.canvas.height = image.naturalHeight;
  ui.canvas.tabIndex = 0;
  ui.title.textContent = `Edit ${name}`;
  ui.text.value = "";
  setTool(session, "rect");
  render(session);
  return new Promise((resolve) => {
    let detach = null;
    const finish = async (apply) => {
      detach();
      dialog.removeEventListener("cancel", onCancel);
      ui.cancel.onclick = null;
      ui.done.onclick = null;
      if (dialog.open) dialog.close();
      try {
        if (!apply) return resolve(null);
        if (!session.ops.length) return resolve({ blob: null, state: session.state, note: "" });
        const { blob, width, height } = await exportBlob(session);
        resolve({ blob, width, height, state: session.state, note: describe(session.state, session.crop()) });
      } finally {
        URL.revokeObjectURL(url);
      }
    };
    const onCancel = (event) => {
      event.preventDefault();
      finish(false);
    };
    detach = attach(session, finish);
    dialog.addEventListener("cancel", onCancel);
    ui.cancel.onclick = () => finish(false);
    ui.done.onclick = () => finish(true);
    dialog.showModal();
    ui.canvas.focus();
  });
}
