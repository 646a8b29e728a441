"""The provider layer below the socket: error mapping, image rules, the Workers AI batch
client, the cross-process concurrency line (real Redis) and API keys at rest."""

import asyncio
import json

import httpx
import pytest
from django.db import connection
from django.test import Client

from chatapp.models import Provider
from chatapp.providers import errors
from chatapp.providers.base import ChatRequest
from chatapp.providers.gate import RedisLine, ordinal
from chatapp.providers.keys import PREFIX
from chatapp.providers.moonshot import MoonshotClient
from chatapp.providers.openai_compat import parse_completion
from chatapp.providers.workers_ai import WorkersAIBatchClient
from tests.factories import user_create
from tests.fake_upstream import FakeResponse
from tests.provider_fakes import JSON_HEADERS, fixture_text, moonshot_stream

PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


# ---- error mapping ---------------------------------------------------------------------------


def test_moonshot_429_hint_in_the_text_sets_the_retry_delay():
    error = errors.from_openai_body(
        {
            "error": {
                "message": "Your account org-x<ak-y> request reached organization max RPM: 3, "
                "please try again after 7 seconds",
                "type": "rate_limit_reached_error",
            }
        },
        status=429,
    )
    assert isinstance(error, errors.RateLimited)
    assert (error.retryable, error.retry_after) == (True, 7.0)


def test_quota_429_is_a_billing_problem_and_never_retried():
    error = errors.from_openai_body(
        {"error": {"message": "suspended due to insufficient balance", "type": "x"}}, status=429
    )
    assert isinstance(error, errors.BillingProblem) and not error.retryable
    assert "administrator" in error.user_message


def test_openrouter_wrapped_moonshot_400_is_mapped_from_the_upstream_body():
    # The captured log line is escaped JSON; unescape it the way it was logged.
    logged = fixture_text("openrouter_moonshot_upstream_error_400.logtext.txt")
    body = json.loads(logged.split("Body:\\n", 1)[1].strip().encode().decode("unicode_escape"))
    error = errors.from_openai_body(body, status=400)
    assert isinstance(error, errors.BadRequest) and not error.retryable
    # The inner (Moonshot) reason reaches staff and logs; users get our own wording.
    assert "reasoning_content is missing" in error.staff_message
    assert "reasoning_content is missing" not in error.user_message
    assert error.user_message.startswith("The model provider refused the request.")


def test_workers_ai_codes_map_to_their_policies():
    def mapped(code, status):
        return errors.from_workers_ai(
            {"success": False, "errors": [{"code": code, "message": "m"}]}, status=status
        )

    assert isinstance(mapped(3040, 429), errors.Overloaded) and mapped(3040, 429).retryable
    assert isinstance(mapped(3036, 429), errors.BillingProblem) and not mapped(3036, 429).retryable
    assert not mapped(5035, 403).retryable and "Paid plan" in mapped(5035, 403).user_message
    assert isinstance(mapped(3006, 413), errors.RequestTooLarge)
    # The binding's text form "3040: ..." with no code field.
    text_form = errors.from_workers_ai(
        {"errors": [{"message": "3040: Capacity temporarily exceeded"}]}, status=None
    )
    assert text_form.retryable


def test_openrouter_non_stream_body_with_leading_whitespace_is_read():
    raw = fixture_text("openrouter_k25_nonstream_reasoning.json").encode()
    assert raw[:1].isspace()
    item = parse_completion(raw)
    assert item.content and item.reasoning and item.usage.prompt_tokens > 0


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
    ]


# ---- images ----------------------------------------------------------------------------------


def image_request(url: str) -> ChatRequest:
    return ChatRequest(
        model="kimi-k2.6",
        affinity_id="ses_test",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )


