"""Upstream failures -> typed ProviderErrors with the message the user sees and a retry policy.

One mapping per provider family, from the wire facts in ../shared/KIMI-PROTOCOL.md §2 and §5:
- Moonshot: `{"error": {"message", "type", "code"?}}`; the 429 retry hint is only in the text
  ("please try again after 1 seconds"), never in a Retry-After header; three 429 types differ.
- Workers AI: the v4 envelope `{"result", "success", "errors": [{"code", "message"}], "messages"}`
  with internal codes (3040 capacity, 3036 / 5035 allocation / paid plan, 3006 too large).
- OpenRouter and other resellers: `{"error": {"code": <http status>, "message", "metadata":
  {"raw": "<upstream body>"}}}`; the upstream body, when it is Moonshot's, is mapped as Moonshot.

Retryable errors are retried by generation (before the first token only), honouring
`retry_after`; the others end the reply at once with their message.
"""

import json
import re

from .base import ProviderError

RETRY_AFTER_TEXT = re.compile(r"after (\d+(?:\.\d+)?) ?s", re.IGNORECASE)
# Tokens-per-minute 429s. Moonshot: "... project TPM rate limit, current: 1410, limit: 100"
# (current includes the refused request); OpenAI-style: "... on tokens per min (TPM): Limit
# 30000, Used 0, Requested 45000".
TPM_LIMIT_TEXT = re.compile(r"\bTPM\b.{0,60}?\blimit\b\W{0,3}(\d+)", re.IGNORECASE)
TPM_REQUESTED_TEXT = re.compile(r"\brequested\W{0,3}(\d+)", re.IGNORECASE)
MAX_DETAIL = 2000


class RateLimited(ProviderError):
    default_code = "rate_limited"


class Overloaded(ProviderError):
    default_code = "overloaded"


class BillingProblem(ProviderError):
    default_code = "billing"


class InvalidKey(ProviderError):
    default_code = "auth"


class PermissionDenied(ProviderError):
    default_code = "forbidden"


class ContentFiltered(ProviderError):
    default_code = "content_filter"


class ContextTooLong(ProviderError):
    default_code = "context_too_long"


class UnsupportedImage(ProviderError):
    default_code = "unsupported_image"


class RequestTooLarge(ProviderError):
    default_code = "request_too_large"


class ModelNotFound(ProviderError):
    default_code = "model_not_found"


class UpstreamServerError(ProviderError):
    default_code = "upstream_error"


class UpstreamTimeout(ProviderError):
    default_code = "upstream_timeout"


class BadRequest(ProviderError):
    default_code = "bad_request"


class NeverFits(ProviderError):
    """A 429 whose tokens-per-minute limit is below the request's own size: waiting for the
    minute to pass cannot help, so it is final."""

    default_code = "over_token_rate_limit"


MESSAGES = {
    RateLimited: "The model provider's rate limit was reached. Please try again shortly.",
    Overloaded: "The model provider is overloaded right now. Please try again shortly.",
    BillingProblem: (
        "The model provider account has a billing problem (out of credit or quota). "
        "An administrator needs to check the provider's billing."
    ),
    InvalidKey: "The provider key is invalid. Ask an administrator to check it.",
    PermissionDenied: "The provider refused access to this model. Ask an administrator.",
    ContentFiltered: (
        "The provider's content filter rejected this request. Rephrase the message and try again."
    ),
    ContextTooLong: (
        "This conversation is too long for the model's context window. "
        "Start a new conversation or remove some images."
    ),
    UnsupportedImage: "The model cannot read one of the images (use PNG, JPEG, WebP or GIF).",
    RequestTooLarge: (
        "The request is too large for the provider. Send fewer or smaller images, "
        "or start a new conversation."
    ),
    ModelNotFound: "The provider does not offer this model. Ask an administrator to check it.",
    UpstreamServerError: "The model provider had a server error. Please try again.",
    UpstreamTimeout: "The model provider timed out. Please try again.",
    BadRequest: (
        "The model provider refused the request. Try rephrasing it or removing an image; "
        "if it keeps happening, ask an administrator (the reason is in the server log)."
    ),
    NeverFits: (
        "This request is larger than the provider account's tokens-per-minute limit, so it "
        "can never be sent as it is. Start a new conversation with less text or fewer images, "
        "or ask an administrator to raise the provider's limit."
    ),
}
RETRYABLE = {RateLimited, Overloaded, UpstreamServerError, UpstreamTimeout}


