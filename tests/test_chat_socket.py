"""The chat websocket end to end: real ASGI stack, real fake upstream over HTTP."""

import pytest
from channels.db import database_sync_to_async

from chatapp.models import Message
from tests.conftest import connect, open_socket, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import Drop, Pause, chunk, error_response, sse, stream_reply

pytestmark = pytest.mark.django_db(transaction=True)

make_user = database_sync_to_async(user_create)
make_conversation = database_sync_to_async(conversation_create)


async def reply_row(message_id) -> Message:
    return await Message.objects.aget(pk=message_id)


async def send(communicator, text: str) -> list[dict]:
    await communicator.send_json_to({"type": "send", "text": text})
    return await receive_until(communicator, "reply.end")


async def test_reply_streams_in_order_and_completes_with_usage(fake_upstream):
    fake_upstream.enqueue(
        stream_reply(
            ["The", " answer", " is", " 42", "."],
            usage={
                "prompt_tokens": 20,
                "completion_tokens": 5,
                "total_tokens": 25,
                "prompt_tokens_details": {"cached_tokens": 16},
            },
        )
    )
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    assert (await ws.receive_json_from())["type"] == "state"

    frames = await send(ws, "What is the answer?\nSecond line")

    assert frames[0]["type"] == "message"
    assert frames[0]["message"]["content"] == "What is the answer?\nSecond line"
    assert frames[0]["title"] == "What is the answer?"
    deltas = [f for f in frames if f["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d.get("text", "") for d in deltas) == "The answer is 42."
    end = frames[-1]["message"]
    assert end["status"] == "complete"
    assert end["content"] == "The answer is 42."
    reply = await reply_row(end["id"])
    assert (reply.content, reply.status) == ("The answer is 42.", "complete")
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (20, 16, 5)
    assert reply.finish_reason == "stop"
    await ws.disconnect()


async def test_usage_inside_the_choice_is_read(fake_upstream):
    # Moonshot puts usage in choices[0].usage and legacy cached_tokens at the top of usage.
    fake_upstream.enqueue(stream_reply(["ok"], usage=None))
    fake_upstream._queue[-1].parts[-2] = sse(
        chunk(
            finish_reason="stop",
            usage_in_choice=True,
            usage={
                "prompt_tokens": 8,
                "completion_tokens": 11,
                "total_tokens": 19,
                "cached_tokens": 8,
            },
        )
    )
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    end = (await send(ws, "hi"))[-1]["message"]
    assert (end["prompt_tokens"], end["cached_tokens"], end["completion_tokens"]) == (8, 8, 11)
    await ws.disconnect()


async def test_stop_keeps_partial_reply(fake_upstream):
    fake_upstream.enqueue(stream_reply([f"w{i} " for i in range(200)], delay=0.02))
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "Write a lot"})
    frames = await receive_until(ws, "delta")
    frames += await receive_until(ws, "delta")
    await ws.send_json_to({"type": "stop"})
    frames += await receive_until(ws, "reply.end")

    end = frames[-1]["message"]
    assert end["status"] == "cancelled"
    assert end["content"].startswith("w0 w1")
    assert len(end["content"].split()) < 200
    shown = "".join(f.get("text", "") for f in frames if f["type"] == "delta")
    assert end["content"].startswith(shown)  # nothing that reached the browser is lost
    reply = await reply_row(end["id"])
    assert (reply.status, reply.content) == ("cancelled", end["content"])
    await ws.disconnect()


async def test_upstream_500_before_first_token_is_an_error_and_keeps_the_question(
    fake_upstream, settings
):
    settings.UPSTREAM_MAX_RETRIES = 1
    fake_upstream.enqueue(error_response(500), error_response(500))
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    frames = await send(ws, "Are you there?")

    types = [f["type"] for f in frames]
    assert "reply.status" in types  # "retrying (1/1)…"
    error = next(f for f in frames if f["type"] == "error")
    assert "server error" in error["message"]
    end = frames[-1]["message"]
    assert end["status"] == "error" and end["error"] == error["message"]
    assert len(fake_upstream.chat_requests()) == 2
    rows = [m async for m in Message.objects.filter(conversation=conversation).order_by("id")]
    assert [(m.role, m.status) for m in rows] == [("user", "complete"), ("assistant", "error")]
    assert rows[0].content == "Are you there?"
    await ws.disconnect()


async def test_connection_dropped_mid_stream_keeps_partial_text(fake_upstream):
    reply = stream_reply(["one", " two", " three"])
    reply.parts = reply.parts[:3] + [Pause(0.05), Drop()]
    fake_upstream.enqueue(reply)
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    end = (await send(ws, "count"))[-1]["message"]
    assert end["status"] == "error"
    assert end["content"] == "one two"
    assert "connection" in end["error"]
    await ws.disconnect()


