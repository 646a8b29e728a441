"""Every provider kind end to end: the real websocket stack, a real local upstream speaking that
provider's format, and the saved reply (text, reasoning, usage, cached tokens, cost, errors)."""

import json
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async

from chatapp.generation import THINKING_BUDGET_MESSAGE
from chatapp.model_catalog import catalog_sync, reset_catalog_cache
from chatapp.models import Conversation, Message, ModelConfig, Provider
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import error_response, stream_reply
from tests.provider_fakes import (
    fixture_stream,
    moonshot_error,
    moonshot_stream,
    openrouter_error_after_200,
    sse_fixture_events,
    vllm_stream,
    workers_ai_envelope,
    workers_ai_envelope_error,
    workers_ai_run_stream,
)

pytestmark = pytest.mark.django_db(transaction=True)

MOONSHOT_KEY = "sk-moonshot-test-key-9876"


@pytest.fixture
def moonshot(_upstream_server, settings):
    _upstream_server.reset()
    settings.MOONSHOT_API_KEY = MOONSHOT_KEY
    settings.MOONSHOT_BASE_URL = _upstream_server.base_url
    reset_catalog_cache()
    catalog_sync()
    return _upstream_server


@pytest.fixture
def workers_ai(_upstream_server, settings):
    _upstream_server.reset()
    settings.CLOUDFLARE_ACCOUNT_ID = "acct123"
    settings.CLOUDFLARE_API_TOKEN = "cf-token-test-5555"
    settings.CLOUDFLARE_API_BASE = _upstream_server.base_url
    reset_catalog_cache()
    catalog_sync()
    return _upstream_server


@database_sync_to_async
def make_chat(*, model_id: str, staff: bool = False, **fields) -> tuple:
    user = user_create(is_staff=staff)
    model = ModelConfig.objects.get(model_id=model_id)
    conversation = Conversation.objects.create(owner=user, model=model, **fields)
    return user, conversation


async def send(ws, text: str) -> list[dict]:
    await ws.send_json_to({"type": "send", "text": text})
    return await receive_until(ws, "reply.end", timeout=15)


async def chat(user, conversation, text: str = "Hello?") -> tuple[list[dict], Message]:
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    frames = await send(ws, text)
    await ws.disconnect()
    reply = await Message.objects.aget(pk=frames[-1]["message"]["id"])
    return frames, reply


def streamed(frames: list[dict], key: str) -> str:
    return "".join(f.get(key, "") for f in frames if f["type"] == "delta")


# ---- Moonshot -------------------------------------------------------------------------------


async def test_moonshot_reply_with_usage_inside_the_choice_and_cached_tokens(moonshot):
    moonshot.enqueue(
        moonshot_stream(["Paris", " is", " the", " capital."], reasoning=["The user", " asks"])
    )
    user, conversation = await make_chat(model_id="kimi-k2.6")
    frames, reply = await chat(user, conversation, "Capital of France?")

    assert streamed(frames, "text") == "Paris is the capital."
    assert streamed(frames, "reasoning") == "The user asks"
    assert (reply.content, reply.reasoning) == ("Paris is the capital.", "The user asks")
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (3000, 2989, 6)
    # 11 uncached at $0.95, 2989 cached at $0.16, 6 out at $4.00 (per million).
    assert reply.cost_usd == Decimal("0.000513")
    end = frames[-1]["message"]
    assert end["uncached_tokens"] == 11
    assert end["cache_saved_usd"] == "0.002361"  # 2989 * (0.95 - 0.16) / 1M
    assert frames[-1]["context"]["cache_hit_rate"] == pytest.approx(2989 / 3000, abs=1e-4)


async def test_moonshot_request_has_no_sampling_params_and_its_own_thinking_shape(moonshot):
    moonshot.enqueue(moonshot_stream(["ok"]))
    user, conversation = await make_chat(
        model_id="kimi-k2.6", thinking=False, temperature=0.3, max_output_tokens=4000
    )
    await chat(user, conversation)

    request = moonshot.chat_requests()[-1]
    body = request.json
    assert request.headers["x-session-affinity"] == conversation.affinity_id
    assert request.headers["authorization"] == f"Bearer {MOONSHOT_KEY}"
    for key in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty"):
        assert key not in body
    assert body["thinking"] == {"type": "disabled"}
    assert "chat_template_kwargs" not in body and "reasoning_effort" not in body
    assert body["max_completion_tokens"] == 4000
    assert body["stream_options"] == {"include_usage": True}
    # Compact, deterministic serialisation (the prefix cache matches bytes).
    assert request.body.startswith(b'{"model":"kimi-k2.6","messages":[{"role":"user"')