def make(
    kind: type[ProviderError],
    *,
    status: int | None,
    detail: str = "",
    retry_after: float | None = None,
    message: str | None = None,
    staff_message: str = "",
    tokens_per_minute: int | None = None,
) -> ProviderError:
    return kind(
        message or MESSAGES[kind],
        retryable=kind in RETRYABLE,
        retry_after=retry_after if kind in RETRYABLE else None,
        status=status,
        code=kind.default_code,
        detail=detail[:MAX_DETAIL],
        staff_message=staff_message,
        tokens_per_minute=tokens_per_minute,
    )


def tokens_per_minute_limit(text: str) -> tuple[int | None, int | None]:
    """(the TPM limit, the request's own size when the text states it) of a 429's message."""
    limit = TPM_LIMIT_TEXT.search(text or "")
    if limit is None:
        return None, None
    requested = TPM_REQUESTED_TEXT.search(text)
    return int(limit.group(1)), int(requested.group(1)) if requested else None


def never_fits(exc: ProviderError, *, request_tokens: int) -> ProviderError | None:
    """The final error for a tokens-per-minute 429 when the request alone (estimated by the
    caller) is larger than the limit; None when waiting may help."""
    if exc.tokens_per_minute is None or request_tokens <= exc.tokens_per_minute:
        return None
    return make(NeverFits, status=exc.status, detail=exc.detail)


def retry_after_from_text(text: str) -> float | None:
    match = RETRY_AFTER_TEXT.search(text or "")
    return float(match.group(1)) if match else None


def _detail(body: object) -> str:
    try:
        return json.dumps(body, ensure_ascii=False)[:MAX_DETAIL]
    except (TypeError, ValueError):
        return str(body)[:MAX_DETAIL]


def _is_billing(text: str) -> bool:
    return any(
        word in text
        for word in ("exceeded_current_quota", "quota", "insufficient balance", "recharge")
    )


def _classify_400(text: str) -> type[ProviderError] | None:
    if "content_filter" in text or "high risk" in text or "content filter" in text:
        return ContentFiltered
    if (
        "token limit" in text
        or "token length too long" in text
        or "context length" in text
        or "context_length" in text
        or "maximum context" in text
        or "too long" in text
    ):
        return ContextTooLong
    if "unsupported image" in text or "image format" in text or "image url" in text:
        return UnsupportedImage
    return None


def classify(
    *, status: int | None, error_type: str, message: str, retry_after: float | None, detail: str
) -> ProviderError:
    """The shared table: HTTP status + error type + message text -> a typed error."""
    text = f"{error_type} {message}".lower()
    if retry_after is None:
        retry_after = retry_after_from_text(message)
    if status == 402 or _is_billing(text):
        return make(BillingProblem, status=status, detail=detail)
    if status == 401:
        return make(InvalidKey, status=status, detail=detail)
    if status == 429:
        if "overloaded" in text:
            return make(Overloaded, status=status, detail=detail, retry_after=retry_after)
        limit, requested = tokens_per_minute_limit(message)
        if limit is not None and requested is not None and requested > limit:
            return make(NeverFits, status=status, detail=detail)
        return make(
            RateLimited,
            status=status,
            detail=detail,
            retry_after=retry_after,
            tokens_per_minute=limit,
        )
    if status == 413:
        return make(RequestTooLarge, status=status, detail=detail)
    if status == 408:
        return make(UpstreamTimeout, status=status, detail=detail, retry_after=retry_after)
    if status is not None and status >= 500:
        if "overloaded" in text:
            return make(Overloaded, status=status, detail=detail, retry_after=retry_after)
        return make(UpstreamServerError, status=status, detail=detail, retry_after=retry_after)
    if status == 403:
        if "moderation" in text or "flagged" in text:
            return make(ContentFiltered, status=status, detail=detail)
        return make(PermissionDenied, status=status, detail=detail)
    if status == 404:
        return make(ModelNotFound, status=status, detail=detail)
    kind = _classify_400(text)
    if kind is not None:
        return make(kind, status=status, detail=detail)
    # The upstream's own words go to the log and staff only (scrubbed by ProviderError): an
    # upstream may quote the request, Authorization header included.
    shown = message.strip()[:300] or "no reason given"
    return make(
        BadRequest,
        status=status,
        detail=detail,
        staff_message=f"The model provider refused the request: {shown}",
    )


