// A project's page, for its curators: pin images and PDF pages. Files go through the same
// upload pipeline as the composer's (/api/attachments/, prepared for the project's default
// model), then are pinned to the project; the page reloads to show them.
import { postForm } from "./http.js";

const $ = (id) => document.getElementById(id);
const page = $("project-page");
const csrfToken = () => document.querySelector("input[name=csrfmiddlewaretoken]").value;

async function upload(file) {
  const body = new FormData();
  body.append("file", file);
  if (page.dataset.modelId) body.append("model", page.dataset.modelId);
  let response;
  try {
    response = await fetch("/api/attachments/", {
      method: "POST", body, credentials: "same-origin", headers: { "X-CSRFToken": csrfToken() },
    });
  } catch {
    throw new Error("Could not reach the server. Check your connection and try again.");
  }
  let result = {};
  try { result = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) throw new Error(`${file.name}: ${result.message || "could not be uploaded."}`);
  return result.attachments ? result.attachments.map((a) => a.id) : [result.id];
}

// A form that asks first (no inline handlers: the Content-Security-Policy refuses them).
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!confirm(form.dataset.confirm)) event.preventDefault();
  });
}

$("pin-input").addEventListener("change", async (event) => {
  const files = [...event.target.files];
  if (!files.length) return;
  $("pin-error").hidden = true;
  $("pin-status").textContent = `Preparing ${files.length} file${files.length === 1 ? "" : "s"}…`;
  try {
    const ids = [];
    for (const file of files) ids.push(...(await upload(file)));
    await postForm(`/api/projects/${page.dataset.projectId}/pins`, { attachments: ids.join(",") }, "Could not pin them.");
    $("pin-status").textContent = "Pinned.";
    location.reload();
  } catch (error) {
    $("pin-status").textContent = "";
    $("pin-error").textContent = error.message;
    $("pin-error").hidden = false;
    event.target.value = "";
  }
});
