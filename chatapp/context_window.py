"""Request settings and the context window: what each reply asks the provider for.

- thinking / max output tokens / temperature come from the conversation (None = the provider's
  default), the budget from the conversation, else the model, else DEFAULT_MAX_OUTPUT_TOKENS;
- the output budget is clamped so that the estimated input plus the budget fits the window
  (Kimi answers 400 "exceeded model token limit" otherwise, and reasoning eats the budget too);
- a conversation whose input alone no longer leaves room for a useful answer is refused before
  any call, with a clear message;
- how full the window is, the conversation's prompt-cache hit rate, and the warning that editing
  an early message or the system prompt loses the cached prefix, for the page.

Token counts are estimates (no tokenizer ships with the app): ~4 ASCII characters or 1 other
character per token, images by their pixel area (about one token per 14x14 tile), calibrated by
the last reply's real prompt_tokens when there is one. Estimates err on the large side.
Video: Moonshot documents no rule for counting it, so a recording is estimated as one frame a
second, each at one token per 28x28 px (the vision encoder merges 2x2 patches of 14 px), from
the MP4's own header (length and size); a PDF page or a key frame is an image.
"""

import base64
import binascii
import io
import logging
import math
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Sum
from PIL import Image, UnidentifiedImageError

from .access import conversation_project
from .errors import ClientError
from .models import AttachmentPart, Conversation, Message, ModelConfig
from .providers.base import ChatRequest
from .videos import mp4_summary

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD = 8  # role markers and separators of the chat template, per message
SAFETY_MARGIN = 512  # our estimate is approximate; keep this much spare
MIN_OUTPUT_TOKENS = 1024  # less than this left for the answer = refuse before calling
IMAGE_TILE = 14 * 14
IMAGE_FALLBACK_TOKENS = 1_500
VIDEO_FRAMES_PER_SECOND = 1
VIDEO_FRAME_TILE = 28 * 28
VIDEO_FALLBACK_TOKENS = 30_000