def from_openai_body(
    body: object, *, status: int | None, retry_after: float | None = None
) -> ProviderError:
    """Moonshot / OpenAI / OpenRouter `{"error": {...}}` bodies (also after a 200, mid-stream)."""
    detail = _detail(body)
    error = body.get("error", body) if isinstance(body, dict) else body
    message, error_type, code = "", "", None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        error_type = str(error.get("type") or "")
        code = error.get("code")
        raw = (error.get("metadata") or {}).get("raw") if error.get("metadata") else None
        # OpenRouter wraps the upstream's own body; Moonshot's is more precise than the wrapper.
        if isinstance(raw, str) and raw.strip().startswith("{"):
            try:
                inner = json.loads(raw)
            except ValueError:
                inner = None
            if isinstance(inner, dict) and isinstance(inner.get("error"), dict):
                message = str(inner["error"].get("message") or message)
                error_type = str(inner["error"].get("type") or error_type)
    elif isinstance(error, str):
        message = error
    if status is None and isinstance(code, int):
        status = code
    if status is None and error_type in ("content_filter",):
        status = 400
    if status is None:
        status = 500 if "server" in error_type else 400
    return classify(
        status=status,
        error_type=error_type,
        message=message,
        retry_after=retry_after,
        detail=detail,
    )


# Cloudflare internal codes (platform/errors.mdx, gateway-core workers-ai-errors.ts).
WORKERS_AI_CODES: dict[int, type[ProviderError]] = {
    3040: Overloaded,  # out of capacity / rejectIfBusy: retried
    3036: BillingProblem,  # daily free allocation used: not retried
    5035: BillingProblem,  # Workers Paid plan required: not retried
    3006: RequestTooLarge,
    3007: UpstreamTimeout,
    3008: UpstreamTimeout,
    5007: ModelNotFound,
    3042: ModelNotFound,
    10000: InvalidKey,  # Cloudflare API "Authentication error"
    10001: InvalidKey,
}
WORKERS_AI_MESSAGES = {
    3040: "Workers AI is out of capacity right now. Please try again shortly.",
    3036: (
        "The Cloudflare account has used its daily free Workers AI allocation. "
        "An administrator needs to upgrade the plan or wait until tomorrow."
    ),
    5035: (
        "This model needs the Workers Paid plan on the Cloudflare account. "
        "An administrator needs to check the plan."
    ),
}


def from_workers_ai(
    body: object, *, status: int | None, retry_after: float | None = None
) -> ProviderError:
    """A Cloudflare v4 envelope (`errors: [{code, message}]`), or an OpenAI-style body."""
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        first = body["errors"][0] if isinstance(body["errors"][0], dict) else {}
        code = first.get("code")
        message = str(first.get("message") or "")
        if not isinstance(code, int):
            # The binding's style "3040: Capacity temporarily exceeded" also appears in text.
            match = re.match(r"\s*(\d{4,5})\s*:", message)
            code = int(match.group(1)) if match else None
        kind = WORKERS_AI_CODES.get(code)
        detail = _detail(body)
        if kind is not None:
            return make(
                kind,
                status=status,
                detail=detail,
                retry_after=retry_after,
                message=WORKERS_AI_MESSAGES.get(code),
            )
        return classify(
            status=status or 400,
            error_type="",
            message=message,
            retry_after=retry_after,
            detail=detail,
        )
    return from_openai_body(body, status=status, retry_after=retry_after)


def parse_error_body(raw: bytes) -> object:
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return {"error": {"message": text.strip()[:500]}}


def retry_after_header(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None
