// The Batch page: the new-batch form (uploads, fields, the estimate) and one batch's live table
// (frames "batch.state", "batch.item", "batch.status" over /ws/batches/<id>/; see chatapp/events).

const page = document.getElementById("batch-page");
const csrf = () => document.querySelector("input[name=csrfmiddlewaretoken]").value;

async function call(url, { json, form, method = "POST" } = {}) {
  const headers = { "X-CSRFToken": csrf() };
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(url, { method, body, headers, credentials: "same-origin" });
  } catch {
    throw new Error("Could not reach the server. Check your connection and try again.");
  }
  let data = {};
  try { data = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) throw new Error(data.message || "That did not work. Try again.");
  return data;
}

const money = (v) => {
  const n = Number(v || 0);
  return n >= 1 ? `$${n.toFixed(2)}` : `$${n.toFixed(4)}`;
};
const duration = (s) => (s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);

function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

// ---- the new-batch form ---------------------------------------------------------------------

function setupForm() {
  const form = document.getElementById("batch-form");
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  const thumbs = document.getElementById("thumbs");
  const status = document.getElementById("upload-status");
  const estimateBox = document.getElementById("estimate");
  const start = document.getElementById("start");
  const error = document.getElementById("form-error");
  const fieldsBody = document.querySelector("#fields tbody");
  const maxItems = Number(page.dataset.maxItems);
  const images = [];
  let uploading = 0;
  let estimateTimer = null;
  let lastEstimate = null;

  function updateStatus(extra = "") {
    status.textContent = `${images.length} image${images.length === 1 ? "" : "s"}${uploading ? `, ${uploading} uploading…` : ""}${extra}`;
  }

  async function uploadOne(file) {
    const data = new FormData();
    data.append("file", file);
    data.append("model", document.getElementById("model").value);
    uploading += 1;
    updateStatus();
    try {
      const answer = await call("/api/batches/files", { form: data });
      let over = 0;
      for (const image of answer.images) {
        if (images.length >= maxItems) { over += 1; continue; }
        images.push(image);
        const li = document.createElement("li");
        const img = document.createElement("img");
        img.src = image.thumbnail_url;
        img.alt = image.name;
        img.title = `${image.name} (${image.size})`;
        li.append(img);
        thumbs.append(li);
      }
      const problems = answer.errors.map((e) => `${e.name}: ${e.message}`);
      if (over) problems.push(`${file.name}: ${over} image${over === 1 ? "" : "s"} left out: a batch takes at most ${maxItems}.`);
      if (problems.length) showError(error, problems.join("\n"));
    } catch (exc) {
      showError(error, `${file.name}: ${exc.message}`);
    } finally {
      uploading -= 1;
      updateStatus();
      scheduleEstimate();
    }
  }

  async function addFiles(files) {
    const queue = [...files];
    const lanes = Array.from({ length: 3 }, async () => {
      while (queue.length) await uploadOne(queue.shift());
    });
    await Promise.all(lanes);
  }

  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });

  function fields() {
    return [...fieldsBody.querySelectorAll("tr")].map((row) => ({
      name: row.querySelector(".f-name").value.trim(),
      type: row.querySelector(".f-type").value,
      description: row.querySelector(".f-description").value.trim(),
      choices: row.querySelector(".f-choices").value,
    })).filter((f) => f.name);
  }

  document.getElementById("add-field").addEventListener("click", () => {
    const row = document.getElementById("field-row").content.firstElementChild.cloneNode(true);
    row.querySelector(".f-remove").addEventListener("click", () => { row.remove(); scheduleEstimate(); });
    fieldsBody.append(row);
    row.querySelector(".f-name").focus();
  });

  function payload() {
    return {
      name: document.getElementById("name").value,
      question: document.getElementById("question").value,
      model: document.getElementById("model").value,
      fields: fields(),
      images: images.map((i) => i.id),
    };
  }

  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(estimate, 300);
  }

  async function estimate() {
    const data = payload();
    start.disabled = true;
    if (!images.length || !data.question.trim() || uploading) {
      estimateBox.textContent = images.length ? "Write the question to see the estimate." : "";
      estimateBox.classList.remove("over");
      return;
    }
    try {
      const e = await call("/api/batches/estimate", { json: data });
      lastEstimate = e;
      let text = `${e.items} images: about ${e.prompt_tokens.toLocaleString()} prompt and ${e.completion_tokens.toLocaleString()} completion tokens, about ${money(e.cost_usd)}. `;
      text += e.budget_left_usd === null ? "No team budget limit. " : `Team budget left this month: ${money(e.budget_left_usd)}. `;
      text += `About ${duration(e.seconds)} at ${e.concurrency} at a time`;
      text += e.mode === "live" ? "." : " (through the provider's batch API, at its batch prices; it may take longer).";
      if (!e.fits_budget) text += " This is more than the budget left: it cannot start.";
      estimateBox.textContent = text;
      estimateBox.classList.toggle("over", !e.fits_budget);
      start.disabled = !e.fits_budget;
      showError(error, "");
    } catch (exc) {
      estimateBox.textContent = "";
      showError(error, exc.message);
    }
  }

  form.addEventListener("input", scheduleEstimate);
  form.addEventListener("change", scheduleEstimate);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    start.disabled = true;
    try {
      const created = await call("/api/batches/", { json: payload() });
      location.assign(created.url);
    } catch (exc) {
      showError(error, exc.message);
      start.disabled = !(lastEstimate && lastEstimate.fits_budget);
    }
  });
  updateStatus();
}