async def test_moonshot_tool_call_turn_is_resent_with_its_reasoning_even_empty(moonshot):
    user, conversation = await make_chat(model_id="kimi-k2.6")
    call = {
        "id": "get_weather_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    await Message.objects.acreate(conversation=conversation, role="user", content="Weather?")
    await Message.objects.acreate(
        conversation=conversation, role="assistant", content="", reasoning="", tool_calls=[call]
    )
    moonshot.enqueue(moonshot_stream(["Sunny."]))
    await chat(user, conversation, "And now?")

    turn = moonshot.chat_requests()[-1].json["messages"][1]
    assert turn == {"role": "assistant", "tool_calls": [call], "reasoning_content": ""}


async def test_output_budget_is_clamped_to_the_context_window(moonshot):
    user, conversation = await make_chat(model_id="kimi-k2.6", max_output_tokens=200_000)
    await ModelConfig.objects.filter(model_id="kimi-k2.6").aupdate(context_window=8_000)
    moonshot.enqueue(moonshot_stream(["ok"]))
    text = "word " * 4000  # about 5,000 tokens by our estimate
    frames, reply = await chat(user, conversation, text)

    budget = moonshot.chat_requests()[-1].json["max_completion_tokens"]
    assert 0 < budget < 8_000 - 4_000
    assert reply.status == "complete"


async def test_a_conversation_about_to_overflow_is_refused_before_the_call(moonshot):
    user, conversation = await make_chat(model_id="kimi-k2.6")
    await ModelConfig.objects.filter(model_id="kimi-k2.6").aupdate(context_window=4_000)
    ws = await connect(user, conversation.pk)
    state = await ws.receive_json_from()
    assert state["context"]["window"] == 4_000
    await ws.send_json_to({"type": "send", "text": "tok " * 20_000})
    error = await ws.receive_json_from(timeout=10)
    await ws.disconnect()

    assert error["type"] == "error" and error["code"] == "context_full"
    assert "context window" in error["message"] and "new conversation" in error["message"]
    assert moonshot.chat_requests() == []
    assert await Message.objects.filter(conversation=conversation).acount() == 0


async def test_thinking_that_eats_the_budget_offers_a_retry_with_a_larger_budget(moonshot):
    moonshot.enqueue(
        moonshot_stream([], reasoning=["Let me think", " very long"], finish_reason="length")
    )
    user, conversation = await make_chat(model_id="kimi-k2.6", max_output_tokens=1000)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    end = (await send(ws, "Hard question"))[-1]["message"]
    assert end["status"] == "error"
    assert end["content"] == ""
    assert "used its whole output budget while thinking" in end["error"]
    assert end["error"] == THINKING_BUDGET_MESSAGE
    assert end["finish_reason"] == "length"

    moonshot.enqueue(moonshot_stream(["The answer."]))
    await ws.send_json_to(
        {"type": "regenerate", "message_id": end["id"], "max_output_tokens": 16_000}
    )
    end = (await receive_until(ws, "reply.end", timeout=15))[-1]["message"]
    await ws.disconnect()
    assert end["status"] == "complete" and end["content"] == "The answer."
    assert moonshot.chat_requests()[-1].json["max_completion_tokens"] == 16_000
    await conversation.arefresh_from_db()
    assert conversation.max_output_tokens == 16_000


# ---- Moonshot errors: retry policy and what the user sees ------------------------------------


@pytest.mark.parametrize(
    "error_type,message",
    [
        (
            "rate_limit_reached_error",
            "request reached organization max RPM: 3, please try again after 0 seconds",
        ),
        ("engine_overloaded_error", "The engine is currently overloaded, please try again later"),
    ],
)
async def test_moonshot_429_rate_limit_and_overload_are_retried(moonshot, error_type, message):
    moonshot.enqueue(moonshot_error(429, error_type, message), moonshot_stream(["Fine."]))
    user, conversation = await make_chat(model_id="kimi-k2.6")
    frames, reply = await chat(user, conversation)
    assert len(moonshot.chat_requests()) == 2
    assert any(f["type"] == "reply.status" and "retrying" in f["text"] for f in frames)
    assert (reply.status, reply.content) == ("complete", "Fine.")


@pytest.mark.parametrize(
    "status,error_type,message,shown",
    [
        (
            429,
            "exceeded_current_quota_error",
            "Your account org-1 <ak-2> is suspended due to insufficient balance, please recharge",
            "billing problem",
        ),
        (
            403,
            "permission_denied_error",
            "Your account is not active, exceeded current quota",
            "billing problem",
        ),
        (
            400,
            "content_filter",
            "The request was rejected because it was considered high risk",
            "content filter",
        ),
        (
            400,
            "invalid_request_error",
            "Your request exceeded model token limit : 262144",
            "too long",
        ),
        (
            400,
            "invalid_request_error",
            "Invalid request: unsupported image url: http://x/a.png",
            "cannot read one of the images",
        ),
        (401, "invalid_authentication_error", "Invalid Authentication", "provider key is invalid"),
    ],
)
async def test_moonshot_errors_that_are_not_retried(moonshot, status, error_type, message, shown):
    moonshot.enqueue(moonshot_error(status, error_type, message))
    user, conversation = await make_chat(model_id="kimi-k2.6")
    frames, reply = await chat(user, conversation)
    assert len(moonshot.chat_requests()) == 1
    assert reply.status == "error"
    assert shown in reply.error
    error = next(f for f in frames if f["type"] == "error")
    assert shown in error["message"]


async def test_a_429_whose_token_rate_limit_is_below_the_request_is_final(moonshot):
    """Moonshot's TPM 429 names the limit; a request larger than it never fits, so it is not
    retried (a smaller request under the same wording is, below)."""
    tpm = (
        "Your account org-1 / proj-2 <ak-3> request reached project TPM rate limit, "
        "current: 1410, limit: 100, see https://platform.moonshot.cn/docs/pricing/limits"
    )
    moonshot.enqueue(moonshot_error(429, "rate_limit_reached_error", tpm))
    user, conversation = await make_chat(model_id="kimi-k2.6")
    frames, reply = await chat(user, conversation, "describe " * 400)
    assert len(moonshot.chat_requests()) == 1
    assert not any(f["type"] == "reply.status" and "retrying" in f["text"] for f in frames)
    error = next(f for f in frames if f["type"] == "error")
    assert error["code"] == "over_token_rate_limit"
    assert "tokens-per-minute limit" in error["message"] and "never" in error["message"]
    assert reply.status == "error" and reply.error == error["message"]

    # The same limit with a request that fits it: an ordinary rate limit, retried.
    moonshot.enqueue(
        moonshot_error(429, "rate_limit_reached_error", tpm.replace("1410", "120")),
        moonshot_stream(["Fine."]),
    )
    user, conversation = await make_chat(model_id="kimi-k2.6")
    frames, reply = await chat(user, conversation, "Hi")
    assert (reply.status, reply.content) == ("complete", "Fine.")


async def test_an_openai_style_429_stating_the_request_above_the_limit_is_final(fake_upstream):
    fake_upstream.enqueue(
        error_response(
            429,
            "Request too large for kimi on tokens per min (TPM): Limit 30000, Used 0, "
            "Requested 45000. The input or output tokens must be reduced.",
            "tokens",
        )
    )
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    frames, reply = await chat(user, conversation)
    assert len(fake_upstream.chat_requests()) == 1
    assert next(f for f in frames if f["type"] == "error")["code"] == "over_token_rate_limit"
    assert reply.status == "error"


async def test_an_invalid_key_names_the_key_to_staff_only(moonshot):
    moonshot.enqueue(moonshot_error(401, "incorrect_api_key_error", "Incorrect API key provided"))
    user, conversation = await make_chat(model_id="kimi-k2.6")
    _, reply = await chat(user, conversation)
    assert reply.error == "The provider key is invalid. Ask an administrator to check it."
    assert "9876" not in reply.error

    moonshot.enqueue(moonshot_error(401, "incorrect_api_key_error", "Incorrect API key provided"))
    staff, conversation = await make_chat(model_id="kimi-k2.6", staff=True)
    _, reply = await chat(staff, conversation)
    assert "Moonshot" in reply.error and "…9876" in reply.error
    assert MOONSHOT_KEY not in reply.error


# ---- Workers AI -----------------------------------------------------------------------------


async def test_workers_ai_run_stream_with_padding_and_the_trailing_native_usage(workers_ai):
    workers_ai.enqueue(workers_ai_run_stream(["Bonjour", "!"], reasoning=["Greet", " back"]))
    user, conversation = await make_chat(
        model_id="@cf/moonshotai/kimi-k2.6", thinking=True, temperature=0.7
    )
    frames, reply = await chat(user, conversation, "Salut")

    assert reply.content == "Bonjour!"
    assert reply.reasoning == "Greet back"  # both fields carried it: not doubled
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (1200, 1024, 4)
    assert reply.cost_usd == Decimal("0.000347")  # 176 x 0.95 + 1024 x 0.16 + 4 x 4.00
    request = workers_ai.requests[-1]
    assert request.path == "/v1/accounts/acct123/ai/run/@cf/moonshotai/kimi-k2.6"
    assert request.headers["authorization"] == "Bearer cf-token-test-5555"
    assert request.headers["x-session-affinity"] == conversation.affinity_id
    body = request.json
    assert "model" not in body  # /ai/run takes it from the path
    assert body["chat_template_kwargs"] == {"thinking": True}
    assert "thinking" not in body and "reasoning_effort" not in body
    assert body["temperature"] == 0.7  # the user set it
    assert body["max_completion_tokens"] > 0


async def test_workers_ai_offers_the_catalogs_lineup_with_its_facts(workers_ai):
    offered = [m async for m in ModelConfig.objects.filter(provider__kind="workers_ai")]
    assert {m.model_id for m in offered} == {
        "@cf/moonshotai/kimi-k3",
        "@cf/moonshotai/kimi-k2.6",
        "@cf/moonshotai/kimi-k2.7-code",
    }
    k26 = await ModelConfig.objects.aget(model_id="@cf/moonshotai/kimi-k2.6")
    assert (k26.context_window, k26.vision, k26.reasoning) == (262_144, True, True)
    assert (k26.price_input, k26.price_cached_input, k26.price_output) == (
        Decimal("0.95"),
        Decimal("0.16"),
        Decimal("4.00"),
    )
    k3 = await ModelConfig.objects.aget(model_id="@cf/moonshotai/kimi-k3")
    assert (k3.context_window, k3.max_output_tokens, k3.family) == (1_048_576, 131_072, "kimi-k3")
    assert k3.reasoning_mode == "always" and k3.contract["thinking"] == "none"


async def test_workers_ai_non_stream_envelope_is_read(workers_ai):
    completion = {
        "id": "id-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi."},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    workers_ai.enqueue(workers_ai_envelope(completion))
    user, conversation = await make_chat(model_id="@cf/moonshotai/kimi-k2.6")
    _, reply = await chat(user, conversation)
    assert (reply.content, reply.prompt_tokens, reply.status) == ("Hi.", 9, "complete")


async def test_workers_ai_capacity_3040_is_retried(workers_ai):
    workers_ai.enqueue(
        workers_ai_envelope_error(429, 3040, "Capacity temporarily exceeded, please try again."),
        workers_ai_run_stream(["ok"]),
    )
    user, conversation = await make_chat(model_id="@cf/moonshotai/kimi-k2.6")
    _, reply = await chat(user, conversation)
    assert len(workers_ai.requests) == 2
    assert (reply.status, reply.content) == ("complete", "ok")


@pytest.mark.parametrize(
    "status,code,shown",
    [
        (429, 3036, "daily free Workers AI allocation"),
        (403, 5035, "Workers Paid plan"),
        (413, 3006, "too large"),
    ],
)
async def test_workers_ai_errors_that_are_not_retried(workers_ai, status, code, shown):
    workers_ai.enqueue(workers_ai_envelope_error(status, code, "upstream says no"))
    user, conversation = await make_chat(model_id="@cf/moonshotai/kimi-k2.6")
    _, reply = await chat(user, conversation)
    assert len(workers_ai.requests) == 1
    assert reply.status == "error" and shown in reply.error


async def test_workers_ai_tool_call_turn_echoes_reasoning_as_reasoning(workers_ai):
    user, conversation = await make_chat(model_id="@cf/moonshotai/kimi-k2.6")
    call = {
        "id": "functions.weather:0",
        "type": "function",
        "function": {"name": "weather", "arguments": "{}"},
    }
    await Message.objects.acreate(conversation=conversation, role="user", content="Weather?")
    await Message.objects.acreate(
        conversation=conversation,
        role="assistant",
        content="",
        reasoning="I should call it.",
        tool_calls=[call],
    )
    workers_ai.enqueue(workers_ai_run_stream(["ok"]))
    await chat(user, conversation, "Thanks")
    turn = workers_ai.requests[-1].json["messages"][1]
    assert turn == {"role": "assistant", "tool_calls": [call], "reasoning": "I should call it."}


# ---- OpenAI-compatible: OpenRouter, Avian-style resellers, vLLM ------------------------------


async def test_openrouter_captured_stream_comments_and_double_finish(fake_upstream):
    fake_upstream.enqueue(fixture_stream("openrouter_k25_stream_reasoning.sse"))
    user, conversation = await make_chat(model_id="fake-model")
    frames, reply = await chat(user, conversation, "say hi")

    events = sse_fixture_events("openrouter_k25_stream_reasoning.sse")
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    thought = "".join(e["choices"][0]["delta"].get("reasoning") or "" for e in events)
    assert reply.content == text and text
    assert reply.reasoning == thought and thought
    assert streamed(frames, "text") == text
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (21, 173, 0)
    assert reply.finish_reason == "stop"
    assert reply.reasoning_details[0]["text"] == thought


async def test_openrouter_tool_call_turn_is_stored_and_echoed_with_reasoning_details(fake_upstream):
    fake_upstream.enqueue(fixture_stream("openrouter_k25_stream_toolcall_turn1.sse"))
    user, conversation = await make_chat(model_id="fake-model")
    _, reply = await chat(user, conversation, "What's the weather in Florence?")
    assert reply.tool_calls[0]["id"] == "functions.weather:0"
    assert reply.tool_calls[0]["function"]["name"] == "weather"
    assert "Florence" in reply.tool_calls[0]["function"]["arguments"]
    assert reply.reasoning and reply.reasoning_details[0]["text"] == reply.reasoning

    fake_upstream.enqueue(stream_reply(["It is hot."]))
    await chat(user, conversation, "Thanks")
    turn = fake_upstream.chat_requests()[-1].json["messages"][1]
    assert turn["role"] == "assistant" and "content" not in turn
    assert turn["tool_calls"] == reply.tool_calls
    assert turn["reasoning_details"] == reply.reasoning_details
    assert turn["reasoning"] == reply.reasoning == turn["reasoning_content"]


async def test_avian_stream_reasoning_content_and_details_are_not_doubled(fake_upstream):
    fake_upstream.enqueue(fixture_stream("avian_k25_stream_reasoning_toolcall.sse"))
    user, conversation = await make_chat(model_id="fake-model")
    _, reply = await chat(user, conversation)
    events = sse_fixture_events("avian_k25_stream_reasoning_toolcall.sse")
    thought = "".join(
        e["choices"][0]["delta"].get("reasoning_content") or "" for e in events if e["choices"]
    )
    assert reply.reasoning == thought
    assert (reply.prompt_tokens, reply.cached_tokens) == (76, 64)


async def test_openrouter_error_after_200_is_an_error_not_text(fake_upstream):
    fake_upstream.enqueue(openrouter_error_after_200(502, "Provider returned error"))
    fake_upstream.enqueue(openrouter_error_after_200(402, "Insufficient credits"))
    user, conversation = await make_chat(model_id="fake-model")
    _, reply = await chat(user, conversation)
    assert reply.content == ""
    assert reply.status == "error" and "billing" in reply.error
    assert len(fake_upstream.chat_requests()) == 2  # the 502 was retried, the 402 not


async def test_vllm_reasoning_field_and_sampling_only_when_set(fake_upstream):
    fake_upstream.enqueue(vllm_stream(["4"], reasoning=["2+2", " is 4"]))
    user, conversation = await make_chat(model_id="fake-model", thinking=False)
    await ModelConfig.objects.filter(model_id="fake-model").aupdate(reasoning=True)
    conversation = await Conversation.objects.select_related("model").aget(pk=conversation.pk)
    _, reply = await chat(user, conversation)
    assert (reply.content, reply.reasoning, reply.prompt_tokens) == ("4", "2+2 is 4", 50)
    body = fake_upstream.chat_requests()[-1].json
    assert body["chat_template_kwargs"] == {"thinking": False}
    assert "temperature" not in body and "top_p" not in body and "thinking" not in body
    assert (
        fake_upstream.chat_requests()[-1].headers["x-session-affinity"] == conversation.affinity_id
    )


# ---- the concurrency limit -------------------------------------------------------------------


async def test_extra_sends_wait_in_line_with_their_position(fake_upstream):
    await Provider.objects.filter(kind="openai_compat").aupdate(max_concurrency=1)
    fake_upstream.enqueue(stream_reply(["slow"] * 3, delay=0.3), stream_reply(["second"]))
    user_a, first = await make_chat(model_id="fake-model")
    user_b, second = await make_chat(model_id="fake-model")
    ws_a = await connect(user_a, first.pk)
    ws_b = await connect(user_b, second.pk)
    await ws_a.receive_json_from()
    await ws_b.receive_json_from()

    await ws_a.send_json_to({"type": "send", "text": "first"})
    await receive_until(ws_a, "delta", timeout=10)
    await ws_b.send_json_to({"type": "send", "text": "second"})
    frames_b = await receive_until(ws_b, "reply.status", timeout=10)
    assert frames_b[-1]["text"] == "waiting for the provider: 1st in line"
    assert len(fake_upstream.chat_requests()) == 1  # the second has not been sent yet

    end_a = (await receive_until(ws_a, "reply.end", timeout=15))[-1]["message"]
    end_b = (await receive_until(ws_b, "reply.end", timeout=15))[-1]["message"]
    await ws_a.disconnect()
    await ws_b.disconnect()
    assert end_a["status"] == end_b["status"] == "complete"
    assert end_b["content"] == "second"
    assert len(fake_upstream.chat_requests()) == 2


async def test_stop_while_waiting_in_line_leaves_the_line(fake_upstream):
    await Provider.objects.filter(kind="openai_compat").aupdate(max_concurrency=1)
    fake_upstream.enqueue(stream_reply(["slow"] * 4, delay=0.3), stream_reply(["third"]))
    user_a, first = await make_chat(model_id="fake-model")
    user_b, second = await make_chat(model_id="fake-model")
    user_c, third = await make_chat(model_id="fake-model")
    sockets = [
        await connect(u, c.pk) for u, c in ((user_a, first), (user_b, second), (user_c, third))
    ]
    for ws in sockets:
        await ws.receive_json_from()
    ws_a, ws_b, ws_c = sockets
    await ws_a.send_json_to({"type": "send", "text": "one"})
    await receive_until(ws_a, "delta", timeout=10)
    await ws_b.send_json_to({"type": "send", "text": "two"})
    await receive_until(ws_b, "reply.status", timeout=10)
    await ws_c.send_json_to({"type": "send", "text": "three"})
    status_c = (await receive_until(ws_c, "reply.status", timeout=10))[-1]
    assert status_c["text"] == "waiting for the provider: 2nd in line"

    await ws_b.send_json_to({"type": "stop"})
    assert (await receive_until(ws_b, "reply.end", timeout=10))[-1]["message"][
        "status"
    ] == "cancelled"
    status_c = (await receive_until(ws_c, "reply.status", timeout=10))[-1]
    assert status_c["text"] == "waiting for the provider: 1st in line"
    end_c = (await receive_until(ws_c, "reply.end", timeout=15))[-1]["message"]
    assert end_c["content"] == "third"
    await receive_until(ws_a, "reply.end", timeout=15)
    for ws in sockets:
        await ws.disconnect()
    assert len(fake_upstream.chat_requests()) == 2  # the stopped one never reached upstream


async def test_a_slow_first_reply_does_not_block_when_unlimited(fake_upstream):
    fake_upstream.enqueue(stream_reply(["a"], delay=0.2), stream_reply(["b"]))
    user_a, first = await make_chat(model_id="fake-model")
    user_b, second = await make_chat(model_id="fake-model")
    ws_a = await connect(user_a, first.pk)
    ws_b = await connect(user_b, second.pk)
    await ws_a.receive_json_from()
    await ws_b.receive_json_from()
    await ws_a.send_json_to({"type": "send", "text": "first"})
    await ws_b.send_json_to({"type": "send", "text": "second"})
    frames_b = await receive_until(ws_b, "reply.end", timeout=15)
    await receive_until(ws_a, "reply.end", timeout=15)
    await ws_a.disconnect()
    await ws_b.disconnect()
    assert not any(f["type"] == "reply.status" for f in frames_b)


def test_the_page_shows_how_full_the_window_is_and_the_cache_hit_rate(client, fake_upstream):
    user = user_create()
    model = ModelConfig.objects.get(model_id="fake-model")
    conversation = Conversation.objects.create(owner=user, model=model)
    Message.objects.create(conversation=conversation, role="user", content="hi " * 400)
    Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="hello",
        model=model,
        prompt_tokens=1000,
        cached_tokens=750,
        completion_tokens=10,
    )
    client.force_login(user)
    html = client.get(f"/c/{conversation.pk}/").content.decode()
    assert 'id="context-meter"' in html
    data = json.loads(
        html.split('id="page-data" type="application/json">', 1)[1].split("</script>")[0]
    )
    context = data["context"]
    assert context["window"] == model.context_window
    assert context["used"] >= 1000 and 0 < context["percent"] < 100
    assert context["cache_hit_rate"] == 0.75
    assert context["cached_prefix_tokens"] == 750
    assert "cached prefix" in context["edit_warning"] and "750" in context["edit_warning"]
    assert data["messages"][1]["uncached_tokens"] == 250


