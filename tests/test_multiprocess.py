"""The production shape for real: several daphne processes sharing PostgreSQL and Redis.

Each server is a real `daphne` subprocess on its own free port, on the test database and this run's
channel-layer prefix; the fake upstream runs in the test process and serves them all. Clients are
real websocket connections (the `websockets` library). Needs DATABASE_URL and REDIS_URL: skipped
in the embedded run, and a failure (not a skip) when REQUIRE_SERVICES=1 says they must be there
(CI's production-shape run).
"""

import asyncio
import json
import os
import random
import threading

import httpx
import pytest
from channels.db import database_sync_to_async

from chatapp.models import Message
from tests.conftest import CHANNEL_LAYER_PREFIX, session_cookie
from tests.factories import conversation_create, user_create
from tests.fake_upstream import Gate, stream_reply
from tests.servers import Server, app_env, require_services, server_factory
from tests.test_streams import Viewer

LEASE_SECONDS = 2.0

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def start_server(django_db_setup, django_db_blocker, _upstream_server):
    """A factory of daphne processes sharing the test database and this run's Redis prefix."""
    require_services()
    with django_db_blocker.unblock():
        env = app_env(
            upstream_url=_upstream_server.base_url,
            channel_prefix=CHANNEL_LAYER_PREFIX,
            STREAM_CHECKPOINT_INTERVAL="0.1",
            STREAM_LEASE_SECONDS=str(LEASE_SECONDS),
            REAPER_INTERVAL="0.5",
            STREAM_STATE_TIMEOUT="10",
        )
    with server_factory(env) as start:
        yield start


@pytest.fixture(scope="module")
def pair(start_server) -> tuple[Server, Server]:
    return start_server("a"), start_server("b")