// ---- one batch ------------------------------------------------------------------------------

function setupBatch(batchId) {
  const tbody = document.querySelector("#results tbody");
  const error = document.getElementById("batch-error");
  const rows = new Map();
  let batch = null;
  let socket = null;
  let retryDelay = 500;
  let poll = null;

  function renderBatch(b) {
    batch = b;
    const p = b.progress;
    document.getElementById("batch-status").textContent = b.status_text;
    page.dataset.status = b.status;
    const bar = document.getElementById("batch-progress");
    bar.max = Math.max(1, p.total);
    bar.value = p.ended;
    document.getElementById("batch-count").textContent = `${p.ended} / ${p.total}`;
    document.getElementById("fig-prompt").textContent = p.prompt_tokens.toLocaleString();
    document.getElementById("fig-completion").textContent = p.completion_tokens.toLocaleString();
    document.getElementById("fig-cost").textContent = money(p.cost_usd);
    document.getElementById("fig-cache").textContent = p.cache_share === null ? "–" : `${Math.round(p.cache_share * 100)}%`;
    document.getElementById("fig-saved").textContent = money(p.cache_saved_usd);
    const running = b.status === "running" || b.status === "queued";
    document.getElementById("pause").hidden = !running;
    document.getElementById("resume").hidden = !(b.status === "paused" || b.status === "budget");
    document.getElementById("cancel").hidden = !(running || b.status === "paused" || b.status === "budget");
    const failed = (p.counts.failed || 0) + (p.counts.invalid || 0);
    document.getElementById("retry").hidden = !failed;
  }

  function answerCell(item) {
    const td = document.createElement("td");
    td.className = "answer";
    if (batch && batch.fields.length && item.values) {
      const dl = document.createElement("dl");
      dl.className = "values";
      for (const f of batch.fields) {
        const dt = document.createElement("dt");
        dt.textContent = f.name;
        const dd = document.createElement("dd");
        const v = item.values[f.name];
        dd.textContent = v === null || v === undefined ? "–" : v === true ? "yes" : v === false ? "no" : String(v);
        dl.append(dt, dd);
      }
      td.append(dl);
    } else {
      td.textContent = item.answer || item.error || "";
    }
    if (item.error && (item.answer || item.values)) {
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = item.error;
      td.append(p);
    }
    return td;
  }

  function renderItem(item) {
    let tr = rows.get(item.id);
    if (!tr) {
      tr = document.createElement("tr");
      rows.set(item.id, tr);
      tr.dataset.position = item.position;
      const anchor = [...tbody.children].find((r) => Number(r.dataset.position) > item.position);
      tbody.insertBefore(tr, anchor || null);
    }
    tr.dataset.status = item.status;
    tr.dataset.id = item.id;
    tr.replaceChildren();
    const pos = document.createElement("td");
    pos.textContent = item.position;
    const thumb = document.createElement("td");
    if (item.thumbnail) {
      const img = document.createElement("img");
      img.src = item.thumbnail;
      img.alt = item.filename;
      img.title = item.filename;
      img.loading = "lazy";
      thumb.append(img);
    }
    const name = document.createElement("span");
    name.className = "filename muted";
    name.textContent = item.filename;
    thumb.append(name);
    const status = document.createElement("td");
    status.className = "status";
    status.textContent = item.status;
    const tokens = document.createElement("td");
    tokens.textContent = item.prompt_tokens || item.completion_tokens ? `${item.prompt_tokens} + ${item.completion_tokens}${item.cached_tokens ? ` (${item.cached_tokens} cached)` : ""}` : "";
    const cost = document.createElement("td");
    cost.textContent = Number(item.cost_usd) ? money(item.cost_usd) : "";
    const open = document.createElement("td");
    if (["done", "invalid", "failed"].includes(item.status)) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link open-item";
      button.textContent = "Ask more";
      button.title = "Open this image and answer as a conversation";
      button.addEventListener("click", async () => {
        try {
          const answer = await call(`/api/batches/${batchId}/items/${item.id}/open`);
          location.assign(answer.url);
        } catch (exc) { showError(error, exc.message); }
      });
      open.append(button);
    }
    tr.append(pos, thumb, answerCell(item), status, tokens, cost, open);
  }

  function onFrame(frame) {
    if (frame.type === "batch.state") {
      renderBatch(frame.batch);
      for (const item of frame.items) renderItem(item);
    } else if (frame.type === "batch.item") {
      renderBatch(frame.batch);
      renderItem(frame.item);
    } else if (frame.type === "batch.status") {
      renderBatch(frame.batch);
    } else if (frame.type === "layer.up") {
      socket.send(JSON.stringify({ type: "state" }));
    }
  }

  function connect() {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/batches/${batchId}/`;
    socket = new WebSocket(url);
    socket.addEventListener("open", () => { retryDelay = 500; });
    socket.addEventListener("message", (e) => onFrame(JSON.parse(e.data)));
    socket.addEventListener("close", (e) => {
      if (e.code === 4401 || e.code === 4403) return;
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    });
  }

  // Frames are best effort: while the batch runs, re-check the state now and then.
  poll = setInterval(() => {
    if (socket && socket.readyState === WebSocket.OPEN && batch && ["running", "queued"].includes(batch.status)) {
      socket.send(JSON.stringify({ type: "state" }));
    }
  }, 5000);
  void poll;

  for (const action of ["pause", "resume", "cancel", "retry"]) {
    document.getElementById(action).addEventListener("click", async () => {
      showError(error, "");
      try {
        const state = await call(`/api/batches/${batchId}/${action}`);
        onFrame({ type: "batch.state", ...state });
      } catch (exc) { showError(error, exc.message); }
    });
  }
  document.getElementById("delete").addEventListener("click", async () => {
    if (!confirm("Delete this batch, its answers and its images?")) return;
    try {
      const answer = await call(`/api/batches/${batchId}/delete`);
      location.assign(answer.url);
    } catch (exc) { showError(error, exc.message); }
  });
  connect();
}

if (page.dataset.batch) setupBatch(page.dataset.batch);
else setupForm();
