// The per-conversation settings dialog: system prompt, max output tokens, thinking (only for
// models that reason) and temperature (only where the provider allows it: Kimi on Moonshot fixes
// it by mode, so the dialog shows the fixed values instead of a slider the provider would reject).
import { editWarning } from "./context.js";
import { confirmDialog } from "./dialogs.js";
import { postForm } from "./http.js";

const $ = (id) => document.getElementById(id);
let options = null;
let saved = { system_prompt: "", max_output_tokens: null, thinking: null, temperature: null };

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

function open() {
  const model = currentModel();
  $("settings-model").textContent = model ? `Model: ${model.name}` : "";
  $("system-prompt").value = saved.system_prompt || "";
  $("system-prompt-warning").hidden = true;
  $("max-output-tokens").value = saved.max_output_tokens ?? "";
  const reasoning = Boolean(model && model.reasoning);
  $("thinking-field").hidden = !reasoning;
  $("thinking").checked = saved.thinking !== false;
  const fixed = model && model.fixed_temperature;
  $("temperature-field").hidden = Boolean(fixed);
  $("temperature-fixed").hidden = !fixed;
  if (fixed) {
    $("temperature-fixed").textContent = reasoning
      ? `Temperature: fixed by the provider at ${fixed.thinking.toFixed(1)} with thinking, ${fixed.instant.toFixed(1)} without.`
      : `Temperature: fixed by the provider at ${fixed.instant.toFixed(1)}.`;
  }
  $("temperature-default").checked = saved.temperature == null;
  $("temperature").value = saved.temperature ?? 1;
  showTemperature();
  $("settings-error").hidden = true;
  $("settings-dialog").showModal();
  $("system-prompt").focus();
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
    thinking: model && model.reasoning ? String($("thinking").checked) : "",
    temperature: !$("temperature-field").hidden && !$("temperature-default").checked ? $("temperature").value : "",
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
