"""Moonshot (Kimi Open Platform): `POST {MOONSHOT_BASE_URL}/chat/completions`.

Differences from the generic OpenAI-compatible client (../shared/KIMI-PROTOCOL.md §1, §3, §5):
- thinking is a top-level `{"thinking": {"type": "enabled"|"disabled"}}`, never sent together
  with `reasoning_effort`;
- kimi-k2.5 / k2.6 pin temperature, top_p, n and the penalties and answer 400 to any other value,
  so none of them is ever sent for those models;
- assistant tool-call turns echo `reasoning_content` exactly as received;
- errors are Moonshot's `{"error": {"message", "type"}}` (429 hint only in the text).
"""

from .base import ChatRequest
from .openai_compat import OpenAICompatClient

# Moonshot pins these for kimi-k2.5 / k2.6 and answers 400 to any other value.
FIXED_SAMPLING_MODELS = ("kimi-k2.5", "kimi-k2.6")
SAMPLING_KEYS = ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty")


class MoonshotClient(OpenAICompatClient):
    kind = "moonshot"
    reasoning_fields = ("reasoning_content",)
    echo_reasoning_details = False

    def build_body(self, request: ChatRequest) -> dict:
        body = super().build_body(request)
        body.pop("chat_template_kwargs", None)
        body.pop("reasoning_effort", None)
        if request.thinking is not None:
            body["thinking"] = {"type": "enabled" if request.thinking else "disabled"}
        if request.model.startswith(FIXED_SAMPLING_MODELS):
            for key in SAMPLING_KEYS:
                body.pop(key, None)
        return body
