"""Leases on running replies, and the reaper that ends replies whose process died.

A running reply's Message carries `owner` (this process's id) and `lease_expires_at`, renewed by
its heartbeat (the process's checkpoint pass, checkpoints.py). Any process may reap: a reply still `streaming` whose lease has
run out (or that never got one and has not been touched for a lease period) is marked
`interrupted`, keeping the partial text of its last checkpoint, and every socket watching the
conversation gets its final form. Only expired leases are touched, so with several processes a
live reply on another process is never reaped.

The reaper runs as one periodic task per event loop in every daphne process, started by the
first request the process serves (the ASGI wrapper below; the container's health probe makes
that happen right after start), and once more as a start step (`manage.py prepare`) for replies
left by a previous run. `manage.py reap_replies` runs it by hand or from cron.
"""

import asyncio
import logging
import os
import random
import socket
import uuid
import weakref
from datetime import datetime, timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import events, teams
from .models import Message

log = logging.getLogger(__name__)

# Unique per process start: a restarted process on the same host and pid is a new owner.
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

INTERRUPTED_MESSAGE = (
    "The server stopped while this reply was being written. The text so far is kept; "
    "press Retry to write it again."
)


def lease_deadline() -> datetime:
    return timezone.now() + timedelta(seconds=settings.STREAM_LEASE_SECONDS)


def replies_reap_expired(*, now: datetime | None = None) -> list[Message]:
    """Mark every streaming reply with an expired lease as interrupted; return them."""
    now = now or timezone.now()
    stale = Q(lease_expires_at__lt=now) | Q(
        lease_expires_at__isnull=True,
        updated_at__lt=now - timedelta(seconds=settings.STREAM_LEASE_SECONDS),
    )
    ids = list(
        Message.objects.filter(stale, status=Message.Status.STREAMING).values_list("pk", flat=True)
    )
    reaped = []
    for pk in ids:
        # Re-checked in the UPDATE itself (compare-and-set): a heartbeat or the owner's own
        # final save that landed meanwhile wins. The usage record goes in the same transaction.
        with transaction.atomic():
            updated = (
                Message.objects.filter(pk=pk, status=Message.Status.STREAMING)
                .filter(stale)
                .update(
                    status=Message.Status.INTERRUPTED,
                    error=INTERRUPTED_MESSAGE,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            if updated:
                reaped.append(Message.objects.select_related("model__provider").get(pk=pk))
                teams.usage_record_for_reply(message=reaped[-1])  # a terminal state: one record
    for message in reaped:
        log.warning(
            "reply conversation=%s message=%s status=interrupted owner=%s reaped_by=%s",
            message.conversation_id,
            message.pk,
            message.owner or "-",
            PROCESS_ID,
        )
    return reaped


async def reap_once(*, now: datetime | None = None) -> int:
    """Reap expired replies and tell every socket on their conversations."""
    reaped = await database_sync_to_async(replies_reap_expired)(now=now)
    for message in reaped:
        await events.reply_end(message=message)
    return len(reaped)


async def reaper_loop() -> None:
    while True:
        # Jitter spreads the processes' sweeps apart.
        await asyncio.sleep(settings.REAPER_INTERVAL * random.uniform(0.75, 1.25))
        try:
            await reap_once()
        except asyncio.CancelledError:
            raise
        except Exception:  # a database blip must not kill the reaper for good
            log.exception("reaper sweep failed")


_tasks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task]" = (
    weakref.WeakKeyDictionary()
)


def reaper_ensure_started() -> None:
    """Start this event loop's reaper task unless it runs already (cheap: called per request)."""
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(reaper_loop(), name="reply-reaper")


def with_reaper(app):
    """ASGI wrapper: the first connection of any kind starts the process's reaper."""

    async def application(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            reaper_ensure_started()
        return await app(scope, receive, send)

    return application