def text_tokens(text: str) -> int:
    if not text:
        return 0
    ascii_chars = len(text.encode("ascii", "ignore"))  # in C, not a loop per character
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def image_tokens(url: str) -> int:
    """Tokens of a data-URL image from its size; only the header bytes are decoded."""
    try:
        encoded = url.split(",", 1)[1]
        head = base64.b64decode(encoded[: 64 * 1024 // 3 * 4])
        with Image.open(io.BytesIO(head)) as image:
            width, height = image.size
    except (IndexError, ValueError, binascii.Error, UnidentifiedImageError, OSError):
        return IMAGE_FALLBACK_TOKENS
    return max(64, math.ceil(width * height / IMAGE_TILE))


def video_tokens(url: str) -> int:
    """Tokens of a data-URL MP4 (a stated estimate, see the module docstring)."""
    try:
        encoded = url.split(",", 1)[1]
        summary = mp4_summary(base64.b64decode(encoded[: 256 * 1024 // 3 * 4]))
    except (IndexError, ValueError, binascii.Error):
        summary = None
    if summary is None:
        return VIDEO_FALLBACK_TOKENS
    seconds, width, height = summary
    frames = max(1, math.ceil(seconds * VIDEO_FRAMES_PER_SECOND))
    return frames * max(64, math.ceil(width * height / VIDEO_FRAME_TILE))


def estimate_messages(messages: list[dict]) -> int:
    total = 0
    for message in messages:
        total += MESSAGE_OVERHEAD
        content = message.get("content")
        if isinstance(content, str):
            total += text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += text_tokens(part.get("text", ""))
                elif part.get("type") == "image_url":
                    total += image_tokens((part.get("image_url") or {}).get("url", ""))
                elif part.get("type") == "video_url":
                    total += video_tokens((part.get("video_url") or {}).get("url", ""))
        for key in ("reasoning_content", "tool_calls", "reasoning_details"):
            if message.get(key):
                total += text_tokens(str(message[key]))
    return total


def _calibration(prompt_tokens: int, content: str, later: list[str]) -> int:
    """The last reply's real prompt size, its own text, and the text of what came after it."""
    total = prompt_tokens + text_tokens(content) + MESSAGE_OVERHEAD
    return total + sum(text_tokens(text) + MESSAGE_OVERHEAD for text in later)


def _calibrated(conversation: Conversation) -> int | None:
    """_calibration from the database (two small reads), or None before any measured reply."""
    last = (
        conversation.messages.filter(role=Message.Role.ASSISTANT, prompt_tokens__gt=0)
        .order_by("-id")
        .only("id", "prompt_tokens", "content")
        .first()
    )
    if last is None:
        return None
    after = conversation.messages.filter(id__gt=last.id).values_list("content", flat=True)
    return _calibration(last.prompt_tokens, last.content, list(after))


def _calibrated_from(earlier: list[Message]) -> int | None:
    """_calibration over rows already read (every message before the reply, in order)."""
    for position in range(len(earlier) - 1, -1, -1):
        last = earlier[position]
        if last.role == Message.Role.ASSISTANT and (last.prompt_tokens or 0) > 0:
            later = [message.content for message in earlier[position + 1 :]]
            return _calibration(last.prompt_tokens, last.content, later)
    return None


def estimate_input(messages: list[dict], *, earlier: list[Message]) -> int:
    """The request's input size: the heuristic, or the calibration by the last measured reply
    among `earlier` (the messages before the reply) when that is larger."""
    return max(estimate_messages(messages), _calibrated_from(earlier) or 0)


@dataclass
class Plan:
    request: ChatRequest
    estimated_input: int
    window: int
    budget: int


def overflow_error(*, model: ModelConfig, used: int) -> ClientError:
    return ClientError(
        "context_full",
        f"This conversation no longer fits in {model.display_name}'s context window "
        f"(about {used:,} of {model.context_window:,} tokens used). "
        "Start a new conversation to continue.",
    )


def check_fits(*, model: ModelConfig, used: int) -> None:
    if used + MIN_OUTPUT_TOKENS + SAFETY_MARGIN > model.context_window:
        raise overflow_error(model=model, used=used)


def plan_request(
    *,
    conversation: Conversation,
    model: ModelConfig,
    messages: list[dict],
    earlier: list[Message],
) -> Plan:
    """The ChatRequest for a reply, its budget clamped to the window; ClientError if full.
    `earlier`: the messages before the reply, as read for `messages`."""
    used = estimate_input(messages, earlier=earlier)
    check_fits(model=model, used=used)
    wanted = (
        conversation.max_output_tokens
        or model.max_output_tokens
        or settings.DEFAULT_MAX_OUTPUT_TOKENS
    )
    if model.max_output_limit:
        wanted = min(wanted, model.max_output_limit)
    budget = max(1, min(wanted, model.context_window - used - SAFETY_MARGIN))
    request = ChatRequest(
        model=model.model_id,
        messages=messages,
        affinity_id=request_affinity_id(conversation),
        # A model without reasoning has no thinking switch to send.
        thinking=conversation.thinking if model.reasoning else None,
        max_output_tokens=budget,
        temperature=conversation.temperature,
        # The family's request contract: the provider layer sends only what it allows.
        contract=dict(model.contract or {}),
        reasoning_effort=conversation.reasoning_effort or None,
    )
    return Plan(request=request, estimated_input=used, window=model.context_window, budget=budget)


def cache_hit_rate(conversation: Conversation) -> float | None:
    """Cached share of all prompt tokens of the conversation's replies (None before any)."""
    totals = conversation.messages.filter(
        role=Message.Role.ASSISTANT, prompt_tokens__gt=0
    ).aggregate(prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"))
    if not totals["prompt"]:
        return None
    return round((totals["cached"] or 0) / totals["prompt"], 4)


def context_state(
    conversation: Conversation, *, used: int | None = None, cached_prefix: int | None = None
) -> dict:
    """How full the window is, for the page (`context` frames and the page data). `used` and
    `cached_prefix` (the last reply's cached tokens), when known already, are not read again."""
    model = conversation.model
    window = model.context_window if model else 0
    if used is None:
        used = _calibrated(conversation)
        if used is None:
            used = sum(
                text_tokens(c) + MESSAGE_OVERHEAD
                for c in conversation.messages.values_list("content", flat=True)
            )
            if conversation.system_prompt:
                used += text_tokens(conversation.system_prompt) + MESSAGE_OVERHEAD
            used += project_prefix_tokens(conversation)
    budget = None
    if model is not None:
        budget = min(
            conversation.max_output_tokens
            or model.max_output_tokens
            or settings.DEFAULT_MAX_OUTPUT_TOKENS,
            model.max_output_limit or window,
            max(1, window - used - SAFETY_MARGIN),
        )
    if cached_prefix is None:
        cached_prefix = (
            conversation.messages.filter(role=Message.Role.ASSISTANT, prompt_tokens__gt=0)
            .order_by("-id")
            .values_list("cached_tokens", flat=True)
            .first()
        )
    return {
        "used": used,
        "window": window,
        "percent": round(100 * used / window, 1) if window else 0,
        "budget": budget,
        "cache_hit_rate": cache_hit_rate(conversation),
        "cached_prefix_tokens": cached_prefix or 0,
        "edit_warning": prefix_loss_warning(cached_prefix or 0),
    }


def context_after_reply(reply: Message) -> dict:
    """context_state right after `reply` ended, from the reply in hand: when the provider
    reported its prompt size, that calibrates the window with nothing after it, and its cached
    tokens are the cached prefix, so only the conversation's cache hit rate is read (one
    statement instead of five). `reply.conversation` (with its model) must be loaded."""
    conversation = reply.conversation
    if conversation.model is None or not reply.prompt_tokens:
        return context_state(conversation)
    return context_state(
        conversation,
        used=_calibration(reply.prompt_tokens, reply.content, []),
        cached_prefix=reply.cached_tokens or 0,
    )


def prefix_loss_warning(cached_tokens: int) -> str:
    """What to tell someone about to edit an early message or the system prompt: the
    provider's cache matches the request's prefix byte for byte, so the next reply pays full
    price for everything after the change."""
    if cached_tokens <= 0:
        return ""
    return (
        f"Editing an earlier message or the system prompt drops the cached prefix "
        f"(about {cached_tokens:,} tokens were served from the provider's cache last turn): "
        "the next reply is slower and costs more."
    )


def conversation_set_max_output_tokens(*, conversation: Conversation, value: int) -> None:
    """The output budget of the conversation's replies (the larger-budget retry sets it)."""
    model = conversation.model
    ceiling = model.context_window if model else 1_000_000
    if not isinstance(value, int) or isinstance(value, bool) or not 256 <= value <= ceiling:
        raise ClientError(
            "bad_budget", f"The output budget must be a whole number from 256 to {ceiling:,}."
        )
    conversation.max_output_tokens = value
    Conversation.objects.filter(pk=conversation.pk).update(max_output_tokens=value)


async def acontext_for(conversation_id: int) -> dict | None:
    """context_state by id, from async code; None (and a log line) if it cannot be computed,
    because an indicator must never break a reply."""

    def load() -> dict | None:
        conversation = (
            Conversation.objects.select_related("model").filter(pk=conversation_id).first()
        )
        return context_state(conversation) if conversation else None

    try:
        return await database_sync_to_async(load)()
    except Exception:
        log.exception("context state of conversation %s failed", conversation_id)
        return None


# ---- projects (chatapp/projects.py builds the prefix itself) ----------------------------------


def request_affinity_id(conversation: Conversation) -> str:
    """A conversation in a project sends the project's affinity id: the provider's prefix cache
    (the project's instructions and pinned references) is shared by all its conversations."""
    project = conversation_project(conversation)
    return project.affinity_id if project is not None else conversation.affinity_id


def project_prefix_tokens(conversation: Conversation) -> int:
    """Estimated tokens of the project prefix (instructions and pinned images, by their stored
    sizes, without reading the files), for the checks made before the request is built."""
    project = conversation_project(conversation)
    if project is None:
        return 0
    instructions = project.instructions
    total = text_tokens(instructions) + MESSAGE_OVERHEAD if instructions else 0
    sizes = list(
        AttachmentPart.objects.filter(attachment__project_pin__project_id=project.pk).values_list(
            "image__width", "image__height"
        )
    )
    if sizes:
        total += MESSAGE_OVERHEAD
        for width, height in sizes:
            total += max(64, math.ceil(width * height / IMAGE_TILE))
    return total