class Client:
    """A real websocket to one server, with the page's frame handling (Viewer)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.viewer = Viewer()
        self.frames: list[dict] = []

    async def recv(self, timeout: float = 30.0) -> dict:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        return frame

    async def until(self, frame_type: str, *, apply: bool = True, timeout: float = 60.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                if apply:
                    self.viewer.apply(frame)
                if frame["type"] == frame_type:
                    return frame

    async def send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()


async def open_client(server: Server, user, conversation_id: int) -> Client:
    from websockets.asyncio.client import connect

    cookie = (await database_sync_to_async(session_cookie)(user)).decode()
    ws = await connect(
        f"{server.url}/ws/conversations/{conversation_id}/",
        additional_headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{server.port}"},
        open_timeout=30,
    )
    client = Client(ws)
    client.viewer.apply(await client.recv())  # the state frame
    return client


async def make_world():
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    return user, conversation


def owner_pid(message: Message) -> int:
    return int(message.owner.split(":")[1])


async def test_a_reply_on_one_process_streams_to_the_other_and_stops_from_there(
    pair, fake_upstream
):
    a, b = pair
    user, conversation = await make_world()
    full = [f"f{i} " for i in range(40)]
    long = [f"l{i} " for i in range(400)]
    fake_upstream.enqueue(stream_reply(full, delay=0.01), stream_reply(long, delay=0.02))
    on_a = await open_client(a, user, conversation.pk)
    on_b = await open_client(b, user, conversation.pk)

    # Turn 1: sent on A, every delta reaches B in order, once.
    await on_a.send({"type": "send", "text": "first"})
    end_a = await on_a.until("reply.end")
    end_b = await on_b.until("reply.end")
    assert end_a["message"]["content"] == end_b["message"]["content"] == "".join(full)
    assert on_b.viewer.text == "".join(full)
    b_deltas = [f["seq"] for f in on_b.frames if f["type"] == "delta"]
    assert b_deltas == list(range(1, len(b_deltas) + 1)) and len(b_deltas) > 1
    reply = await Message.objects.aget(pk=end_a["message"]["id"])
    assert owner_pid(reply) == a.proc.pid  # it ran on A

    # Turn 2: sent on A, stopped from B.
    await on_a.send({"type": "send", "text": "second"})
    for _ in range(5):
        await on_b.until("delta")
    await on_b.send({"type": "stop"})
    end_b = await on_b.until("reply.end")
    end_a = await on_a.until("reply.end")
    for end in (end_a, end_b):
        assert end["message"]["status"] == "cancelled"
    stopped = end_b["message"]["content"]
    assert stopped and stopped == on_b.viewer.text == on_a.viewer.text
    assert len(stopped) < len("".join(long))
    row = await Message.objects.aget(pk=end_b["message"]["id"])
    assert (row.status, row.content, owner_pid(row)) == ("cancelled", stopped, a.proc.pid)
    await on_a.close()
    await on_b.close()


async def test_unticking_active_on_one_process_closes_the_users_sockets_on_both(pair):
    """The admin's user form, served by A: the user's sockets on A and on B close at once
    (the close travels through Redis), and a new socket is refused on either."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from tests.test_access_matrix import _form_fields

    a, b = pair
    user, conversation = await make_world()
    staff = await database_sync_to_async(user_create)(is_staff=True, is_superuser=True)
    on_a = await open_client(a, user, conversation.pk)
    on_b = await open_client(b, user, conversation.pk)
    path = f"/admin/auth/user/{user.pk}/change/"

    def change_form() -> dict:
        # The form as the admin renders it (here: these servers have no collected static files
        # to render pages with), with Active unticked and nothing else changed.
        from django.test import Client as DjangoClient

        browser = DjangoClient()
        browser.force_login(staff)
        return _form_fields(browser.get(path).content.decode())

    data = await database_sync_to_async(change_form)()
    assert data.pop("is_active") == ["on"]
    staff_cookie = (await database_sync_to_async(session_cookie)(staff)).decode()
    csrf = "k" * 32  # a CSRF secret of our own, as cookie and (unmasked) form token
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"http://127.0.0.1:{a.port}{path}",
            data={**data, "csrfmiddlewaretoken": csrf},
            headers={"Cookie": f"{staff_cookie}; csrftoken={csrf}"},
        )
    assert response.status_code == 302, a.output()
    for client in (on_a, on_b):
        with pytest.raises(ConnectionClosed) as closed:
            await client.until("never", timeout=10)
        assert closed.value.rcvd.code == 4401
    for server in (a, b):
        with pytest.raises((InvalidStatus, ConnectionClosed)):  # refused: 403, or a 4401 close
            refused = await open_client(server, user, conversation.pk)
            await refused.until("never", timeout=10)


