"""Every token reaches the socket as a delta, even when the channel layer is slow."""

import asyncio

import pytest
from channels.db import database_sync_to_async

from chatapp import events
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import Pause, stream_reply

pytestmark = pytest.mark.django_db(transaction=True)


async def test_tokens_arriving_during_the_last_broadcast_are_still_sent(fake_upstream, monkeypatch):
    # A slow layer (Redis under load): the stream ends while a delta is still being published.
    real_broadcast = events.broadcast

    async def slow_broadcast(conversation_id, event):
        if event["type"] == "delta":
            await asyncio.sleep(0.05)
        await real_broadcast(conversation_id, event)

    monkeypatch.setattr(events, "broadcast", slow_broadcast)
    tokens = [f"t{i} " for i in range(30)]
    reply = stream_reply(tokens)
    # The first token goes out at once; the rest (and the end) arrive while it is published.
    reply.parts.insert(2, Pause(0.01))
    fake_upstream.enqueue(reply)
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()  # state

    await ws.send_json_to({"type": "send", "text": "go"})
    frames = await receive_until(ws, "reply.end")

    deltas = [f for f in frames if f["type"] == "delta"]
    assert "".join(d.get("text", "") for d in deltas) == "".join(tokens)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert frames[-1]["message"]["seq"] == deltas[-1]["seq"]
    await ws.disconnect()
