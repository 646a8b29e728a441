// The chosen theme before first paint, so a forced theme never flashes the system one. A
// classic (blocking) script in <head>, a file of its own: the CSP allows no inline script.
try {
  const t = localStorage.getItem("theme");
  if (t === "light" || t === "dark") document.documentElement.dataset.theme = t;
} catch (e) { /* storage blocked: the system theme */ }
