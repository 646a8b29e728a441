"""Streams that never lose a token: re-attach, leases and the reaper, upstream faults.

Real ASGI stack, real fake upstream over HTTP, and the configured database and channel layer
(SQLite + in-memory by default; PostgreSQL + Redis in CI's production-shape run).
"""

import asyncio
import random
import socket
from contextlib import contextmanager
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from chatapp import reaper
from chatapp.model_catalog import catalog_sync, reset_catalog_cache
from chatapp.models import Message, UsageRecord
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, user_create
from tests.fake_upstream import (
    Drop,
    FakeResponse,
    Pause,
    chunk,
    error_response,
    sse,
    stream_reply,
)

pytestmark = pytest.mark.django_db(transaction=True)

make_user = database_sync_to_async(user_create)
make_conversation = database_sync_to_async(conversation_create)


class Viewer:
    """What the page does with frames, asserting the protocol's promise on every frame: after a
    state frame, deltas continue from its seq + 1, each exactly once, and the text shown only
    ever grows. Tracks the latest reply."""

    def __init__(self) -> None:
        self.message_id: int | None = None
        self.text = ""
        self.seq = 0
        self.final: dict | None = None

    def _new_reply(self, message_id: int) -> None:
        if message_id != self.message_id:
            self.message_id, self.text, self.seq, self.final = message_id, "", 0, None

    def apply(self, frame: dict) -> None:
        kind = frame["type"]
        if kind == "message":
            self._new_reply(frame["reply"]["id"])
        elif kind == "state":
            reply = frame["reply"]
            if reply is None:
                last = frame.get("last")
                if last and last["status"] != "streaming":
                    self._new_reply(last["id"])
                    self._end(last)
                return
            self._new_reply(reply["message_id"])
            assert reply["content"].startswith(self.text), "a snapshot lost shown text"
            self.text, self.seq = reply["content"], reply["seq"]
        elif kind == "delta":
            self._new_reply(frame["message_id"])
            assert frame["seq"] == self.seq + 1, f"gap or double: {self.seq} -> {frame['seq']}"
            self.seq = frame["seq"]
            self.text += frame.get("text", "")
        elif kind == "reply.end":
            self._new_reply(frame["message"]["id"])
            self._end(frame["message"])

    def _end(self, message: dict) -> None:
        assert message["content"].startswith(self.text)
        self.text = message["content"]
        self.final = message


