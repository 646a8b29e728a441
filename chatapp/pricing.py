"""What a reply cost, from the model's prices (USD per million tokens).

`prompt_tokens` includes the cached ones: cached tokens are billed at the cached price, the rest
at the input price.
"""

from decimal import ROUND_HALF_UP, Decimal

MILLION = Decimal(1_000_000)
CENT_FRACTION = Decimal("0.000001")


def reply_cost(*, model, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
    cached = min(cached_tokens, prompt_tokens)
    uncached = prompt_tokens - cached
    total = (
        uncached * model.price_input
        + cached * model.price_cached_input
        + completion_tokens * model.price_output
    ) / MILLION
    return total.quantize(CENT_FRACTION, rounding=ROUND_HALF_UP)


def cache_savings(*, model, cached_tokens: int) -> Decimal:
    """What the cached tokens would have cost more at the full input price."""
    saved = cached_tokens * (model.price_input - model.price_cached_input) / MILLION
    return saved.quantize(CENT_FRACTION, rounding=ROUND_HALF_UP)
