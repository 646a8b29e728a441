// The sidebar and the conversation menu: search (title and content), rename, delete, export,
// and the slide-in drawer on narrow screens.
import { confirmDialog } from "./dialogs.js";
import { getJSON, postForm } from "./http.js";

const $ = (id) => document.getElementById(id);
let getConversation = () => null;
let onRenamed = () => {};
let searchTimer = null;
let searchSerial = 0;

export function setupLibrary(options) {
  getConversation = options.getConversation;
  onRenamed = options.onRenamed;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(runSearch, 200);
  });
  $("search").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && $("search").value) {
      event.stopPropagation();
      $("search").value = "";
      runSearch();
    }
  });
  $("rename").addEventListener("click", rename);
  $("delete").addEventListener("click", remove);
  for (const id of ["export-md", "export-json"]) $(id).addEventListener("click", closeMenu);
  $("sidebar-open").addEventListener("click", () => setDrawer(true));
  $("sidebar-close").addEventListener("click", () => setDrawer(false));
  $("menu-toggle").addEventListener("click", () => setMenu($("menu-items").hidden));
  document.addEventListener("click", (event) => {
    if (!$("conversation-menu").contains(event.target)) setMenu(false);
    const drawerOpen = $("layout").classList.contains("drawer-open");
    if (drawerOpen && !$("sidebar").contains(event.target) && !$("sidebar-open").contains(event.target)) {
      setDrawer(false); // a tap beside the drawer closes it
    }
  });
  $("conversation-menu").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("menu-items").hidden) {
      event.stopPropagation();
      setMenu(false);
      $("menu-toggle").focus();
    }
  });
}

export function setDrawer(open) {
  $("layout").classList.toggle("drawer-open", open);
  $("sidebar-open").setAttribute("aria-expanded", String(open));
  if (open) $("search").focus();
}

export function focusSearch() {
  setDrawer(window.matchMedia("(max-width: 720px)").matches);
  $("search").focus();
  $("search").select();
}

function setMenu(open) {
  $("menu-items").hidden = !open;
  $("menu-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("menu-items").querySelector("button, a").focus();
}

function closeMenu() {
  setMenu(false);
}

// The conversation menu follows the open conversation (a new chat gets one on its first send).
export function showConversation(conversation) {
  $("conversation-menu").hidden = !conversation;
  if (!conversation) return;
  $("export-md").href = `/c/${conversation.id}/export.md`;
  $("export-json").href = `/c/${conversation.id}/export.json`;
}

export function addToList(conversation, url) {
  const list = $("conversation-list");
  list.querySelector(".empty-list")?.remove();
  for (const current of list.querySelectorAll("[aria-current]")) current.removeAttribute("aria-current");
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.href = url;
  link.dataset.id = conversation.id;
  link.textContent = conversation.title || "New chat";
  link.setAttribute("aria-current", "page");
  item.append(link);
  list.prepend(item);
}

export function setListTitle(id, title) {
  const link = document.querySelector(`#sidebar a[data-id="${id}"]`);
  if (link) link.textContent = title || "New chat";
}

async function runSearch() {
  const query = $("search").value.trim();
  const results = $("search-results");
  const serial = ++searchSerial;
  // The project filter beside the search (projects.js) narrows it too.
  const project = $("search-project")?.value || "";
  if (!query) {
    results.hidden = true;
    $("conversation-list").hidden = project !== "" && project !== "none";
    $("sidebar").classList.remove("searching");
    $("search-status").textContent = "";
    return;
  }
  let found;
  try {
    const url = `/api/conversations/search?q=${encodeURIComponent(query)}&project=${encodeURIComponent(project)}`;
    found = (await getJSON(url)).results;
  } catch (error) {
    found = null;
    $("search-status").textContent = error.message;
  }
  if (serial !== searchSerial) return; // a newer search has started
  results.replaceChildren();
  if (found) {
    for (const result of found) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = result.url;
      const title = document.createElement("span");
      title.className = "result-title";
      title.textContent = result.title || "New chat";
      link.append(title);
      if (result.snippet) {
        const snippet = document.createElement("span");
        snippet.className = "snippet";
        snippet.textContent = result.snippet;
        link.append(snippet);
      }
      item.append(link);
      results.append(item);
    }
    if (!found.length) {
      const item = document.createElement("li");
      item.className = "muted empty-list";
      item.textContent = "No conversations match.";
      results.append(item);
    }
    $("search-status").textContent = `${found.length} ${found.length === 1 ? "conversation" : "conversations"} found`;
  }
  results.hidden = false;
  $("conversation-list").hidden = true;
  $("sidebar").classList.add("searching");
}

async function rename() {
  closeMenu();
  const conversation = getConversation();
  if (!conversation) return;
  const dialog = $("rename-dialog");
  const input = $("rename-input");
  const error = $("rename-error");
  input.value = conversation.title || "";
  error.hidden = true;
  dialog.showModal();
  input.select();
  // Stay open until the server accepts the name or the user cancels.
  const attempt = () => new Promise((resolve) => {
    dialog.addEventListener("close", async () => {
      if (dialog.returnValue !== "ok") return resolve();
      try {
        const result = await postForm(`/api/conversations/${conversation.id}/rename`, { title: input.value });
        onRenamed(result.title);
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
}

async function remove() {
  closeMenu();
  const conversation = getConversation();
  if (!conversation) return;
  const sure = await confirmDialog({
    title: "Delete this conversation?",
    body: `“${conversation.title || "New chat"}” and all its messages will be deleted. This cannot be undone.`,
    ok: "Delete",
    danger: true,
  });
  if (!sure) return;
  try {
    await postForm(`/api/conversations/${conversation.id}/delete`);
  } catch (failure) {
    await confirmDialog({ title: "Not deleted", body: failure.message, ok: "OK" });
    return;
  }
  location.assign("/");
}
