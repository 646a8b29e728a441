"""Faults around one reply, in one process: a channel layer that fails, the reaper racing the
owner, an upstream that closes cleanly in the middle of a reply.

The multi-process versions (Redis killed and restarted, PostgreSQL connections terminated, a
process killed after a blip) are in test_faults_multiprocess.py.
"""

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from chatapp import events, generation, reaper
from chatapp.models import Message, UsageRecord
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import FakeResponse, chunk, sse, stream_reply
from tests.test_streams import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


async def start(fake_upstream, *responses):
    fake_upstream.enqueue(*responses)
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    ws = await connect(user, conversation.pk)
    assert (await ws.receive_json_from())["type"] == "state"
    await ws.send_json_to({"type": "send", "text": "go"})
    message = (await receive_until(ws, "message"))[-1]
    return user, conversation, ws, message["reply"]["id"]


async def test_upstream_closing_cleanly_mid_reply_is_an_error_with_the_text_kept(fake_upstream):
    truncated = FakeResponse(
        parts=[sse(chunk(content="")), sse(chunk(content="The answer")), sse(chunk(content=" is"))]
    )  # then a clean end of the body: no finish_reason, no [DONE]
    _, _, ws, reply_id = await start(fake_upstream, truncated)

    frames = await receive_until(ws, "reply.end")
    end = frames[-1]
    assert end["status"] == "error" and end["message"]["status"] == "error"
    assert end["message"]["content"] == "The answer is"
    assert "ended the reply before it was finished" in end["message"]["error"]
    assert "Retry" in end["message"]["error"]  # the page shows Retry on every error reply
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["upstream_truncated"]
    row = await Message.objects.aget(pk=reply_id)
    assert (row.status, row.content) == ("error", "The answer is")
    assert await UsageRecord.objects.filter(message_id=reply_id).acount() == 1
    assert len(fake_upstream.chat_requests()) == 1  # text had arrived: not retried blindly

    # Retry writes it again.
    fake_upstream.enqueue(stream_reply(["Whole", " answer."]))
    await ws.send_json_to({"type": "regenerate", "message_id": reply_id})
    end = (await receive_until(ws, "reply.end"))[-1]
    assert (end["status"], end["message"]["content"]) == ("complete", "Whole answer.")
    await ws.disconnect()


async def test_a_stream_that_ends_after_finish_reason_without_done_is_complete(fake_upstream):
    reply = stream_reply(["Fine", "."])
    reply.parts.pop()  # no [DONE]: some servers end the body right after the last chunk
    _, _, ws, reply_id = await start(fake_upstream, reply)
    end = (await receive_until(ws, "reply.end"))[-1]
    assert (end["status"], end["message"]["content"]) == ("complete", "Fine.")
    await ws.disconnect()


async def test_reaper_and_owner_racing_end_a_reply_once(fake_upstream, settings):
    tokens = [f"r{i} " for i in range(60)]
    _, conversation, ws, reply_id = await start(fake_upstream, stream_reply(tokens, delay=0.02))
    await wait_for(lambda: reply_id in generation.RUNNING)
    running = generation.RUNNING[reply_id]
    await wait_for(lambda: len(running.sent_content) > 20)

    # A reaper whose clock is past the lease (as after a long database outage held the
    # heartbeat) ends the reply while its owner is still streaming. (Expiring the row's lease
    # instead would race the owner's next checkpoint, which renews it.)
    later = timezone.now() + timedelta(seconds=settings.STREAM_LEASE_SECONDS + 1)
    assert await reaper.reap_once(now=later) == 1
    await running.task  # the owner finishes its stream and tries its own final save

    frames = await receive_until(ws, "reply.end")
    await asyncio.sleep(0.3)  # anything the owner might still send
    while not ws.output_queue.empty():
        frames.append(await ws.receive_json_from())
    ends = [f for f in frames if f["type"] == "reply.end"]
    assert {e["status"] for e in ends} == {"interrupted"}
    row = await Message.objects.aget(pk=reply_id)
    assert row.status == "interrupted"  # the owner's "complete" did not overwrite it
    assert await UsageRecord.objects.filter(message_id=reply_id).acount() == 1

    # One shape of reply.end, whoever ends the reply.
    fake_upstream.enqueue(stream_reply(["ok"]))
    await ws.send_json_to({"type": "regenerate", "message_id": reply_id})
    normal = (await receive_until(ws, "reply.end"))[-1]
    assert normal["status"] == "complete"
    assert set(normal) == set(ends[0]) and set(normal["message"]) == set(ends[0]["message"])
    assert ends[0]["context"] is not None
    await ws.disconnect()


async def test_a_failing_channel_layer_does_not_end_the_flusher(fake_upstream, monkeypatch):
    """Every publish fails for a while mid-reply: the reply goes on, the checkpoint keeps the
    text the provider sent, and once the layer is back the socket catches up through state."""
    tokens = [f"b{i} " for i in range(80)]
    _, _, ws, reply_id = await start(fake_upstream, stream_reply(tokens, delay=0.02))
    await wait_for(lambda: reply_id in generation.RUNNING)
    running = generation.RUNNING[reply_id]
    await wait_for(lambda: len(running.content) > 10)

    real_broadcast = events.broadcast
    down = True

    async def failing_broadcast(conversation_id, frame):
        if down:
            raise ConnectionError("Redis is restarting")
        await real_broadcast(conversation_id, frame)

    monkeypatch.setattr(events, "broadcast", failing_broadcast)
    await asyncio.sleep(0.5)
    received_during_outage = len("".join(running.content))
    # The checkpoint saved what the provider sent meanwhile, not only what was broadcast.
    async with asyncio.timeout(10):
        while len((await Message.objects.aget(pk=reply_id)).content) < received_during_outage:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    down = False
    frames = await receive_until(ws, "reply.end", timeout=15)
    end = frames[-1]
    assert end["message"]["content"] == "".join(tokens)
    deltas = [f for f in frames if f["type"] == "delta"]
    seqs = [d["seq"] for d in deltas]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert any(b - a > 1 for a, b in zip(seqs, seqs[1:], strict=False))  # the lost frames' gap
    kinds = [f["type"] for f in frames]
    # The page was told, straight from this process, to show "reconnecting…" and then to catch up.
    assert "layer.down" in kinds and "layer.up" in kinds
    assert kinds.index("layer.down") < kinds.index("layer.up")
    await ws.disconnect()
