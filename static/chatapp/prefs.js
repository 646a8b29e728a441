// Theme (system / light / dark, remembered on this device) and the keyboard shortcut help.
const THEMES = ["system", "light", "dark"];
const ICONS = { system: "◐", light: "☀", dark: "☾" };

function current() {
  try {
    const stored = localStorage.getItem("theme");
    return THEMES.includes(stored) ? stored : "system";
  } catch {
    return "system";
  }
}

function apply(theme) {
  const root = document.documentElement;
  if (theme === "system") delete root.dataset.theme;
  else root.dataset.theme = theme;
  // highlight.js ships one sheet per scheme: switch them with the page, not only the system.
  for (const sheet of document.querySelectorAll("link[data-theme-sheet]")) {
    const scheme = sheet.dataset.themeSheet;
    sheet.media = theme === "system" ? `(prefers-color-scheme: ${scheme})` : (theme === scheme ? "all" : "not all");
  }
  const button = document.getElementById("theme-toggle");
  if (button) {
    const next = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
    button.textContent = ICONS[theme];
    button.setAttribute("aria-label", `Theme: ${theme}. Switch to ${next}`);
    button.title = `Theme: ${theme} (click for ${next})`;
  }
}

export function setupPrefs() {
  apply(current());
  document.getElementById("theme-toggle")?.addEventListener("click", () => {
    const next = THEMES[(THEMES.indexOf(current()) + 1) % THEMES.length];
    try { localStorage.setItem("theme", next); } catch { /* private mode: this page only */ }
    apply(next);
  });
  document.getElementById("shortcuts-open")?.addEventListener("click", () => {
    document.getElementById("shortcuts-dialog").showModal();
  });
}
