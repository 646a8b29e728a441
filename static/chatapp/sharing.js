// Sharing (issue 16), the owner's side: "Share…" in the conversation's ⋯ menu opens a dialog to
// share with the team the conversation is charged to, or with chosen members of it, lists who it
// is shared with (each with its link, /shared/<id>/, for logged-in team members only) and
// revokes. The open conversation is read from the address (/c/<id>/), which the chat page keeps
// current, so this module needs nothing from app.js.
import { getJSON, postForm } from "./http.js";

const $ = (id) => document.getElementById(id);

function conversationId() {
  const match = location.pathname.match(/^\/c\/(\d+)\//);
  return match ? Number(match[1]) : null;
}

function closeMenu() {
  $("menu-items").hidden = true;
  $("menu-toggle").setAttribute("aria-expanded", "false");
}

function showError(id, text) {
  $(id).textContent = text || "";
  $(id).hidden = !text;
}

function renderShares(shares) {
  const list = $("share-list");
  list.replaceChildren();
  for (const share of shares) {
    const item = document.createElement("li");
    const who = document.createElement("span");
    who.className = "share-audience";
    who.textContent = share.audience;
    const link = document.createElement("a");
    link.href = share.url;
    link.textContent = "link";
    link.title = "The shared view (logged-in team members with access only)";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "small-button";
    copy.textContent = "Copy link";
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(new URL(share.url, location.href).href);
        copy.textContent = "Copied";
      } catch {
        copy.textContent = "Copy failed";
      }
    });
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.className = "small-button danger";
    revoke.textContent = "Revoke";
    revoke.setAttribute("aria-label", `Revoke the share with ${share.audience}`);
    revoke.addEventListener("click", async () => {
      try {
        await postForm(`/api/shares/${share.id}/revoke`);
      } catch (failure) {
        showError("share-error", failure.message);
        return;
      }
      load();
    });
    item.append(who, " · ", link, " ", copy, " ", revoke);
    list.append(item);
  }
  $("share-none").hidden = shares.length > 0;
}

function renderMembers(members) {
  const list = $("share-members");
  list.replaceChildren();
  for (const member of members) {
    const item = document.createElement("li");
    const label = document.createElement("label");
    label.className = "check";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = member.id;
    label.append(box, ` ${member.username}`);
    item.append(label);
    list.append(item);
  }
  if (!members.length) {
    const item = document.createElement("li");
    item.className = "muted small";
    item.textContent = "Nobody else is in this team.";
    list.append(item);
  }
}

async function load() {
  const id = conversationId();
  if (!id) return;
  let options;
  try {
    options = await getJSON(`/api/conversations/${id}/shares`);
  } catch (failure) {
    showError("share-error", failure.message);
    return;
  }
  showError("share-reason", options.reason);
  $("share-choice").hidden = !options.team;
  $("share-create").hidden = !options.team;
  if (options.team) $("share-team").textContent = options.team.name;
  renderMembers(options.members);
  renderShares(options.shares);
}

async function create() {
  const id = conversationId();
  const scope = document.querySelector("#share-choice input[name=scope]:checked").value;
  const members = [...$("share-members").querySelectorAll("input:checked")].map((box) => box.value);
  showError("share-error", "");
  try {
    await postForm(`/api/conversations/${id}/shares`, { scope, members: members.join(",") });
  } catch (failure) {
    showError("share-error", failure.message);
    return;
  }
  await load();
  $("announcer").textContent = "Shared.";
}

function scopeChanged() {
  const chosen = document.querySelector("#share-choice input[name=scope]:checked").value === "members";
  $("share-members").hidden = !chosen;
}

$("share-open").addEventListener("click", async () => {
  closeMenu();
  showError("share-error", "");
  $("share-dialog").showModal();
  await load();
});
$("share-create").addEventListener("click", create);
for (const radio of document.querySelectorAll("#share-choice input[name=scope]")) {
  radio.addEventListener("change", scopeChanged);
}