async def test_images_go_as_data_urls_and_other_forms_are_refused_before_the_call(
    _upstream_server,
):
    _upstream_server.reset()
    async with httpx.AsyncClient() as http:
        client = MoonshotClient(base_url=_upstream_server.base_url, api_key="k", http=http)
        _upstream_server.enqueue(moonshot_stream(["A dot."]))
        items = [item async for item in client.stream(image_request(PNG_1PX))]
        assert "".join(i.content for i in items) == "A dot."
        part = _upstream_server.chat_requests()[-1].json["messages"][0]["content"][1]
        assert part == {"type": "image_url", "image_url": {"url": PNG_1PX}}

        for url in ("https://example.com/cat.png", "data:image/bmp;base64,Qk0=", "ms://file"):
            with pytest.raises(errors.UnsupportedImage) as refused:
                async for _ in client.stream(image_request(url)):
                    pass
            assert not refused.value.retryable
    assert len(_upstream_server.chat_requests()) == 1


# ---- Workers AI async batch -------------------------------------------------------------------


def envelope(result) -> FakeResponse:
    body = {"result": result, "success": True, "errors": [], "messages": []}
    return FakeResponse(headers=JSON_HEADERS, parts=[json.dumps(body).encode()])


def done_item(index: int, text: str) -> dict:
    return {
        "id": index,
        "success": True,
        "external_reference": f"ref-{index}",
        "result": {
            "choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
        },
    }


async def test_batch_submit_poll_reorder_and_per_item_failures(_upstream_server):
    _upstream_server.reset()
    _upstream_server.enqueue(
        envelope({"status": "queued", "request_id": "req-42", "model": "@cf/moonshotai/kimi-k2.6"}),
        envelope({"status": "queued", "request_id": "req-42"}),
        envelope({"status": "running", "request_id": "req-42"}),
        envelope(
            {
                "responses": [
                    done_item(2, "two"),
                    {
                        "id": 1,
                        "success": False,
                        "external_reference": "ref-1",
                        "errors": [{"code": 3040, "message": "Capacity temporarily exceeded"}],
                    },
                    done_item(0, "zero"),
                ],
                "usage": {"prompt_tokens": 15, "completion_tokens": 2},
            }
        ),
    )
    base = _upstream_server.base_url + "/accounts/acct/ai"
    requests = [
        {"messages": [{"role": "user", "content": f"q{i}"}], "external_reference": f"ref-{i}"}
        for i in range(3)
    ]
    async with httpx.AsyncClient() as http:
        batch = WorkersAIBatchClient(base_url=base, api_key="cf-token", http=http)
        results = await batch.run(
            model="@cf/moonshotai/kimi-k2.6", requests=requests, poll_interval=0.01, timeout=30
        )

    assert [r.id for r in results] == [0, 1, 2]
    assert [r.external_reference for r in results] == ["ref-0", "ref-1", "ref-2"]
    assert results[0].item.content == "zero" and results[2].item.content == "two"
    assert results[0].item.usage.prompt_tokens == 5
    assert isinstance(results[1].error, errors.Overloaded) and results[1].item is None
    sent = _upstream_server.requests
    assert len(sent) == 4
    assert all(
        r.path == "/v1/accounts/acct/ai/run/@cf/moonshotai/kimi-k2.6?queueRequest=true"
        for r in sent
    )
    assert sent[0].json == {"requests": requests}
    assert sent[1].json == {"request_id": "req-42"}
    assert sent[0].headers["authorization"] == "Bearer cf-token"


async def test_batch_submit_error_envelope_is_typed(_upstream_server):
    _upstream_server.reset()
    body = {"success": False, "errors": [{"code": 5035, "message": "paid plan"}], "result": None}
    _upstream_server.enqueue(
        FakeResponse(status=403, headers=JSON_HEADERS, parts=[json.dumps(body).encode()])
    )
    async with httpx.AsyncClient() as http:
        batch = WorkersAIBatchClient(
            base_url=_upstream_server.base_url + "/accounts/a/ai", api_key="t", http=http
        )
        with pytest.raises(errors.BillingProblem):
            await batch.submit(model="@cf/moonshotai/kimi-k2.6", requests=[{"messages": []}])


# ---- the line across processes (real Redis) ---------------------------------------------------


def _redis_or_skip():
    import redis.asyncio as redis

    return redis.from_url("redis://127.0.0.1:6379/2")


