// Markdown -> sanitised HTML. Model output is untrusted: it can never run script or load
// remote content (no images, frames, forms or styles; links only http(s)/mailto, opened safely).
import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/highlight.min.js";
import { mathExtension, typesetMath } from "./math.js";

const marked = new Marked({ gfm: true, breaks: false }, mathExtension);

const PURIFY = {
  FORBID_TAGS: ["img", "picture", "source", "video", "audio", "iframe", "frame", "object",
    "embed", "form", "input", "button", "textarea", "select", "style", "link", "meta", "base",
    "svg", "math"],
  FORBID_ATTR: ["style", "srcset", "background", "poster"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    if (!/^(https?:|mailto:|#)/i.test(href)) node.removeAttribute("href");
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function markdownToFragment(text) {
  const html = marked.parse(text || "");
  const fragment = DOMPurify.sanitize(html, { ...PURIFY, RETURN_DOM_FRAGMENT: true });
  for (const code of fragment.querySelectorAll("pre code")) {
    const lang = [...code.classList].find((c) => c.startsWith("language-"));
    if (lang && hljs.getLanguage(lang.slice(9))) {
      hljs.highlightElement(code);
    }
    addCopyButton(code.parentElement, lang ? lang.slice(9) : "");
  }
  return fragment;
}

function addCopyButton(pre, lang) {
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = lang;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-code";
  button.textContent = "Copy";
  button.setAttribute("aria-label", lang ? `Copy ${lang} code` : "Copy code");
  bar.append(label, button);
  pre.classList.add("has-copy");
  pre.prepend(bar);
}

export function renderInto(element, text) {
  element.replaceChildren(markdownToFragment(text));
  typesetMath(element);
}

export async function copyText(button, text) {
  const idle = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = idle; }, 1500);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy-code");
  if (!button) return;
  const code = button.closest("pre").querySelector("code");
  copyText(button, code ? code.textContent : "");
});