async def test_anonymous_socket_is_refused(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    connected, code, ws = await open_socket(None, conversation.pk)
    assert not connected and code == 4401


async def test_another_users_conversation_is_refused(fake_upstream):
    owner = await make_user()
    stranger = await make_user()
    conversation = await make_conversation(owner=owner)
    connected, code, ws = await open_socket(stranger, conversation.pk)
    assert not connected and code == 4403


async def test_foreign_origin_is_refused(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    connected, _, ws = await open_socket(
        user, conversation.pk, origin=(b"origin", b"https://evil.example")
    )
    assert not connected


async def test_affinity_header_is_stable_per_conversation_and_differs_between_them(fake_upstream):
    user = await make_user()
    first = await make_conversation(owner=user)
    second = await make_conversation(owner=user)
    for conversation, texts in ((first, ["one", "two"]), (second, ["three"])):
        ws = await connect(user, conversation.pk)
        await ws.receive_json_from()
        for text in texts:
            await send(ws, text)
        await ws.disconnect()

    headers = [r.headers["x-session-affinity"] for r in fake_upstream.chat_requests()]
    assert headers[0] == headers[1] == first.affinity_id
    assert headers[2] == second.affinity_id != first.affinity_id
    assert all(h.startswith("ses_") and len(h) == 36 for h in headers)
    request = fake_upstream.chat_requests()[0]
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.json["stream"] is True
    assert request.json["stream_options"] == {"include_usage": True}
    assert request.path == "/v1/chat/completions"


async def test_turn_two_carries_turn_one_verbatim(fake_upstream):
    fake_upstream.enqueue(stream_reply(["First", " **answer**", "\n\n```py\nx = 1\n```"]))
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await send(ws, "  first question  \nwith two lines")
    await send(ws, "second question")
    await ws.disconnect()

    turn1, turn2 = (r.json["messages"] for r in fake_upstream.chat_requests())
    assert turn1 == [{"role": "user", "content": "  first question  \nwith two lines"}]
    assert turn2 == turn1 + [
        {"role": "assistant", "content": "First **answer**\n\n```py\nx = 1\n```"},
        {"role": "user", "content": "second question"},
    ]
    # Byte-identical prefix: what the provider's prefix cache matches on.
    body1, body2 = (r.body.decode() for r in fake_upstream.chat_requests())
    prefix = body1[: body1.index('"content":"  first question')]
    assert body2.startswith(prefix)


async def test_two_sockets_on_one_conversation_both_see_the_reply(fake_upstream):
    fake_upstream.enqueue(stream_reply(["shared", " text"], delay=0.01))
    user = await make_user()
    conversation = await make_conversation(owner=user)
    a = await connect(user, conversation.pk)
    b = await connect(user, conversation.pk)
    await a.receive_json_from()
    await b.receive_json_from()
    await a.send_json_to({"type": "send", "text": "hello"})
    for ws in (a, b):
        frames = await receive_until(ws, "reply.end")
        assert frames[-1]["message"]["content"] == "shared text"
        await ws.disconnect()


async def test_a_reply_goes_on_after_the_socket_closes(fake_upstream):
    fake_upstream.enqueue(stream_reply(["still", " here"], delay=0.05))
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "hello"})
    await receive_until(ws, "message")
    await ws.disconnect()

    again = await connect(user, conversation.pk)
    state = await again.receive_json_from()
    assert state["type"] == "state"
    frames = [state]
    if state["reply"] is not None:
        frames += await receive_until(again, "reply.end")
        assert frames[-1]["message"]["content"] == "still here"
    else:
        assert state["last"]["content"] == "still here"
    await again.disconnect()


async def test_malformed_frames_get_an_error_and_the_socket_stays(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_to(text_data="{not json")
    assert (await ws.receive_json_from())["code"] == "bad_frame"
    await ws.send_to(bytes_data=b"\x00\x01")
    assert (await ws.receive_json_from())["code"] == "bad_frame"
    await ws.send_json_to({"type": "launch-missiles"})
    assert (await ws.receive_json_from())["code"] == "unknown_type"
    await ws.send_json_to({"type": "send", "text": "   "})
    assert (await ws.receive_json_from())["code"] == "empty"
    await ws.send_json_to({"type": "send", "text": "hi", "model": 999999})
    assert (await ws.receive_json_from())["code"] == "model_unavailable"
    await ws.send_json_to({"type": "stop"})
    assert (await ws.receive_json_from())["code"] == "not_streaming"
    frames = await send(ws, "still works")
    assert frames[-1]["message"]["status"] == "complete"
    await ws.disconnect()


async def test_demo_model_streams_a_canned_reply_when_no_provider_is_set():
    user = await make_user()
    conversation = await make_conversation(owner=user)
    model = await database_sync_to_async(lambda: conversation.model.display_name)()
    assert model == "Demo (offline)"
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    frames = await send(ws, "Hello demo")
    end = frames[-1]["message"]
    assert end["status"] == "complete"
    assert "offline demo model" in end["content"]
    assert "Kimi" not in end["model"]
    assert sum(1 for f in frames if f["type"] == "delta") >= 1
    await ws.disconnect()


async def test_retry_replaces_a_failed_reply(fake_upstream, settings):
    settings.UPSTREAM_MAX_RETRIES = 0
    fake_upstream.enqueue(error_response(400, "Invalid request: nope", "invalid_request_error"))
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    failed = (await send(ws, "try me"))[-1]["message"]
    assert failed["status"] == "error" and "refused the request" in failed["error"]
    assert "nope" not in failed["error"]  # the upstream's own words are for logs and staff

    await ws.send_json_to({"type": "regenerate", "message_id": failed["id"]})
    frames = await receive_until(ws, "reply.end")
    assert frames[0]["type"] == "reply.replaced" and frames[0]["old_id"] == failed["id"]
    assert frames[-1]["message"]["content"] == "Hello from the fake model."
    rows = [m async for m in Message.objects.filter(conversation=conversation).order_by("id")]
    assert [(m.role, m.status) for m in rows] == [("user", "complete"), ("assistant", "complete")]
    # The retried request is the same question again, not a doubled one.
    assert fake_upstream.chat_requests()[-1].json["messages"] == [
        {"role": "user", "content": "try me"}
    ]
    await ws.send_json_to({"type": "regenerate", "message_id": failed["id"]})
    assert (await ws.receive_json_from())["code"] == "not_last"
    await ws.disconnect()
