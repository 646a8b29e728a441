"""Partial replies reach the database while they stream (batched per process, not per token)."""

import asyncio

import pytest
from channels.db import database_sync_to_async

from chatapp.models import Message
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import stream_reply

pytestmark = pytest.mark.django_db(transaction=True)


async def _saved(message_id) -> Message:
    return await Message.objects.aget(pk=message_id)


async def test_two_streaming_replies_are_both_checkpointed_then_saved_whole(fake_upstream):
    tokens = [f"w{i} " for i in range(60)]
    fake_upstream.enqueue(stream_reply(tokens, delay=0.02), stream_reply(tokens, delay=0.02))
    sockets, reply_ids = [], []
    for _ in range(2):
        user = await database_sync_to_async(user_create)()
        conversation = await database_sync_to_async(conversation_create)(owner=user)
        ws = await connect(user, conversation.pk)
        await ws.receive_json_from()  # state
        await ws.send_json_to({"type": "send", "text": "go"})
        sockets.append(ws)
    for ws in sockets:
        frames = await receive_until(ws, "delta")
        reply_ids.append(frames[-1]["message_id"])

    # While both stream, both rows get partial text, though neither reply has ended.
    async with asyncio.timeout(10):
        while True:
            rows = [await _saved(pk) for pk in reply_ids]
            if all(r.content and r.status == "streaming" for r in rows):
                break
            await asyncio.sleep(0.02)
    assert all(0 < len(r.content) < len("".join(tokens)) and r.seq > 0 for r in rows)

    for ws, pk in zip(sockets, reply_ids, strict=True):
        await receive_until(ws, "reply.end")
        row = await _saved(pk)
        assert (row.status, row.content) == ("complete", "".join(tokens))
        await ws.disconnect()