async def wait_for(condition, timeout: float = 30.0):
    """Poll a condition (the fake upstream runs in another thread: no event to await)."""
    async with asyncio.timeout(timeout):
        while not (result := condition()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return result


async def start_reply(fake_upstream, response: FakeResponse, text: str = "go"):
    fake_upstream.enqueue(response)
    user = await make_user()
    conversation = await make_conversation(owner=user)
    ws = await connect(user, conversation.pk)
    assert (await ws.receive_json_from())["type"] == "state"
    await ws.send_json_to({"type": "send", "text": text})
    return user, conversation, ws


# ---- re-attach ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
async def test_reattach_at_random_points_gets_the_exact_full_text(fake_upstream, seed):
    rng = random.Random(seed)
    tokens = [f"w{i} " for i in range(rng.randint(30, 80))]
    user, conversation, ws = await start_reply(
        fake_upstream, stream_reply(tokens, delay=rng.choice([0.005, 0.01, 0.02]))
    )
    viewer = Viewer()
    reconnects = 0
    async with asyncio.timeout(60):
        while viewer.final is None:
            # Read a random number of frames, then drop the socket and come back.
            for _ in range(rng.randint(0, 8) if reconnects else rng.randint(1, 3)):
                frame = await ws.receive_json_from(timeout=20)
                viewer.apply(frame)
                if viewer.final is not None:
                    break
            if viewer.final is not None:
                break
            await ws.disconnect()
            await asyncio.sleep(rng.choice([0, 0, 0.005, 0.03]))
            ws = await connect(user, conversation.pk)
            reconnects += 1
    await ws.disconnect()

    assert reconnects >= 1
    assert viewer.final["status"] == "complete"
    assert viewer.text == "".join(tokens)
    saved = await Message.objects.aget(pk=viewer.final["id"])
    assert saved.content == "".join(tokens)


async def test_a_second_socket_joining_mid_reply_sees_the_whole_reply_once(fake_upstream):
    tokens = [f"t{i} " for i in range(40)]
    user, conversation, first = await start_reply(fake_upstream, stream_reply(tokens, delay=0.01))
    await receive_until(first, "delta")
    await receive_until(first, "delta")
    second = await connect(user, conversation.pk)
    viewer = Viewer()
    state = await second.receive_json_from()
    assert state["type"] == "state" and state["reply"]["seq"] >= 2
    viewer.apply(state)
    for frame in await receive_until(second, "reply.end", timeout=30):
        viewer.apply(frame)
    assert viewer.text == "".join(tokens)
    await first.disconnect()
    await second.disconnect()


# ---- nothing lost ------------------------------------------------------------------------------


async def test_the_question_is_committed_before_the_upstream_call(fake_upstream):
    reply = stream_reply(["late"])
    reply.parts.insert(0, Pause(1.0))
    user, conversation, ws = await start_reply(fake_upstream, reply, text="keep me")
    await wait_for(lambda: fake_upstream.chat_requests())
    # The upstream has the request but has not answered: the question is already in the database
    # (read on another connection, so it is committed).
    rows = [
        (m.role, m.content, m.status)
        async for m in Message.objects.filter(conversation=conversation).order_by("id")
    ]
    assert rows == [("user", "keep me", "complete"), ("assistant", "", "streaming")]
    await receive_until(ws, "reply.end", timeout=30)
    await ws.disconnect()


async def test_a_running_reply_holds_a_lease_and_checkpoints_its_text(fake_upstream):
    tokens = [f"p{i} " for i in range(60)]
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(tokens, delay=0.02))
    frames = await receive_until(ws, "message")
    reply_id = frames[-1]["reply"]["id"]
    async with asyncio.timeout(30):
        while True:
            row = await Message.objects.aget(pk=reply_id)
            if row.content:
                break
            await asyncio.sleep(0.02)
    assert row.status == "streaming"
    assert row.owner == reaper.PROCESS_ID
    assert row.lease_expires_at > timezone.now()
    assert "".join(tokens).startswith(row.content) and row.seq >= 1
    end = (await receive_until(ws, "reply.end", timeout=30))[-1]["message"]
    row = await Message.objects.aget(pk=reply_id)
    assert (row.status, row.content, row.lease_expires_at) == ("complete", end["content"], None)
    await ws.disconnect()


# ---- the reaper --------------------------------------------------------------------------------


def _streaming_reply(conversation, **fields) -> Message:
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        **fields,
    )


