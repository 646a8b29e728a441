"""SSE parsing over arbitrary network chunking, and chunk normalisation."""

import pytest

from chatapp.providers.base import ProviderError
from chatapp.providers.openai_compat import parse_event
from chatapp.providers.sse import SSEParser

STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"choices":[{"delta":{"content":"caf\xc3\xa9"}}]}\r\n\r\n'
    b"\n\n"
    b"event: ignored\n"
    b'data:{"choices":[{"delta":{"content":" ok"}}]}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_events_survive_any_chunking(size):
    parser = SSEParser()
    events = []
    for start in range(0, len(STREAM), size):
        events += parser.feed(STREAM[start : start + size])
    events += parser.close()
    assert events == [
        '{"choices":[{"delta":{"content":"café"}}]}',
        '{"choices":[{"delta":{"content":" ok"}}]}',
        "[DONE]",
    ]


def test_last_event_without_blank_line_is_kept_at_eof():
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}') == []
    assert parser.close() == ['{"a":1}']


def test_reasoning_from_either_field_is_not_doubled():
    item = parse_event('{"choices":[{"delta":{"reasoning":"x","reasoning_content":"x"}}]}')
    assert item.reasoning == "x"
    item = parse_event('{"choices":[{"delta":{"reasoning":"y","content":null}}]}')
    assert (item.reasoning, item.content) == ("y", "")


def test_usage_is_read_from_the_top_level_or_the_choice():
    top = parse_event(
        '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,'
        '"prompt_tokens_details":{"cached_tokens":3}}}'
    )
    assert (top.usage.prompt_tokens, top.usage.cached_tokens, top.usage.completion_tokens) == (
        5,
        3,
        2,
    )
    inside = parse_event(
        '{"choices":[{"delta":{},"finish_reason":"stop","usage":{"prompt_tokens":8,'
        '"completion_tokens":11,"cached_tokens":8}}]}'
    )
    assert inside.finish_reason == "stop"
    assert (inside.usage.prompt_tokens, inside.usage.cached_tokens) == (8, 8)


def test_error_event_after_200_is_an_error_not_text():
    with pytest.raises(ProviderError) as info:
        parse_event('{"error":{"code":502,"message":"Provider returned error"}}')
    assert info.value.retryable


def test_cached_tokens_are_billed_at_the_cached_price():
    from decimal import Decimal
    from types import SimpleNamespace

    from chatapp.pricing import cache_savings, reply_cost

    k26 = SimpleNamespace(
        price_input=Decimal("0.95"),
        price_cached_input=Decimal("0.16"),
        price_output=Decimal("4.00"),
    )
    # 10,000 prompt tokens of which 8,000 cached, 1,000 out:
    # 2,000 * 0.95 + 8,000 * 0.16 + 1,000 * 4.00 = 1,900 + 1,280 + 4,000 = 7,180 per million.
    cost = reply_cost(model=k26, prompt_tokens=10_000, cached_tokens=8_000, completion_tokens=1_000)
    assert cost == Decimal("0.007180")
    assert cache_savings(model=k26, cached_tokens=8_000) == Decimal("0.006320")
