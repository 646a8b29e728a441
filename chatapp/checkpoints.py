"""Partial replies saved in one batch per interval for the whole process.

Every running reply is tracked here while it streams; one task per event loop writes the text of
every reply that grew since its last save, every STREAM_CHECKPOINT_INTERVAL, in a single
database call (one trip to the database thread, one transaction, one connection). A crash
loses at most one interval; database work grows with the number of running replies, never
with their tokens, and 200 replies cost one thread hop per interval instead of 200.

The same pass is every reply's heartbeat: a saved checkpoint renews the reply's lease, and a
reply that did not grow gets its lease renewed at least three times per STREAM_LEASE_SECONDS
(one UPDATE for all of them). Rows are only written while they are still streaming and owned by
this process (reaper.PROCESS_ID).
"""

import asyncio
import functools
import logging
import time
import weakref
from typing import Protocol

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from . import reaper
from .models import Message

log = logging.getLogger(__name__)


class Streaming(Protocol):
    message_id: int

    def checkpoint(self) -> tuple[str, str, int]:
        """(content, reasoning, seq): the text so far, consistent with its seq."""


class _Checkpointer:
    def __init__(self) -> None:
        self.replies: dict[int, Streaming] = {}
        self.saved: dict[int, int] = {}
        self.renewed: dict[int, float] = {}  # monotonic time of each reply's last lease renewal
        self.task: asyncio.Task | None = None

    def add(self, reply: Streaming) -> None:
        self.replies[reply.message_id] = reply
        self.saved[reply.message_id] = 0
        self.renewed[reply.message_id] = time.monotonic()  # generation took the lease just now
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="reply-checkpoints")

    def discard(self, reply: Streaming) -> None:
        self.replies.pop(reply.message_id, None)
        self.saved.pop(reply.message_id, None)
        self.renewed.pop(reply.message_id, None)

    async def _run(self) -> None:
        renew_every = settings.STREAM_LEASE_SECONDS / 3
        while self.replies:
            await asyncio.sleep(min(settings.STREAM_CHECKPOINT_INTERVAL, renew_every))
            batch, renew = [], []
            now = time.monotonic()
            for message_id, reply in list(self.replies.items()):
                content, reasoning, seq = reply.checkpoint()
                size = len(content) + len(reasoning)
                if size != self.saved.get(message_id):
                    self.saved[message_id] = size
                    self.renewed[message_id] = now
                    batch.append((message_id, content, reasoning, seq))
                elif now - self.renewed.get(message_id, 0.0) >= renew_every:
                    self.renewed[message_id] = now
                    renew.append(message_id)
            if batch or renew:
                try:
                    await database_sync_to_async(_save)(batch, renew)
                except Exception:  # the database may be back before the leases run out
                    log.exception("checkpoint of %d replies failed", len(batch) + len(renew))


def _save(batch: list[tuple[int, str, str, int]], renew: list[int]) -> None:
    now = timezone.now()
    lease = reaper.lease_deadline()
    # Only while still streaming and ours: the final save (or a reaper) must never be undone.
    ours = Message.objects.filter(status=Message.Status.STREAMING, owner=reaper.PROCESS_ID)
    with transaction.atomic():
        if batch:
            # One prepared statement for the whole batch: building an ORM update per reply
            # held the GIL ~0.5 ms each (100 ms a second at 200 replies), stalling every stream.
            adapt = connection.ops.adapt_datetimefield_value
            rows = [
                (content, reasoning, seq, adapt(lease), adapt(now), message_id)
                + (Message.Status.STREAMING.value, reaper.PROCESS_ID)
                for message_id, content, reasoning, seq in batch
            ]
            with connection.cursor() as cursor:
                cursor.executemany(_checkpoint_sql(connection.vendor), rows)
        if renew:
            ours.filter(pk__in=renew).update(lease_expires_at=lease, updated_at=now)


@functools.cache
def _checkpoint_sql(vendor: str) -> str:
    quote = connection.ops.quote_name

    def column(name: str) -> str:
        return quote(Message._meta.get_field(name).column)

    assignments = ", ".join(
        f"{column(name)} = %s"
        for name in ("content", "reasoning", "seq", "lease_expires_at", "updated_at")
    )
    return (
        f"UPDATE {quote(Message._meta.db_table)} SET {assignments} "
        f"WHERE {column('id')} = %s AND {column('status')} = %s AND {column('owner')} = %s"
    )


_per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Checkpointer]" = (
    weakref.WeakKeyDictionary()
)


async def track(reply: Streaming) -> None:
    """Checkpoint `reply` until this coroutine is cancelled (when the reply ends)."""
    loop = asyncio.get_running_loop()
    checkpointer = _per_loop.get(loop)
    if checkpointer is None:
        checkpointer = _per_loop[loop] = _Checkpointer()
    checkpointer.add(reply)
    try:
        await asyncio.Event().wait()
    finally:
        checkpointer.discard(reply)
