"""Page figures: compressed bytes and requests for the first load of the chat page.

Not a browser: it logs in over HTTP, fetches the chat page with `Accept-Encoding: gzip, br` and
every asset the page loads at once (scripts, stylesheets, icons, module preloads, and the static
`import ... from` graph of the ES modules), counting the bytes as sent on the wire (compressed
bodies plus response headers). Dynamic `import()` targets are lazy (loaded only when needed) and
are listed separately, not counted in the first load. Images referenced from CSS are not
followed (the page has none at the time of writing).
"""

import re
from urllib.parse import urljoin, urlparse

import httpx

TAG = re.compile(r"""<(script|link|img)\b[^>]*>""", re.I)
ATTR = re.compile(r"""\b(src|href|rel)=["']([^"']*)["']""", re.I)
STATIC_IMPORT = re.compile(
    r"""(?:^|[;\n])\s*(?:import|export)\s[^'"();]*?\bfrom\s*["']([^"']+)["']|(?:^|[;\n])\s*import\s*["']([^"']+)["']"""
)
DYNAMIC_IMPORT = re.compile(r"""\bimport\(\s*["']([^"']+)["']\s*\)""")
FIRST_LOAD_RELS = {"stylesheet", "modulepreload", "icon", "preload", "shortcut"}


def login(client: httpx.Client, base: str, username: str, password: str) -> None:
    page = client.get(urljoin(base, "/login/"))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    response = client.post(
        urljoin(base, "/login/"),
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": token.group(1) if token else "",
        },
        headers={"Referer": urljoin(base, "/login/")},
    )
    if response.status_code != 302 or "sessionid" not in client.cookies:
        raise RuntimeError(f"bench login failed: HTTP {response.status_code}")


def _fetch(client: httpx.Client, url: str) -> tuple[int, int, str, bytes]:
    """-> (body bytes on the wire, header bytes, content-encoding, decoded body)."""
    with client.stream("GET", url, headers={"Accept-Encoding": "gzip, br"}) as response:
        raw = b"".join(response.iter_raw())
        headers = sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 17
        encoding = response.headers.get("content-encoding", "identity")
        body = raw
        if encoding == "gzip":
            import gzip

            body = gzip.decompress(raw)
        elif encoding == "br":
            try:
                import brotli

                body = brotli.decompress(raw)
            except ImportError:
                # Without a brotli decoder, fetch the identity body just to read its imports.
                body = client.get(url, headers={"Accept-Encoding": "identity"}).content
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
        return len(raw), headers, encoding, body


def page_weight(base: str, username: str, password: str) -> dict:
    with httpx.Client(follow_redirects=False, timeout=30) as client:
        login(client, base, username, password)
        origin = urlparse(base).netloc
        seen: dict[str, dict] = {}
        lazy: set[str] = set()
        queue = [urljoin(base, "/")]
        while queue and len(seen) < 200:
            url = queue.pop(0)
            if url in seen:
                continue
            body_bytes, header_bytes, encoding, body = _fetch(client, url)
            seen[url] = {"body": body_bytes, "headers": header_bytes, "encoding": encoding}
            text = body.decode("utf-8", "replace")
            found: list[str] = []
            if url == urljoin(base, "/"):
                for tag in TAG.finditer(text):
                    attrs = {k.lower(): v for k, v in ATTR.findall(tag.group(0))}
                    ref = attrs.get("src") or attrs.get("href")
                    rels = set(attrs.get("rel", "").lower().split())
                    if not ref or (tag.group(1).lower() == "link" and not rels & FIRST_LOAD_RELS):
                        continue
                    found.append(ref)
            elif url.endswith((".js", ".mjs")):
                found += [a or b for a, b in STATIC_IMPORT.findall(text)]
                lazy.update(urljoin(url, m) for m in DYNAMIC_IMPORT.findall(text))
            for ref in found:
                target = urljoin(url, ref)
                if urlparse(target).netloc == origin and target not in seen:
                    queue.append(target)
        total_body = sum(v["body"] for v in seen.values())
        total_headers = sum(v["headers"] for v in seen.values())
        return {
            "method": "HTTP fetch of the page and its static asset graph (not a browser)",
            "requests": len(seen),
            "body_bytes": total_body,
            "header_bytes": total_headers,
            "transferred_bytes": total_body + total_headers,
            "assets": {urlparse(k).path: v for k, v in seen.items()},
            "lazy": sorted(urlparse(u).path for u in lazy - set(seen)),
        }