async def test_workers_ai_openai_compatible_endpoint_when_the_base_ends_in_v1(workers_ai):
    await Provider.objects.filter(kind="workers_ai").aupdate(
        base_url=workers_ai.base_url + "/accounts/acct123/ai/v1"
    )
    workers_ai.enqueue(workers_ai_run_stream(["ok"]))
    user, conversation = await make_chat(model_id="@cf/moonshotai/kimi-k2.6")
    _, reply = await chat(user, conversation)
    request = workers_ai.requests[-1]
    assert request.path == "/v1/accounts/acct123/ai/v1/chat/completions"
    assert request.json["model"] == "@cf/moonshotai/kimi-k2.6"
    assert (reply.content, reply.cached_tokens) == ("ok", 1024)


@pytest.mark.production
async def test_the_line_goes_through_redis_when_redis_url_is_set(fake_upstream, settings):
    import redis.asyncio as redis

    probe = redis.from_url("redis://127.0.0.1:6379/2")
    try:
        await probe.ping()
    except Exception:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    provider = await Provider.objects.aget(kind="openai_compat")
    await probe.delete(
        *(f"chatapp:gate:{provider.pk}:{k}" for k in ("holders", "waiters", "alive"))
    )
    settings.REDIS_URL = "redis://127.0.0.1:6379/2"
    await Provider.objects.filter(pk=provider.pk).aupdate(max_concurrency=1)
    fake_upstream.enqueue(stream_reply(["slow"] * 3, delay=0.3), stream_reply(["second"]))
    user_a, first = await make_chat(model_id="fake-model")
    user_b, second = await make_chat(model_id="fake-model")
    ws_a = await connect(user_a, first.pk)
    ws_b = await connect(user_b, second.pk)
    await ws_a.receive_json_from()
    await ws_b.receive_json_from()
    await ws_a.send_json_to({"type": "send", "text": "first"})
    await receive_until(ws_a, "delta", timeout=10)
    assert await probe.zcard(f"chatapp:gate:{provider.pk}:holders") == 1
    await ws_b.send_json_to({"type": "send", "text": "second"})
    status = (await receive_until(ws_b, "reply.status", timeout=10))[-1]
    assert status["text"] == "waiting for the provider: 1st in line"
    end_b = (await receive_until(ws_b, "reply.end", timeout=20))[-1]["message"]
    await receive_until(ws_a, "reply.end", timeout=20)
    await ws_a.disconnect()
    await ws_b.disconnect()
    assert end_b["content"] == "second"
    assert await probe.zcard(f"chatapp:gate:{provider.pk}:holders") == 0
    await probe.aclose()
