// Projects in the sidebar: conversations grouped by project, dragged into a project (or out,
// onto the plain list), or moved with the ⋯ menu's "Move to project…" (keyboard and touch), and
// the project filter beside the search.
import { getJSON, postForm } from "./http.js";

const $ = (id) => document.getElementById(id);
const DRAG_TYPE = "application/x-kimichat-conversation";

function currentConversationId() {
  const match = location.pathname.match(/^\/c\/(\d+)\//);
  return match ? match[1] : null;
}

function listFor(projectId) {
  if (!projectId) return $("conversation-list");
  return document.querySelector(`.project-conversations[data-project-id="${projectId}"]`);
}

function placeInList(conversationId, projectId) {
  const target = listFor(projectId);
  if (!target) return;
  let item = document.querySelector(`#sidebar a[data-id="${conversationId}"]`)?.closest("li");
  if (!item) {
    item = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/c/${conversationId}/`;
    link.dataset.id = conversationId;
    link.textContent = document.getElementById("chat-title")?.textContent || "New chat";
    item.append(link);
  }
  target.querySelector(".empty-list")?.remove();
  target.prepend(item);
}

// The open conversation's project, beside its title.
function showBadge(project) {
  const badge = $("project-badge");
  badge.hidden = !project;
  if (!project) return;
  badge.href = project.url;
  badge.textContent = project.name;
  badge.title = `In the project ${project.name}`;
}

async function move(conversationId, projectId) {
  const result = await postForm(
    `/api/conversations/${conversationId}/project`,
    { project: projectId || "" },
    "Could not move the conversation.",
  );
  placeInList(conversationId, projectId);
  if (conversationId === currentConversationId()) showBadge(result.project);
  const announcer = $("announcer");
  if (announcer) {
    announcer.textContent = result.project ? `Moved to ${result.project.name}.` : "Moved out of its project.";
  }
  return result;
}

// ---- drag and drop -----------------------------------------------------------------------------

function dropZone(target) {
  return target.closest?.(".project-group, #conversation-list");
}

function zoneProject(zone) {
  return zone.dataset.projectId || "";
}

function setupDrag() {
  const sidebar = $("sidebar");
  sidebar.addEventListener("dragstart", (event) => {
    const link = event.target.closest?.("a[data-id]");
    if (!link) return;
    event.dataTransfer.setData(DRAG_TYPE, link.dataset.id);
    event.dataTransfer.effectAllowed = "move";
  });
  sidebar.addEventListener("dragover", (event) => {
    const zone = dropZone(event.target);
    if (!zone || !event.dataTransfer.types.includes(DRAG_TYPE)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
    for (const other of sidebar.querySelectorAll(".drop-target")) if (other !== zone) other.classList.remove("drop-target");
    zone.classList.add("drop-target");
  });
  sidebar.addEventListener("dragleave", (event) => {
    const zone = dropZone(event.target);
    if (zone && !zone.contains(event.relatedTarget)) zone.classList.remove("drop-target");
  });
  sidebar.addEventListener("drop", async (event) => {
    const zone = dropZone(event.target);
    const id = event.dataTransfer.getData(DRAG_TYPE);
    for (const other of sidebar.querySelectorAll(".drop-target")) other.classList.remove("drop-target");
    if (!zone || !id) return;
    event.preventDefault();
    try {
      await move(id, zoneProject(zone));
    } catch (error) {
      $("search-status").textContent = error.message;
    }
  });
  sidebar.addEventListener("dragend", () => {
    for (const other of sidebar.querySelectorAll(".drop-target")) other.classList.remove("drop-target");
  });
}

// ---- the ⋯ menu's "Move to project…" -------------------------------------------------------------

async function openMoveDialog() {
  $("menu-items").hidden = true;
  $("menu-toggle").setAttribute("aria-expanded", "false");
  const id = currentConversationId();
  if (!id) return;
  const dialog = $("move-dialog");
  const select = $("move-select");
  const error = $("move-error");
  error.hidden = true;
  let projects;
  try {
    projects = (await getJSON("/api/projects/")).projects;
  } catch (failure) {
    error.textContent = failure.message;
    error.hidden = false;
    projects = [];
  }
  const current = document.querySelector(`#sidebar a[data-id="${id}"]`)?.closest("[data-project-id]")?.dataset.projectId || "";
  select.replaceChildren();
  const none = new Option("No project", "");
  select.append(none);
  for (const project of projects) {
    const label = project.team ? `${project.name} (${project.team})` : project.name;
    select.append(new Option(label, String(project.id)));
  }
  select.value = current;
  dialog.returnValue = "";
  dialog.showModal();
  select.focus();
  const attempt = () => new Promise((resolve) => {
    dialog.addEventListener("close", async () => {
      if (dialog.returnValue !== "ok") return resolve();
      try {
        await move(id, select.value);
        resolve();
      } catch (failure) {
        error.textContent = failure.message;
        error.hidden = false;
        dialog.returnValue = "";
        dialog.showModal();
        resolve(attempt());
      }
    }, { once: true });
  });
  await attempt();
  $("menu-toggle").focus();
}

// ---- the project filter ------------------------------------------------------------------------

function applyFilter() {
  const value = $("search-project").value;
  for (const group of document.querySelectorAll(".project-group")) {
    group.hidden = value !== "" && group.dataset.projectId !== value;
  }
  $("conversation-list").hidden = value !== "" && value !== "none";
  if ($("search").value.trim()) $("search").dispatchEvent(new Event("input"));
}

showBadge(JSON.parse(document.getElementById("page-data").textContent).project);
setupDrag();
$("move-to-project").addEventListener("click", openMoveDialog);
$("search-project").addEventListener("change", applyFilter);
