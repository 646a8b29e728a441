"""The seam between the app and every provider: one request type, one stream item, one error."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .scrub import scrub


@dataclass(slots=True)
class ChatRequest:
    """What generation asks of a provider; each provider kind turns it into its own wire body."""

    model: str  # the upstream model id
    messages: list[dict]  # OpenAI-shaped, already in their final order
    affinity_id: str  # sent as x-session-affinity so the provider's prefix cache hits
    thinking: bool | None = None  # None = the provider's default
    max_output_tokens: int | None = None
    temperature: float | None = None
    # The model family's request contract (chatapp/providers/kimi_catalog.json "contracts"):
    # which thinking switch, whether sampling may be sent, reasoning_effort values, which
    # assistant turns echo their reasoning. Empty = a plain OpenAI-compatible model.
    contract: dict = field(default_factory=dict)
    reasoning_effort: str | None = None  # sent only when the contract allows this value
    # Structured output (batches): {"type": "json_schema", ...} or {"type": "json_object"}.
    response_format: dict | None = None

    @property
    def thinking_param(self) -> bool | None:
        """The thinking switch to send, or None to send none: only a family with a switch gets
        one (K2.7 Code always thinks and rejects "disabled"; K3 has no such parameter)."""
        if self.contract.get("thinking", "switch") != "switch":
            return None
        return self.thinking

    @property
    def sampling_allowed(self) -> bool:
        return self.contract.get("sampling", "free") != "fixed"

    @property
    def effort_param(self) -> str | None:
        """reasoning_effort to send: a value the family lists, and not its default."""
        allowed = self.contract.get("reasoning_effort") or ()
        if self.reasoning_effort in allowed and self.reasoning_effort != self.contract.get(
            "reasoning_effort_default"
        ):
            return self.reasoning_effort
        return None

    @property
    def echo_all_reasoning(self) -> bool:
        return self.contract.get("echo_reasoning") == "all"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0  # includes the cached ones
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class StreamItem:
    """One parsed upstream event: any field may be empty."""

    content: str = ""
    reasoning: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # raw OpenAI tool-call deltas
    model: str = ""  # the `model` the provider says answered (resellers may redirect)
    reasoning_details: list[dict] = field(default_factory=list)  # OpenRouter-style deltas


class ProviderError(Exception):
    """A failure talking to a provider, with the message the user sees and whether to retry."""

    def __init__(
        self,
        user_message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
        code: str = "upstream_error",
        detail: str = "",
        staff_message: str = "",
        tokens_per_minute: int | None = None,
    ) -> None:
        super().__init__(user_message)
        self.user_message = user_message
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
        self.code = code
        # Upstream text, for logs and staff only, scrubbed of keys (an upstream may echo the
        # request's Authorization header).
        self.detail = scrub(detail)
        # A fuller message for staff (e.g. which provider key failed); never holds the key.
        self.staff_message = scrub(staff_message)
        # A 429 that names the tokens-per-minute limit: a request larger than this never fits.
        self.tokens_per_minute = tokens_per_minute

    def message_for(self, *, staff: bool) -> str:
        return self.staff_message if staff and self.staff_message else self.user_message

    def __repr__(self) -> str:
        return f"ProviderError({self.code!r}, status={self.status}, retryable={self.retryable})"


class ProviderClient:
    """Base class: stream() yields StreamItems until the reply ends, or raises ProviderError."""

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None
