"""Sharing in the production shape: two daphne processes on PostgreSQL and Redis.

The owner writes on process A; a team mate follows the reply live in the shared view on process
B; the owner revokes through A's HTTP endpoint, and the open view on B is told and closed, and
the shared URL 404s on both. Real daphne processes (tests/test_multiprocess.py's fixture), real
websockets, real HTTP. Skipped in the embedded run, a failure when REQUIRE_SERVICES=1.
"""

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest
import redis.asyncio as aioredis
from channels.db import database_sync_to_async
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chatapp.models import AuditEntry, ConversationShare
from tests.conftest import CHANNEL_LAYER_PREFIX, session_cookie
from tests.factories import conversation_create, team_create, user_create
from tests.fake_upstream import stream_reply
from tests.servers import ROOT
from tests.test_multiprocess import open_client, pair, start_server  # noqa: F401 (fixtures)
from tests.test_streams import Viewer

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module", autouse=True)
def _static_root(tmp_path_factory):
    """The pages render {% static %} through the manifest: the servers get a collected
    STATIC_ROOT of their own (autouse, so it is in the environment before they start)."""
    root = tmp_path_factory.mktemp("static")
    env = {**os.environ, "STATIC_ROOT": str(root), "DJANGO_SETTINGS_MODULE": "chatapp.settings"}
    env.pop("DATABASE_URL", None)  # collectstatic needs no database
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "collectstatic", "--noinput"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    before = os.environ.get("STATIC_ROOT")
    os.environ["STATIC_ROOT"] = str(root)
    yield
    if before is None:
        os.environ.pop("STATIC_ROOT", None)
    else:
        os.environ["STATIC_ROOT"] = before


def _world():
    owner = user_create(username="mp-sharer")
    mate = user_create(username="mp-mate")
    team = team_create(name="MP team", members=[owner, mate])
    conversation = conversation_create(owner=owner, team=team, title="Across processes")
    return owner, mate, conversation


class Http:
    """A logged-in browser-like HTTP client to one server (session cookie + CSRF token)."""

    def __init__(self, server, cookie: str) -> None:
        self.base = f"http://127.0.0.1:{server.port}"
        self.client = httpx.AsyncClient(base_url=self.base, timeout=30)
        name, value = cookie.split("=", 1)
        self.client.cookies.set(name, value, domain="127.0.0.1")

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path)

    async def post(self, path: str, data: dict | None = None) -> httpx.Response:
        if "csrftoken" not in self.client.cookies:
            page = await self.client.get("/")  # the chat page sets the CSRF cookie
            assert "csrftoken" in self.client.cookies, page.status_code
        token = self.client.cookies["csrftoken"]
        return await self.client.post(
            path, data=data or {}, headers={"X-CSRFToken": token, "Referer": self.base + "/"}
        )

    async def close(self) -> None:
        await self.client.aclose()


