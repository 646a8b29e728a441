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
