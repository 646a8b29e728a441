"""Moonshot (Kimi Open Platform): `POST {MOONSHOT_BASE_URL}/chat/completions`.

Differences from the generic OpenAI-compatible client (../shared/KIMI-PROTOCOL.md §1, §3, §5),
applied per the model family's request contract (ChatRequest.contract, from the catalog):
- K2.5 / K2.6: thinking is a top-level `{"thinking": {"type": "enabled"|"disabled"}}`;
- K2.7 Code: thinking is always on and "disabled" is a 400, so no thinking parameter is sent;
- K3 / K3.x: no thinking parameter at all; `reasoning_effort` only when a non-default value was
  chosen; `max_completion_tokens` from the family's default;
- every Kimi family pins temperature, top_p, n and the penalties (400 to any other value), so
  none of them is ever sent;
- assistant turns echo `reasoning_content` exactly as received (tool-call turns; every turn
  for K2.7 Code and K3);
- errors are Moonshot's `{"error": {"message", "type"}}` (429 hint only in the text); a 401 says
  which platform the base URL is on, since .ai and .cn keys are not interchangeable.
"""

import httpx

from . import errors
from .base import ChatRequest, ProviderError
from .openai_compat import OpenAICompatClient

# Moonshot pins these for every Kimi model and answers 400 to any other value. A model row
# without a contract yet (before the first catalog sync) is still recognised by its id.
FIXED_SAMPLING_MODELS = ("kimi-k2", "kimi-k3")
SAMPLING_KEYS = ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty")
PLATFORMS = {"api.moonshot.ai": "api.moonshot.cn", "api.moonshot.cn": "api.moonshot.ai"}


class MoonshotClient(OpenAICompatClient):
    kind = "moonshot"
    reasoning_fields = ("reasoning_content",)
    echo_reasoning_details = False

    def build_body(self, request: ChatRequest) -> dict:
        body = super().build_body(request)
        body.pop("chat_template_kwargs", None)
        thinking = request.thinking_param
        if thinking is not None:
            body["thinking"] = {"type": "enabled" if thinking else "disabled"}
        if not request.sampling_allowed or (
            not request.contract and request.model.startswith(FIXED_SAMPLING_MODELS)
        ):
            for key in SAMPLING_KEYS:
                body.pop(key, None)
        return body

    def error_from_response(self, status: int, raw: bytes, headers: httpx.Headers) -> ProviderError:
        error = super().error_from_response(status, raw, headers)
        if isinstance(error, errors.InvalidKey):
            host = httpx.URL(self.base_url).host
            other = PLATFORMS.get(host)
            if other:
                error.staff_message += (
                    f" This provider calls {host}; a key made on the other platform ({other}) "
                    f"is refused with 401: keys of platform.moonshot.ai and "
                    f"platform.moonshot.cn are not interchangeable (set MOONSHOT_BASE_URL "
                    f"to https://{other}/v1 for a key of that platform)."
                )
        return error
