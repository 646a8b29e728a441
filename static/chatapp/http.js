// Small fetch helpers for the page's JSON endpoints: CSRF header, same-origin cookies, and one
// Error carrying the server's own message.
const csrfToken = () => document.querySelector("input[name=csrfmiddlewaretoken]").value;

async function parse(response, fallback) {
  let body = {};
  try { body = await response.json(); } catch { /* not JSON: use the fallback message */ }
  if (!response.ok) throw new Error(body.message || fallback);
  return body;
}

export async function postForm(url, fields = {}, fallback = "That did not work. Try again.") {
  // Url-encoded, not multipart: Django refuses an empty multipart body with a bare 400.
  const body = new URLSearchParams();
  for (const [key, value] of Object.entries(fields)) body.append(key, value ?? "");
  let response;
  try {
    response = await fetch(url, {
      method: "POST", body, credentials: "same-origin", headers: { "X-CSRFToken": csrfToken() },
    });
  } catch {
    throw new Error("Could not reach the server. Check your connection and try again.");
  }
  return parse(response, fallback);
}

export async function getJSON(url, fallback = "That did not work. Try again.") {
  let response;
  try {
    response = await fetch(url, { credentials: "same-origin" });
  } catch {
    throw new Error("Could not reach the server. Check your connection and try again.");
  }
  return parse(response, fallback);
}
