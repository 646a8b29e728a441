"""Built-in facts about known models: context window, vision, reasoning and prices (USD per
million tokens). Sources: ../shared/KIMI-PROTOCOL.md sections 3 and 6."""

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class ModelFacts:
    display_name: str
    context_window: int
    vision: bool
    reasoning: bool
    price_input: Decimal
    price_cached_input: Decimal
    price_output: Decimal
    description: str = ""


KIMI_K25 = ModelFacts(
    "Kimi K2.5", 262_144, True, True, Decimal("0.60"), Decimal("0.10"), Decimal("3.00")
)
KIMI_K26 = ModelFacts(
    "Kimi K2.6", 262_144, True, True, Decimal("0.95"), Decimal("0.16"), Decimal("4.00")
)

# Workers AI: K2.5 is listed with a 256,000 window; since 2026-05-30 Cloudflare serves (and
# bills) every K2.5 request as K2.6, so it carries K2.6's prices.
CF_KIMI_K26 = ModelFacts(
    "Kimi K2.6 (Workers AI)",
    262_144,
    True,
    True,
    Decimal("0.95"),
    Decimal("0.16"),
    Decimal("4.00"),
    "Kimi K2.6 on Cloudflare Workers AI (needs the Workers Paid plan).",
)
CF_KIMI_K25 = ModelFacts(
    "Kimi K2.5 (Workers AI)",
    256_000,
    True,
    True,
    Decimal("0.95"),
    Decimal("0.16"),
    Decimal("4.00"),
    "Cloudflare now aliases K2.5 to Kimi K2.6: requests are served and billed as K2.6.",
)
WORKERS_AI_MODELS: dict[str, ModelFacts] = {
    "@cf/moonshotai/kimi-k2.6": CF_KIMI_K26,
    "@cf/moonshotai/kimi-k2.5": CF_KIMI_K25,
}

KNOWN_MODELS: dict[str, ModelFacts] = {
    "kimi-k2.6": KIMI_K26,
    "kimi-k2.5": KIMI_K25,
}

MOONSHOT_MODELS = ("kimi-k2.6", "kimi-k2.5")
TEXT_ONLY_SUFFIX = ":text"


def facts_for(model_id: str) -> ModelFacts | None:
    """Known facts for an id, also when a reseller prefixes it (`moonshotai/kimi-k2.5`)."""
    if model_id in WORKERS_AI_MODELS:
        return WORKERS_AI_MODELS[model_id]
    base = model_id.rsplit("/", 1)[-1].lower()
    for known, facts in KNOWN_MODELS.items():
        if base == known or base.startswith(known + "-"):
            return facts
    return None


def parse_model_list(raw_ids: list[str]) -> list[tuple[str, bool]]:
    """`OPENAI_COMPAT_MODELS` entries -> (model id, vision); `:text` marks a text-only model."""
    parsed = []
    for raw in raw_ids:
        if raw.endswith(TEXT_ONLY_SUFFIX):
            parsed.append((raw[: -len(TEXT_ONLY_SUFFIX)], False))
        else:
            parsed.append((raw, True))
    return parsed
