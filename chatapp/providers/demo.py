"""The offline demo model: a canned, helpful reply streamed at a realistic pace.

It lets a newcomer see the product work with no key and no network. It never claims to be Kimi.
"""

import asyncio
import re
from collections.abc import AsyncIterator

from .base import ChatRequest, ProviderClient, StreamItem, Usage

DEMO_REPLY = """\
This is the **offline demo model**: no provider key is configured, so this reply is canned and \
streamed locally at a realistic pace. It is *not* Kimi.

You asked:

> {question}

To chat with a real model, set a provider in the environment and restart:

| Provider | Variables |
| --- | --- |
| Moonshot (Kimi K3, K2.6, K2.7 Code) | `MOONSHOT_API_KEY` |
| Cloudflare Workers AI (Kimi K3, K2.6) | `CLOUDFLARE_ACCOUNT_ID`, `CLOUDFLARE_API_TOKEN` |
| Any OpenAI-compatible server | `OPENAI_COMPAT_BASE_URL`, `OPENAI_COMPAT_API_KEY`, `OPENAI_COMPAT_MODELS` |

For example:

```bash
export MOONSHOT_API_KEY=sk-...
.venv/bin/python manage.py start
```

Everything else works as with a real model: press **Stop** to cancel a reply and keep what \
arrived, reload to see the whole conversation, and attach screenshots to ask about them."""

TOKEN = re.compile(r"\s*\S+|\s+")


class DemoClient(ProviderClient):
    kind = "demo"

    def __init__(self, *, tokens_per_second: float = 45.0) -> None:
        self.delay = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        question = _last_user_text(request.messages).strip() or "(an empty message)"
        quoted = "\n> ".join(question.splitlines()[:6])[:500]
        tokens = TOKEN.findall(DEMO_REPLY.format(question=quoted))
        for token in tokens:
            await asyncio.sleep(self.delay)
            yield StreamItem(content=token)
        prompt = sum(len(str(m.get("content", ""))) for m in request.messages) // 4
        yield StreamItem(
            finish_reason="stop",
            usage=Usage(prompt_tokens=prompt, cached_tokens=0, completion_tokens=len(tokens)),
        )


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""
