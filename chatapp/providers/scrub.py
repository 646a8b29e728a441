"""Scrub secrets out of text that came from (or went to) a provider, before it is stored,
logged or shown to staff.

An upstream may quote the request back in an error (some proxies echo the Authorization
header), and an exception's repr may hold a header or a URL. Everything of the upstream's that
the app keeps or logs passes through `scrub()`: ProviderError's detail and staff message at
construction, and every log record (install_log_scrubber, from the app config, as a backstop).

What is removed:
- every configured key: the provider keys in the environment, and every key this process has
  encrypted or decrypted (chatapp/providers/keys.py registers each one: a Provider row's key is
  decrypted before any request uses it, so a key an upstream can echo is always known here);
- anything shaped like a credential: `Bearer …`, `Authorization: …`, `sk-…` keys, `x-api-key`
  / `api_key=` values, Cloudflare-style 40-character tokens.

No database access: it runs inside logging, from any thread or the event loop.
"""

import logging
import re
import threading

from django.conf import settings

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 6
ENV_SECRETS = ("MOONSHOT_API_KEY", "OPENAI_COMPAT_API_KEY", "CLOUDFLARE_API_TOKEN")

_known: set[str] = set()
_lock = threading.Lock()

PATTERNS = (
    # "Authorization: Bearer abc", "authorization": "Bearer abc", Authorization=abc
    (
        re.compile(
            r"""(\b(?:proxy-)?authorization\b["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?"""
            r"""[^\s"',;}]+""",
            re.IGNORECASE,
        ),
        r"\1" + REDACTED,
    ),
    (re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE), "Bearer " + REDACTED),
    (
        re.compile(
            r"""(\b(?:x-api-key|api[_-]?key|x-auth-key|access[_-]?token|api[_-]?token)\b["']?"""
            r"""\s*[:=]\s*["']?)[^\s"',;&}]+""",
            re.IGNORECASE,
        ),
        r"\1" + REDACTED,
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), "sk-" + REDACTED),
    # Cloudflare API tokens: 40 characters of [A-Za-z0-9_-] mixing cases and digits (a hex
    # digest, lower case only, is left alone).
    (
        re.compile(
            r"(?<![A-Za-z0-9_\-])(?=[A-Za-z0-9_\-]*[a-z])(?=[A-Za-z0-9_\-]*[A-Z])"
            r"(?=[A-Za-z0-9_\-]*[0-9])[A-Za-z0-9_\-]{40}(?![A-Za-z0-9_\-])"
        ),
        REDACTED,
    ),
)


def remember(secret: str | None) -> None:
    """Register a key to scrub from now on (keys.py calls this for every key it handles)."""
    if secret and len(secret.strip()) >= MIN_SECRET_LENGTH:
        with _lock:
            _known.add(secret.strip())


def known_secrets() -> list[str]:
    secrets = set(_known)
    for name in ENV_SECRETS:
        value = getattr(settings, name, "") or ""
        if len(value.strip()) >= MIN_SECRET_LENGTH:
            secrets.add(value.strip())
    # Longest first, so a key that contains another is removed whole.
    return sorted(secrets, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` without any configured key or credential-shaped value."""
    if not text:
        return text or ""
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_installed = False


def install_log_scrubber() -> None:
    """Scrub every log record's message as it is made (a LogRecord factory, so every handler
    sees the scrubbed text: the console, files, test capture). Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to logging to report
            return record
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # The traceback is formatted later by each handler: format (and scrub) it now.
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
