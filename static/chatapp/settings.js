// The per-conversation settings dialog: system prompt, max output tokens, and only the controls
// the chosen model's request contract allows (model.controls, from the catalog): a thinking
// switch (K2.6), a reasoning-effort choice (K3), a temperature where the provider does not fix
// it (every Kimi family does: the dialog says so instead of offering a slider it would reject).
import { editWarning } from "./context.js";
import { confirmDialog } from "./dialogs.js";
import { postForm } from "./http.js";

const $ = (id) => document.getElementById(id);
let options = null;
let saved = { system_prompt: "", max_output_tokens: null, thinking: null, temperature: null, reasoning_effort: "" };
const NO_CONTROLS = { thinking: false, temperature: true, reasoning_effort: [], effort_default: "" };

export function setupSettings(opts) {
  options = opts;
  if (opts.settings) saved = opts.settings;
  $("settings-open").addEventListener("click", open);
  $("temperature").addEventListener("input", () => {
    $("temperature-default").checked = false;
    showTemperature();
  });
  $("temperature-default").addEventListener("change", showTemperature);
  $("system-prompt").addEventListener("input", () => {
    $("system-prompt-warning").hidden = !(options.hasMessages() && $("system-prompt").value.trim() !== saved.system_prompt);
  });
  $("settings-form").addEventListener("submit", onSubmit);
}

function currentModel() {
  const id = Number($("model").value);
  return options.models.find((m) => m.id === id) || null;
}

function showTemperature() {
  const useDefault = $("temperature-default").checked;
  $("temperature-value").textContent = useDefault ? "(provider default)" : Number($("temperature").value).toFixed(2);
}

function controlsOf(model) {
  return (model && model.controls) || NO_CONTROLS;
}

function fixedText(model, controls) {
  const fixed = model.fixed_temperature || {};
  if (controls.thinking && fixed.thinking != null && fixed.instant != null) {
    return `Temperature: fixed by the provider at ${fixed.thinking.toFixed(1)} with thinking, ${fixed.instant.toFixed(1)} without.`;
  }
  const value = model.reasoning_mode === "off" ? fixed.instant : fixed.thinking;
  return value != null ? `Temperature: fixed by the provider at ${value.toFixed(1)}.` : "Temperature: set by the provider.";
}

function fillEffort(controls) {
  const select = $("reasoning-effort");
  select.replaceChildren();
  const fallback = document.createElement("option");
  fallback.value = "";
  fallback.textContent = controls.effort_default ? `default (${controls.effort_default})` : "default";
  select.append(fallback);
  for (const value of controls.reasoning_effort) {
    if (value === controls.effort_default) continue;
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value;
    select.append(option);
  }
  select.value = controls.reasoning_effort.includes(saved.reasoning_effort) ? saved.reasoning_effort : "";
}

function open() {
  const model = currentModel();
  const controls = controlsOf(model);
  $("settings-model").textContent = model ? `Model: ${model.name}` : "";
  $("system-prompt").value = saved.system_prompt || "";
  $("system-prompt-warning").hidden = true;
  $("max-output-tokens").value = saved.max_output_tokens ?? "";
  $("thinking-field").hidden = !controls.thinking;
  $("thinking").checked = saved.thinking !== false;
  $("thinking-always").hidden = !(model && model.reasoning_mode === "always");
  $("effort-field").hidden = !controls.reasoning_effort.length;
  fillEffort(controls);
  $("temperature-field").hidden = !controls.temperature;
  $("temperature-fixed").hidden = controls.temperature;
  if (!controls.temperature) $("temperature-fixed").textContent = fixedText(model, controls);
  $("temperature-default").checked = saved.temperature == null;
  $("temperature").value = saved.temperature ?? 1;
  showTemperature();
  $("settings-error").hidden = true;
  $("settings-dialog").showModal();
  $("system-prompt").focus();
}

// Keep every saved setting and change the model (the "Continue with …" of a retired model).
export async function switchModel(conversationId, modelId) {
  const fields = {
    model: modelId,
    system_prompt: saved.system_prompt || "",
    max_output_tokens: saved.max_output_tokens ?? "",
    thinking: saved.thinking == null ? "" : String(saved.thinking),
    temperature: saved.temperature ?? "",
    reasoning_effort: saved.reasoning_effort || "",
  };
  saved = await postForm(`/api/conversations/${conversationId}/settings`, fields, "The model was not changed.");
  return saved;
}

async function onSubmit(event) {
  if (event.submitter?.value !== "ok") return; // Cancel closes the dialog as usual
  event.preventDefault();
  const model = currentModel();
  const prompt = $("system-prompt").value.trim();
  const fields = {
    model: model ? model.id : "",
    system_prompt: prompt,
    max_output_tokens: $("max-output-tokens").value,
    thinking: controlsOf(model).thinking ? String($("thinking").checked) : "",
    temperature: !$("temperature-field").hidden && !$("temperature-default").checked ? $("temperature").value : "",
    reasoning_effort: $("effort-field").hidden ? "" : $("reasoning-effort").value,
  };
  if (prompt !== (saved.system_prompt || "") && options.hasMessages()) {
    $("settings-dialog").close();
    const sure = await confirmDialog({
      title: "Change the system prompt?",
      body: editWarning() || "The provider's cached prefix will be lost: the next reply re-reads the whole conversation at the full input price.",
      ok: "Change it",
    });
    if (!sure) return;
  }
  try {
    const conversation = await options.ensureConversation();
    saved = await postForm(`/api/conversations/${conversation.id}/settings`, fields, "Settings were not saved.");
    $("settings-dialog").close();
    options.onSaved(saved);
  } catch (failure) {
    $("settings-error").textContent = failure.message;
    $("settings-error").hidden = false;
    if (!$("settings-dialog").open) $("settings-dialog").showModal();
  }
}
