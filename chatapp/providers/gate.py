"""A per-provider concurrency limit with a fair (first come, first served) queue.

Moonshot's lowest tier allows one request in flight; instead of failing, extra sends wait in line
and are told their position ("waiting for the provider: 2nd in line"). The limit lives on the
Provider row (0 = unlimited).

Two implementations behind `provider_slot()`:
- in-process (the embedded default, one daphne process): an asyncio.Condition per provider;
- Redis (REDIS_URL set: several daphne processes share the limit): a sorted set of holders with
  leases (a crashed process frees its slot when the lease runs out; live holders renew it), a
  sorted set of waiters ordered by a ticket counter, and a Lua script that lets only the head of
  the line take a free slot. Waiters poll, so no wake-up is ever lost between processes.

Priority: chat sends (priority 0) wait ahead of batch items (priority 1, chatapp/batch_runner.py)
in both lines, so a running batch never makes people chatting wait behind hundreds of items;
within one priority the line stays first come, first served.

`GatedClient` wraps a provider client for one reply: it holds a slot for each attempt and shows
staff the fuller message of an error (e.g. which key is invalid).
"""

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from django.conf import settings

from .base import ChatRequest, ProviderClient, ProviderError, StreamItem

log = logging.getLogger(__name__)

OnWait = Callable[[int], Awaitable[None]]
LEASE_SECONDS = 30.0
POLL_SECONDS = 0.2
CHAT, BATCH = 0, 1  # priorities: lower goes first
# Redis line scores: a ticket (a counter) plus this per priority step, so every chat waiter ranks
# ahead of every batch waiter (scores stay exact integers well below 2**53).
PRIORITY_STEP = 10**12


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# ---- in-process -----------------------------------------------------------------------------


class _LocalLine:
    def __init__(self) -> None:
        self.active = 0
        self.waiters: list[object] = []
        self.priority: dict[object, int] = {}
        self.cond = asyncio.Condition()


_local: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _LocalLine]]" = (
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def _local_slot(key: str, limit: int, on_wait: OnWait, priority: int = CHAT):
    line = _local.setdefault(asyncio.get_running_loop(), {}).setdefault(key, _LocalLine())
    me = object()
    async with line.cond:
        # Ahead of every waiter of a lower priority (a chat send passes queued batch items).
        place = next(
            (i for i, w in enumerate(line.waiters) if line.priority[w] > priority),
            len(line.waiters),
        )
        line.waiters.insert(place, me)
        line.priority[me] = priority
        told = None
        try:
            while not (line.waiters[0] is me and line.active < limit):
                position = line.waiters.index(me) + 1
                if position != told:
                    told = position
                    await on_wait(position)
                await line.cond.wait()
        except BaseException:
            line.waiters.remove(me)
            line.priority.pop(me, None)
            line.cond.notify_all()
            raise
        line.waiters.pop(0)
        line.priority.pop(me, None)
        line.active += 1
        waited = told is not None
        line.cond.notify_all()  # the next in line may also fit
    try:
        if waited:
            await on_wait(0)
        yield
    finally:
        async with line.cond:
            line.active -= 1
            line.cond.notify_all()


# ---- Redis (several processes) ---------------------------------------------------------------

ACQUIRE = """
local holders, waiters, alive = KEYS[1], KEYS[2], KEYS[3]
local me, now, expiry, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', alive, '-inf', now)
for _, member in ipairs(dead) do
  redis.call('ZREM', waiters, member)
  redis.call('ZREM', alive, member)
end
if not redis.call('ZSCORE', waiters, me) then
  return -1
end
redis.call('ZADD', alive, expiry, me)
local rank = redis.call('ZRANK', waiters, me)
if rank == 0 and redis.call('ZCARD', holders) < limit then
  redis.call('ZREM', waiters, me)
  redis.call('ZREM', alive, me)
  redis.call('ZADD', holders, expiry, me)
  return 0
end
return rank + 1
"""

_redis: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, object]" = weakref.WeakKeyDictionary()


def _redis_client():
    import redis.asyncio as redis  # installed with channels_redis

    loop = asyncio.get_running_loop()
    client = _redis.get(loop)
    if client is None:
        client = redis.from_url(settings.REDIS_URL)
        _redis[loop] = client
    return client


class RedisLine:
    def __init__(self, client, key: str) -> None:
        self.client = client
        prefix = f"chatapp:gate:{key}"
        self.keys = [f"{prefix}:holders", f"{prefix}:waiters", f"{prefix}:alive"]
        self.ticket_key = f"{prefix}:ticket"
        self.script = client.register_script(ACQUIRE)

    async def _enqueue(self, me: str, priority: int = CHAT) -> None:
        ticket = await self.client.incr(self.ticket_key)
        expiry = (time.time() + LEASE_SECONDS) * 1000
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(self.keys[1], {me: ticket + priority * PRIORITY_STEP})
            pipe.zadd(self.keys[2], {me: expiry})
            await pipe.execute()

    async def _try(self, me: str, limit: int) -> int:
        now = time.time() * 1000
        return int(
            await self.script(keys=self.keys, args=[me, now, now + LEASE_SECONDS * 1000, limit])
        )

    async def _leave(self, me: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            for key in self.keys:
                pipe.zrem(key, me)
            await pipe.execute()

    async def _renew(self, me: str) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            expiry = (time.time() + LEASE_SECONDS) * 1000
            await self.client.zadd(self.keys[0], {me: expiry}, xx=True)

    @asynccontextmanager
    async def slot(self, limit: int, on_wait: OnWait, priority: int = CHAT):
        me = uuid.uuid4().hex
        await self._enqueue(me, priority)
        told = None
        try:
            while True:
                position = await self._try(me, limit)
                if position == 0:
                    break
                if position < 0:  # we looked dead (a long pause): take a new ticket
                    await self._enqueue(me, priority)
                    continue
                if position != told:
                    told = position
                    await on_wait(position)
                await asyncio.sleep(POLL_SECONDS)
        except BaseException:
            await asyncio.shield(self._leave(me))
            raise
        renew = asyncio.create_task(self._renew(me))
        try:
            if told is not None:
                await on_wait(0)
            yield
        finally:
            renew.cancel()
            await asyncio.shield(self._leave(me))


# ---- the entry point -------------------------------------------------------------------------


@asynccontextmanager
async def provider_slot(*, key: str, limit: int, on_wait: OnWait, priority: int = CHAT):
    """Hold one of `limit` slots for `key` while inside; wait in line (told the position via
    `on_wait(n)`, and `on_wait(0)` once through) when all are taken. limit 0 = no limit.
    A waiter of priority CHAT goes ahead of every waiter of priority BATCH."""
    if limit <= 0:
        yield
        return
    if settings.REDIS_URL:
        async with RedisLine(_redis_client(), key).slot(limit, on_wait, priority):
            yield
    else:
        async with _local_slot(key, limit, on_wait, priority):
            yield


class GatedClient(ProviderClient):
    """One reply's view of a provider client: a concurrency slot per attempt, staff messages."""

    def __init__(
        self,
        inner: ProviderClient,
        *,
        key: str,
        limit: int,
        on_wait: OnWait,
        staff: bool = False,
        priority: int = CHAT,
    ) -> None:
        self.inner = inner
        self.key = key
        self.limit = limit
        self.on_wait = on_wait
        self.staff = staff
        self.priority = priority

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        try:
            async with provider_slot(
                key=self.key, limit=self.limit, on_wait=self.on_wait, priority=self.priority
            ):
                async for item in self.inner.stream(request):
                    yield item
        except ProviderError as exc:
            exc.user_message = exc.message_for(staff=self.staff)
            raise
