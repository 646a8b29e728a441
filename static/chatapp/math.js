// Math in model output: a marked extension that turns $…$, \(…\), $$…$$ and \[…\] into
// placeholders carrying the TeX, and a lazy KaTeX loader that typesets them. KaTeX (JS, CSS,
// fonts) is fetched only the first time a message actually contains math.
let katex = null;
let loading = null;

const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const placeholder = (tag, cls, tex) =>
  `<${tag} class="${cls}" data-tex="${escapeHtml(tex)}">${escapeHtml(tex)}</${tag}>`;

export const mathExtension = {
  extensions: [
    {
      name: "mathBlock",
      level: "block",
      start(src) {
        const at = src.search(/\$\$|\\\[/);
        return at < 0 ? undefined : at;
      },
      tokenizer(src) {
        const match = /^\$\$([\s\S]+?)\$\$[^\S\n]*(?:\n|$)/.exec(src) || /^\\\[([\s\S]+?)\\\][^\S\n]*(?:\n|$)/.exec(src);
        if (match) return { type: "mathBlock", raw: match[0], text: match[1].trim() };
        return undefined;
      },
      renderer: (token) => placeholder("div", "math math-display", token.text),
    },
    {
      name: "mathInline",
      level: "inline",
      start(src) {
        const at = src.search(/\$|\\\(/);
        return at < 0 ? undefined : at;
      },
      tokenizer(src) {
        // $…$ must hug its content and not be followed by a digit, so "$5 and $10" stays text.
        const match = /^\$\$([^$]+?)\$\$/.exec(src) ||
          /^\$(?![\s$])((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/.exec(src) ||
          /^\\\(([\s\S]+?)\\\)/.exec(src);
        if (match) return { type: "mathInline", raw: match[0], text: match[1] };
        return undefined;
      },
      renderer: (token) => placeholder("span", "math math-inline", token.text),
    },
  ],
};

function typeset(el) {
  try {
    katex.render(el.dataset.tex, el, {
      displayMode: el.classList.contains("math-display"),
      throwOnError: false,
      trust: false, // no \href, \url or \htmlClass from model output
      output: "htmlAndMathml",
    });
  } catch {
    return; // leave the TeX source visible
  }
  el.classList.add("typeset");
}

function load() {
  if (!loading) {
    const css = document.createElement("link");
    css.rel = "stylesheet";
    css.href = new URL("../vendor/katex/katex.min.css", import.meta.url).href;
    document.head.append(css);
    loading = import("../vendor/katex/katex.mjs").then((module) => {
      katex = module.default;
    });
  }
  return loading;
}

// Typeset every math placeholder under `root` now if KaTeX is here, else once it has loaded.
export function typesetMath(root) {
  const pending = root.querySelectorAll("[data-tex]:not(.typeset)");
  if (!pending.length) return;
  if (katex) {
    pending.forEach(typeset);
    return;
  }
  load().then(() => document.querySelectorAll("[data-tex]:not(.typeset)").forEach(typeset));
}