async def test_reaper_interrupts_a_reply_whose_owner_died_and_tells_the_sockets(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    dead = await database_sync_to_async(_streaming_reply)(
        conversation,
        content="half an ans",
        seq=7,
        owner="gone-host:123:abcd",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )
    ws = await connect(user, conversation.pk)
    state = await ws.receive_json_from()
    # The dead owner cannot answer: the socket gets the last checkpoint.
    assert state["reply"]["content"] == "half an ans" and state["reply"]["seq"] == 7

    assert await reaper.reap_once() == 1
    end = (await receive_until(ws, "reply.end"))[-1]["message"]
    assert (end["id"], end["status"], end["content"]) == (dead.pk, "interrupted", "half an ans")
    assert "Retry" in end["error"]
    row = await Message.objects.aget(pk=dead.pk)
    assert (row.status, row.content) == ("interrupted", "half an ans")
    assert await reaper.reap_once() == 0  # done once
    # An interrupted reply is a terminal state: one (token-less) usage record.
    records = [r async for r in UsageRecord.objects.filter(conversation=conversation)]
    assert [(r.status, r.prompt_tokens, r.cost_usd) for r in records] == [("interrupted", 0, 0)]
    await ws.disconnect()


async def test_reaper_leaves_live_leases_alone(fake_upstream, settings):
    settings.STREAM_LEASE_SECONDS = 30
    user = await make_user()
    conversation = await make_conversation(owner=user)
    create = database_sync_to_async(_streaming_reply)
    live = await create(
        conversation,
        owner="other-process:1:ffff",
        lease_expires_at=timezone.now() + timedelta(seconds=20),
    )
    fresh_without_lease = await create(conversation)  # just created, its task not started yet
    assert await reaper.reap_once() == 0
    statuses = [
        m.status async for m in Message.objects.filter(pk__in=[live.pk, fresh_without_lease.pk])
    ]
    assert statuses == ["streaming", "streaming"]

    # A reply that never got a lease and has not been touched for a lease period is reaped.
    await Message.objects.filter(pk=fresh_without_lease.pk).aupdate(
        updated_at=timezone.now() - timedelta(seconds=31)
    )
    assert await reaper.reap_once() == 1
    row = await Message.objects.aget(pk=fresh_without_lease.pk)
    assert row.status == "interrupted"


async def test_an_interrupted_reply_can_be_retried(fake_upstream):
    user = await make_user()
    conversation = await make_conversation(owner=user)
    await database_sync_to_async(Message.objects.create)(
        conversation=conversation, role="user", content="question", status="complete"
    )
    dead = await database_sync_to_async(_streaming_reply)(
        conversation, content="par", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    await reaper.reap_once()
    ws = await connect(user, conversation.pk)
    state = await ws.receive_json_from()
    assert state["reply"] is None and state["last"]["status"] == "interrupted"
    await ws.send_json_to({"type": "regenerate", "message_id": dead.pk})
    end = (await receive_until(ws, "reply.end"))[-1]["message"]
    assert (end["status"], end["content"]) == ("complete", "Hello from the fake model.")
    await ws.disconnect()


# ---- upstream faults ---------------------------------------------------------------------------


def statuses(frames: list[dict]) -> list[str]:
    return [f["text"] for f in frames if f["type"] == "reply.status"]


def shown(frames: list[dict]) -> str:
    return "".join(f.get("text", "") for f in frames if f["type"] == "delta")


async def test_429_with_retry_after_is_retried_after_the_wait_then_succeeds(fake_upstream):
    fake_upstream.enqueue(error_response(429, "slow down", "rate_limit", {"retry-after": "1"}))
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["fine", " now"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    assert statuses(frames) == ["retrying (1/3)…"]
    end = frames[-1]["message"]
    assert (end["status"], end["content"]) == ("complete", "fine now")
    first, second = fake_upstream.chat_requests()
    assert second.received_at - first.received_at >= 1.0  # the provider's Retry-After
    await ws.disconnect()


async def test_a_retry_after_beyond_a_minute_is_not_waited_for(fake_upstream):
    fake_upstream.enqueue(error_response(429, "tomorrow", "rate_limit", {"retry-after": "3600"}))
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["unused"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    end = frames[-1]["message"]
    assert end["status"] == "error" and "rate limit" in end["error"]
    assert len(fake_upstream.chat_requests()) == 1
    await ws.disconnect()


async def test_503_three_times_then_success(fake_upstream, settings, caplog):
    caplog.set_level("INFO", logger="chatapp.generation")
    settings.UPSTREAM_MAX_RETRIES = 3
    fake_upstream.enqueue(*(error_response(503, "overloaded") for _ in range(3)))
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["at", " last"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    assert statuses(frames) == ["retrying (1/3)…", "retrying (2/3)…", "retrying (3/3)…"]
    end = frames[-1]["message"]
    assert (end["status"], end["content"]) == ("complete", "at last")
    assert len(fake_upstream.chat_requests()) == 4
    # The one structured line per reply says how it went, retries included.
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("reply conv"))
    assert f"conversation={conversation.pk} " in line
    assert "status=complete" in line and "retries=3" in line and "ttft_ms=" in line
    await ws.disconnect()


async def test_500_after_20_tokens_keeps_the_partial_text_as_an_error(fake_upstream):
    tokens = [f"k{i} " for i in range(20)]
    response = stream_reply(tokens)
    response.parts = response.parts[:-2] + [
        sse({"error": {"message": "internal error", "type": "server_error", "code": 500}})
    ]
    user, conversation, ws = await start_reply(fake_upstream, response)
    frames = await receive_until(ws, "reply.end", timeout=30)
    end = frames[-1]["message"]
    assert end["status"] == "error" and "server error" in end["error"]
    assert end["content"] == "".join(tokens) == shown(frames)
    assert statuses(frames) == []  # never retried once text arrived
    assert len(fake_upstream.chat_requests()) == 1
    row = await Message.objects.aget(pk=end["id"])
    assert (row.status, row.content) == ("error", "".join(tokens))
    await ws.disconnect()


async def test_a_stalled_stream_ends_as_an_error_with_its_text(fake_upstream, settings):
    settings.UPSTREAM_STALL_TIMEOUT = 0.5
    response = stream_reply(["before", " the", " stall", " never"])
    response.parts = response.parts[:4] + [Pause(5)] + response.parts[4:]
    user, conversation, ws = await start_reply(fake_upstream, response)
    frames = await receive_until(ws, "reply.end", timeout=30)
    end = frames[-1]["message"]
    assert end["status"] == "error" and "stopped sending" in end["error"]
    assert end["content"] == "before the stall" == shown(frames)
    assert len(fake_upstream.chat_requests()) == 1
    await ws.disconnect()


async def test_a_stall_before_the_first_token_is_retried(fake_upstream, settings):
    settings.UPSTREAM_STALL_TIMEOUT = 0.5
    settings.UPSTREAM_MAX_RETRIES = 1
    stalled = stream_reply(["never"])
    stalled.parts = [Pause(5)]
    fake_upstream.enqueue(stalled)
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["second", " try"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    assert statuses(frames) == ["retrying (1/1)…"]
    assert frames[-1]["message"]["content"] == "second try"
    await ws.disconnect()


async def test_no_response_headers_is_a_read_timeout_and_retried(fake_upstream, settings):
    settings.UPSTREAM_STALL_TIMEOUT = 0.5
    settings.UPSTREAM_MAX_RETRIES = 1
    fake_upstream.enqueue(FakeResponse(head_delay=5, parts=[sse(chunk(content="no"))]))
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["answered"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    assert statuses(frames) == ["retrying (1/1)…"]
    assert frames[-1]["message"]["content"] == "answered"
    await ws.disconnect()


async def test_a_connection_reset_before_the_first_token_is_retried(fake_upstream):
    fake_upstream.enqueue(FakeResponse(parts=[Drop()]))
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["recovered"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    assert statuses(frames) == ["retrying (1/3)…"]
    assert frames[-1]["message"]["content"] == "recovered"
    await ws.disconnect()


async def test_a_connection_reset_mid_reply_keeps_what_was_shown(fake_upstream):
    response = stream_reply([f"r{i} " for i in range(10)], delay=0.01)
    response.parts = response.parts[:12] + [Drop()]
    user, conversation, ws = await start_reply(fake_upstream, response)
    frames = await receive_until(ws, "reply.end", timeout=30)
    end = frames[-1]["message"]
    assert end["status"] == "error" and "connection" in end["error"]
    assert end["content"] and end["content"] == shown(frames)
    assert len(fake_upstream.chat_requests()) == 1
    await ws.disconnect()


async def test_an_unreachable_provider_ends_as_an_error_after_the_retries(fake_upstream, settings):
    settings.UPSTREAM_MAX_RETRIES = 1
    settings.OPENAI_COMPAT_BASE_URL = closed_port_url()
    reset_catalog_cache()
    await database_sync_to_async(catalog_sync)()
    user, conversation, ws = await start_reply(fake_upstream, stream_reply(["unused"]))
    frames = await receive_until(ws, "reply.end", timeout=30)
    assert statuses(frames) == ["retrying (1/1)…"]
    end = frames[-1]["message"]
    assert end["status"] == "error" and "connection" in end["error"]
    await ws.disconnect()


async def test_a_provider_that_never_accepts_the_connection_hits_the_connect_timeout(
    fake_upstream, settings
):
    settings.UPSTREAM_MAX_RETRIES = 0
    settings.UPSTREAM_CONNECT_TIMEOUT = 0.5
    with unaccepting_listener() as url:
        settings.OPENAI_COMPAT_BASE_URL = url
        reset_catalog_cache()
        await database_sync_to_async(catalog_sync)()
        user, conversation, ws = await start_reply(fake_upstream, stream_reply(["unused"]))
        end = (await receive_until(ws, "reply.end", timeout=30))[-1]["message"]
    assert end["status"] == "error"
    assert end["error"] == "Could not reach the model provider in time."
    await ws.disconnect()


@contextmanager
def unaccepting_listener():
    """A loopback port whose accept queue is full: the kernel drops further SYNs, so a connect
    hangs until the client's connect timeout (what an overloaded or firewalled host does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_healthz_reports_the_database_and_the_channel_layer(client, settings):
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (
        200,
        {"database": "ok", "channel_layer": "ok"},
    )
    # A channel layer that cannot be reached (nothing listens on that port) makes it unhealthy.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [closed_port_url().replace("http://", "redis://")[:-3]]},
        }
    }
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"] == "ok"
    assert response.json()["channel_layer"].startswith("error")
