"""Partial replies saved in one batch per interval for the whole process.

Every running reply is tracked here while it streams; one task per event loop writes the text of
every reply that grew since its last save, every STREAM_CHECKPOINT_INTERVAL, in a single
database call (one trip to the database thread, one transaction, one connection). A crash
loses at most one interval; database work grows with the number of running replies, never
with their tokens, and 200 replies cost one thread hop per interval instead of 200.
"""

import asyncio
import weakref
from typing import Protocol

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import Message


class Streaming(Protocol):
    message_id: int
    seq: int
    sent_content: str
    sent_reasoning: str


class _Checkpointer:
    def __init__(self) -> None:
        self.replies: dict[int, Streaming] = {}
        self.saved: dict[int, int] = {}
        self.task: asyncio.Task | None = None

    def add(self, reply: Streaming) -> None:
        self.replies[reply.message_id] = reply
        self.saved[reply.message_id] = 0
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="reply-checkpoints")

    def discard(self, reply: Streaming) -> None:
        self.replies.pop(reply.message_id, None)
        self.saved.pop(reply.message_id, None)

    async def _run(self) -> None:
        while self.replies:
            await asyncio.sleep(settings.STREAM_CHECKPOINT_INTERVAL)
            batch = []
            for message_id, reply in list(self.replies.items()):
                size = len(reply.sent_content) + len(reply.sent_reasoning)
                if size != self.saved.get(message_id):
                    self.saved[message_id] = size
                    batch.append((message_id, reply.sent_content, reply.sent_reasoning, reply.seq))
            if batch:
                await database_sync_to_async(_save)(batch)


def _save(batch: list[tuple[int, str, str, int]]) -> None:
    now = timezone.now()
    with transaction.atomic():
        for message_id, content, reasoning, seq in batch:
            # Only while still streaming: the final save must never be overwritten.
            Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(
                content=content, reasoning=reasoning, seq=seq, updated_at=now
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
