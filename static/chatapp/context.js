// The context-window meter in the chat header, and the budget for "Retry with a larger budget".
// Fed by the server's `context` object {used, window, percent, budget, cache_hit_rate}, which
// rides on the page data, the "state" frame and every "reply.end" frame.
let current = null;

export function showContext(context) {
  const el = document.getElementById("context-meter");
  if (!el || !context || !context.window) return;
  current = context;
  const percent = Math.min(100, context.percent);
  el.hidden = false;
  el.dataset.level = percent >= 90 ? "full" : percent >= 70 ? "high" : "ok";
  el.querySelector("meter").value = percent / 100;
  let text = `${percent.toFixed(0)}% of context`;
  if (context.cache_hit_rate != null) text += ` · ${Math.round(context.cache_hit_rate * 100)}% cached`;
  el.querySelector(".context-text").textContent = text;
  el.title =
    `About ${context.used.toLocaleString()} of ${context.window.toLocaleString()} tokens used; ` +
    `next reply budget ${Number(context.budget || 0).toLocaleString()} tokens.`;
}

// Double the budget (at least 16k, the usual need of a thinking model), within the window.
export function largerBudget() {
  const budget = (current && current.budget) || 8192;
  const room = current ? current.window - current.used - 1024 : Infinity;
  return Math.max(256, Math.min(Math.max(budget * 2, 16384), room));
}

// The server's warning that an edit drops the cached prefix ("" when nothing is cached yet).
export function editWarning() {
  return (current && current.edit_warning) || "";
}