@pytest.mark.production
async def test_redis_line_is_shared_and_fair_across_processes():
    # Three clients = three processes sharing one provider limit of 1.
    clients = [_redis_or_skip() for _ in range(3)]
    try:
        await clients[0].ping()
    except Exception:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    key = f"test-{id(clients)}"
    lines = [RedisLine(c, key) for c in clients]
    seen: dict[str, list[int]] = {"b": [], "c": []}
    order: list[str] = []
    release_a = asyncio.Event()
    entered = {name: asyncio.Event() for name in "abc"}
    waiting = {name: asyncio.Event() for name in "bc"}

    async def holder(name, line, wait_for=None):
        async def on_wait(position):
            seen[name].append(position)
            waiting[name].set()

        async with line.slot(1, on_wait):
            order.append(name)
            entered[name].set()
            if wait_for is not None:
                await wait_for.wait()

    async with asyncio.timeout(20):
        a = asyncio.create_task(holder("a", lines[0], release_a))
        await entered["a"].wait()
        b = asyncio.create_task(holder("b", lines[1]))
        await waiting["b"].wait()
        c = asyncio.create_task(holder("c", lines[2]))
        await waiting["c"].wait()
        assert seen == {"b": [1], "c": [2]}
        assert not entered["b"].is_set()
        release_a.set()
        await asyncio.gather(a, b, c)
    assert order == ["a", "b", "c"]  # first come, first served
    assert seen["b"] == [1, 0] and seen["c"][0] == 2 and seen["c"][-1] == 0
    for client in clients:
        await client.delete(*lines[0].keys, lines[0].ticket_key)
        await client.aclose()


# ---- API keys at rest and in the admin ---------------------------------------------------------

SECRET = "sk-super-secret-provider-key-0001"


@pytest.mark.django_db
def test_api_key_is_encrypted_at_rest_and_read_back_plain():
    provider = Provider.objects.create(name="P", kind="moonshot", api_key=SECRET)
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM chatapp_provider WHERE id = %s", [provider.pk])
        stored = cursor.fetchone()[0]
    assert stored.startswith(PREFIX) and SECRET not in stored
    assert Provider.objects.get(pk=provider.pk).api_key == SECRET


@pytest.mark.django_db
def test_admin_key_is_write_only():
    provider = Provider.objects.create(
        name="P", kind="moonshot", base_url="https://api.moonshot.ai/v1", api_key=SECRET
    )
    admin = user_create(is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin)
    url = f"/admin/chatapp/provider/{provider.pk}/change/"
    page = client.get(url)
    assert page.status_code == 200
    assert SECRET not in page.content.decode() and "fernet:" not in page.content.decode()

    form = {
        "name": "P",
        "kind": "moonshot",
        "base_url": "https://api.moonshot.ai/v1",
        "max_concurrency": "1",
        "enabled": "on",
        "new_api_key": "",
    }
    assert client.post(url, form).status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == SECRET and provider.max_concurrency == 1  # blank keeps the key

    assert client.post(url, {**form, "new_api_key": "sk-new-key-2222"}).status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == "sk-new-key-2222"

    chat = client.get("/")
    assert "sk-new-key-2222" not in chat.content.decode()


def test_a_null_error_field_is_not_an_error_and_usage_keeps_cached_tokens():
    from chatapp.providers.openai_compat import StreamParser

    parser = StreamParser()
    item = parser.event('{"error":null,"choices":[{"delta":{"content":"hi"}}]}')
    assert item.content == "hi"
    # Cached tokens from the choice-level usage survive a later top-level usage without them.
    parser.event(
        '{"choices":[{"delta":{},"finish_reason":"stop","usage":{"prompt_tokens":8,'
        '"completion_tokens":2,"cached_tokens":8}}]}'
    )
    last = parser.event('{"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3}}')
    assert (last.usage.prompt_tokens, last.usage.cached_tokens, last.usage.completion_tokens) == (
        8,
        8,
        3,
    )


def test_moonshot_captured_final_chunk_usage_inside_the_choice():
    import ast

    text = fixture_text("moonshot_k2turbo_stream_final_chunk_usage_in_choice.pydict.txt")
    literal = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    chunk = ast.literal_eval(literal.strip())
    item = parse_completion(json.dumps(chunk).encode())
    assert item.finish_reason == "stop"
    assert (item.usage.prompt_tokens, item.usage.cached_tokens, item.usage.completion_tokens) == (
        8,
        8,
        11,
    )