async def test_a_revoke_on_one_process_closes_the_shared_view_on_the_other(pair, fake_upstream):  # noqa: F811
    a, b = pair
    owner, mate, conversation = await database_sync_to_async(_world)()
    owner_http = Http(a, (await database_sync_to_async(session_cookie)(owner)).decode())
    mate_cookie = (await database_sync_to_async(session_cookie)(mate)).decode()
    mate_http_b = Http(b, mate_cookie)
    mate_http_a = Http(a, mate_cookie)

    created = await owner_http.post(
        f"/api/conversations/{conversation.pk}/shares", {"scope": "team"}
    )
    assert created.status_code == 201, created.text
    share = created.json()

    tokens = [f"mp{i} " for i in range(150)]
    fake_upstream.enqueue(stream_reply(tokens, delay=0.02))
    on_a = await open_client(a, owner, conversation.pk)
    await on_a.send({"type": "send", "text": "write a lot"})
    await on_a.until("delta")

    # The team mate's shared view, on the other process, follows the reply live.
    viewer_ws = await connect(
        f"{b.url}/ws/shared/{share['id']}/",
        additional_headers={"Cookie": mate_cookie, "Origin": f"http://127.0.0.1:{b.port}"},
        open_timeout=30,
    )
    viewer = Viewer()

    async def recv() -> dict:
        frame = json.loads(await asyncio.wait_for(viewer_ws.recv(), 30))
        viewer.apply(frame)
        return frame

    state = await recv()
    assert state["type"] == "state" and state["reply"] is not None
    deltas = 0
    while deltas < 5:
        deltas += (await recv())["type"] == "delta"
    assert viewer.text and "".join(tokens).startswith(viewer.text)

    page = await mate_http_b.get(share["url"])
    assert page.status_code == 200 and "Shared by <strong>mp-sharer</strong>" in page.text

    # Revoke on A: B's open view gets "share.revoked" and is closed.
    revoked = await owner_http.post(f"/api/shares/{share['id']}/revoke")
    assert revoked.status_code == 200, revoked.text
    async with asyncio.timeout(30):
        while (frame := await recv())["type"] != "share.revoked":
            assert frame["type"] in ("delta", "reply.status", "state", "reply.end")
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(30):
            while True:
                await viewer_ws.recv()
    assert closed.value.rcvd.code == 4404
    for http in (mate_http_b, mate_http_a):
        assert (await http.get(share["url"])).status_code == 404

    # The owner's reply goes on, untouched, to its end.
    end = await on_a.until("reply.end")
    assert end["message"]["content"] == "".join(tokens)
    share_row = await ConversationShare.objects.aget(pk=share["id"])
    assert share_row.revoked_at is not None and share_row.revoked_by_id == owner.pk
    assert await AuditEntry.objects.filter(
        action="share.revoked", object_id=str(share["id"])
    ).aexists()
    await on_a.close()
    for http in (owner_http, mate_http_b, mate_http_a):
        await http.close()


async def test_shared_views_that_come_and_go_leave_no_subscription_behind(pair, fake_upstream):  # noqa: F811
    """Ten shared views open and close on B while a reply streams on A: Redis keeps no
    subscription of theirs (their own channels, the share's group, the conversation's)."""
    a, b = pair
    owner, mate, conversation = await database_sync_to_async(_world)()
    owner_http = Http(a, (await database_sync_to_async(session_cookie)(owner)).decode())
    share = (
        await owner_http.post(f"/api/conversations/{conversation.pk}/shares", {"scope": "team"})
    ).json()
    mate_cookie = (await database_sync_to_async(session_cookie)(mate)).decode()
    tokens = [f"t{i} " for i in range(200)]
    fake_upstream.enqueue(stream_reply(tokens, delay=0.05))
    sender = await open_client(a, owner, conversation.pk)
    await sender.send({"type": "send", "text": "go"})
    await sender.until("delta")
    client = aioredis.from_url(os.environ["REDIS_URL"])

    async def subscriptions() -> int:
        return len(await client.pubsub_channels(f"{CHANNEL_LAYER_PREFIX}*"))

    async def share_group_subscribed() -> bool:
        name = f"{CHANNEL_LAYER_PREFIX}__group__share.{share['id']}".encode()
        return name in await client.pubsub_channels(f"{CHANNEL_LAYER_PREFIX}__group__share.*")

    async def watch_once() -> None:
        ws = await connect(
            f"{b.url}/ws/shared/{share['id']}/",
            additional_headers={"Cookie": mate_cookie, "Origin": f"http://127.0.0.1:{b.port}"},
            open_timeout=30,
        )
        state = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert state["type"] == "state"
        assert "".join(tokens).startswith((state["reply"] or {}).get("content", ""))
        await ws.close()

    try:
        # The owner's own socket on B, come and gone: B's mailbox channel exists from here on.
        await (await open_client(b, owner, conversation.pk)).close()
        await asyncio.sleep(0.5)
        before = await subscriptions()
        for _ in range(10):
            await watch_once()
        for _ in range(75):  # unsubscribes are asynchronous: up to 15 s
            after, shared = await subscriptions(), await share_group_subscribed()
            if after <= before and not shared:
                break
            await asyncio.sleep(0.2)
        assert after <= before
        assert not shared, "the share's group is still subscribed with no view open"
        assert (await sender.until("reply.end"))["message"]["status"] == "complete"
    finally:
        await client.aclose()
        await sender.close()
        await owner_http.close()
