// The prompt library in the composer: "/" at the start of the message opens the saved prompts
// (personal and the team's), filtered by what follows the slash. Arrows move, Enter or a click
// inserts, Esc closes. An inserted prompt's first {{variable}} is selected; Tab goes to the next
// one (Shift+Tab back) while the message still holds any.
import { getJSON } from "./http.js";

const $ = (id) => document.getElementById(id);
const input = $("message");
const picker = $("prompt-picker");
const list = $("prompt-options");
const empty = $("prompt-empty");
const VARIABLE = /\{\{\s*[^{}\n]{1,60}?\s*\}\}/g;

let prompts = null; // loaded on the first "/"
let loading = null;
let shown = [];
let active = 0;

async function load() {
  if (prompts) return prompts;
  if (!loading) {
    loading = getJSON("/api/prompts/", "Could not load your saved prompts.")
      .then((body) => { prompts = body.prompts; return prompts; })
      .catch((error) => { loading = null; throw error; });
  }
  return loading;
}

function matches(prompt, words) {
  const haystack = `${prompt.title}\n${prompt.text}`.toLowerCase();
  return words.every((word) => haystack.includes(word));
}

function slashQuery() {
  const match = input.value.match(/^\/([^\n]*)$/);
  return match ? match[1] : null;
}

function close() {
  picker.hidden = true;
  input.setAttribute("aria-expanded", "false");
  input.removeAttribute("aria-activedescendant");
}

function render() {
  list.replaceChildren();
  shown.forEach((prompt, index) => {
    const item = document.createElement("li");
    item.id = `prompt-option-${prompt.id}`;
    item.setAttribute("role", "option");
    item.setAttribute("aria-selected", String(index === active));
    item.dataset.id = prompt.id;
    const title = document.createElement("span");
    title.className = "prompt-title";
    title.textContent = prompt.title;
    const scope = document.createElement("span");
    scope.className = "prompt-scope";
    scope.textContent = prompt.team ? `Team ${prompt.team}` : "Personal";
    const preview = document.createElement("span");
    preview.className = "prompt-preview";
    preview.textContent = prompt.text;
    item.append(title, scope, preview);
    // mousedown, not click: the textarea keeps its focus.
    item.addEventListener("mousedown", (event) => {
      event.preventDefault();
      insert(prompt);
    });
    list.append(item);
  });
  empty.hidden = shown.length > 0;
  picker.hidden = false;
  input.setAttribute("aria-expanded", "true");
  if (shown[active]) {
    input.setAttribute("aria-activedescendant", `prompt-option-${shown[active].id}`);
    list.children[active].scrollIntoView({ block: "nearest" });
  }
}

async function update() {
  const query = slashQuery();
  if (query === null) return close();
  let all;
  try {
    all = await load();
  } catch (error) {
    shown = [];
    empty.textContent = error.message;
    return render();
  }
  if (slashQuery() !== query) return; // typed on meanwhile: a newer update runs
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  shown = all.filter((prompt) => matches(prompt, words));
  active = Math.min(active, Math.max(0, shown.length - 1));
  render();
}

function selectVariable(from, backwards = false) {
  const found = [...input.value.matchAll(VARIABLE)];
  if (!found.length) return false;
  let next;
  if (backwards) {
    next = [...found].reverse().find((m) => m.index < from) || found[found.length - 1];
  } else {
    next = found.find((m) => m.index >= from) || found[0];
  }
  input.focus();
  input.setSelectionRange(next.index, next.index + next[0].length);
  return true;
}

function insert(prompt) {
  close();
  input.value = prompt.text;
  input.dispatchEvent(new Event("input", { bubbles: true })); // the composer resizes
  input.focus();
  if (!selectVariable(0)) input.setSelectionRange(input.value.length, input.value.length);
}

input.setAttribute("aria-controls", "prompt-options");
input.setAttribute("aria-expanded", "false");
input.addEventListener("input", () => {
  active = 0;
  update();
});
input.addEventListener("blur", () => setTimeout(() => {
  if (document.activeElement !== input) close();
}, 150));
// Capture: runs before the composer's own Enter-to-send.
input.addEventListener("keydown", (event) => {
  if (!picker.hidden) {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      if (shown.length) {
        active = (active + (event.key === "ArrowDown" ? 1 : shown.length - 1)) % shown.length;
        render();
      }
    } else if ((event.key === "Enter" && !event.shiftKey) || event.key === "Tab") {
      if (!shown[active]) return;
      event.preventDefault();
      event.stopImmediatePropagation();
      insert(shown[active]);
    } else if (event.key === "Escape") {
      event.preventDefault();
      event.stopImmediatePropagation();
      event.stopPropagation();
      close();
    }
    return;
  }
  if (event.key === "Tab" && !event.altKey && !event.ctrlKey && !event.metaKey) {
    const from = event.shiftKey ? input.selectionStart : input.selectionEnd;
    if (selectVariable(from, event.shiftKey)) event.preventDefault();
  }
}, true);