@pytest.mark.parametrize("seed", range(6))
async def test_reattach_across_processes_gets_the_exact_text(pair, fake_upstream, seed):
    rng = random.Random(seed)
    servers = list(pair)
    user, conversation = await make_world()
    tokens = [f"s{i} " for i in range(rng.randint(60, 120))]
    reply = stream_reply(tokens, delay=0.02)
    # The second half waits for the first re-attach, so a busy machine cannot finish the reply
    # before the watcher has come back once.
    reattached = threading.Event()
    reply.parts.insert(len(reply.parts) // 2, Gate(reattached))
    fake_upstream.enqueue(reply)
    sender = await open_client(rng.choice(servers), user, conversation.pk)
    await sender.send({"type": "send", "text": "go"})
    watcher = await open_client(rng.choice(servers), user, conversation.pk)
    reconnects = 0
    async with asyncio.timeout(120):
        while watcher.viewer.final is None:
            for _ in range(rng.randint(1, 6)):
                try:
                    frame = await asyncio.wait_for(watcher.recv(), 2)
                except TimeoutError:
                    break  # held at the gate: come back now
                watcher.viewer.apply(frame)
                if watcher.viewer.final is not None:
                    break
            if watcher.viewer.final is not None:
                break
            await watcher.close()
            # Come back on either process: the state must be the same wherever the reply runs.
            watcher = await open_client(rng.choice(servers), user, conversation.pk)
            reconnects += 1
            reattached.set()
            text_after_state = watcher.viewer.text
            assert "".join(tokens).startswith(text_after_state)
    assert reconnects >= 1
    assert watcher.viewer.final["status"] == "complete"
    assert watcher.viewer.text == "".join(tokens)
    await sender.until("reply.end")
    await sender.close()
    await watcher.close()


async def test_killing_the_process_mid_reply_leaves_the_text_and_the_survivor_reaps_it(
    pair, start_server, fake_upstream
):
    _, survivor = pair
    doomed = start_server("doomed")
    user, conversation = await make_world()
    tokens = [f"k{i} " for i in range(600)]
    fake_upstream.enqueue(stream_reply(tokens, delay=0.02))
    on_doomed = await open_client(doomed, user, conversation.pk)
    on_survivor = await open_client(survivor, user, conversation.pk)
    await on_doomed.send({"type": "send", "text": "go"})
    message = await on_survivor.until("message")
    reply_id = message["reply"]["id"]
    for _ in range(5):
        await on_survivor.until("delta")
    # Wait for a checkpoint, then kill the owner without any chance to clean up.
    async with asyncio.timeout(60):
        while not (await Message.objects.aget(pk=reply_id)).content:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    doomed.kill()
    seen_before_kill = on_survivor.viewer.text

    # The survivor's reaper ends it once the lease has run out, and tells its sockets.
    async with asyncio.timeout(60):
        while True:
            frame = await on_survivor.recv(timeout=60)
            if frame["type"] == "reply.end":
                break
    end = frame["message"]
    assert end["id"] == reply_id and end["status"] == "interrupted"
    row = await Message.objects.aget(pk=reply_id)
    assert row.status == "interrupted" and row.content == end["content"]
    # The partial text is the last checkpoint: non-empty and exactly what the stream said.
    assert row.content and "".join(tokens).startswith(row.content)
    assert len(row.content) < len("".join(tokens))
    assert seen_before_kill.startswith(row.content) or row.content.startswith(seen_before_kill)
    await on_survivor.close()


async def test_state_requests_share_one_reply_channel_per_process(pair, fake_upstream):
    """Every socket that joins a reply running on the other process probes its subscription and
    asks that process for its state: the answers come back on one channel per process, and a
    socket's own channel is unsubscribed when it closes, even while frames are flowing to it.
    Redis keeps no subscription per socket that came and went."""
    import redis.asyncio as aioredis

    a, b = pair
    user, conversation = await make_world()
    tokens = [f"t{i} " for i in range(200)]
    fake_upstream.enqueue(stream_reply(tokens, delay=0.05))
    sender = await open_client(a, user, conversation.pk)
    await sender.send({"type": "send", "text": "go"})
    await sender.until("delta")
    client = aioredis.from_url(os.environ["REDIS_URL"])
    pattern = f"{CHANNEL_LAYER_PREFIX}specific.*"

    async def subscriptions() -> int:
        return len(await client.pubsub_channels(pattern))

    async def watch_once() -> None:
        watcher = await open_client(b, user, conversation.pk)
        # The state came from A's memory: a prefix of the reply, with text once it has started.
        assert "".join(tokens).startswith(watcher.viewer.text)
        await watcher.close()

    try:
        await watch_once()  # B's state channel exists from here on
        await asyncio.sleep(0.5)
        before = await subscriptions()
        for _ in range(10):
            await watch_once()
        for _ in range(75):  # unsubscribes are asynchronous: up to 15 s
            after = await subscriptions()
            if after <= before:
                break
            await asyncio.sleep(0.2)
        assert after <= before
        end = await sender.until("reply.end")
        assert end["message"]["status"] == "complete"
    finally:
        await client.aclose()
        await sender.close()
