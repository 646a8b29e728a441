"""What /healthz reports: can this process reach the database and the channel layer?"""

import asyncio

from asgiref.sync import sync_to_async
from django.db import connection

from . import events

CHECK_TIMEOUT = 3.0


def _database_ok() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()  # a probe every few seconds must not pile up connections


async def health_status() -> dict[str, str]:
    """{"database": "ok" | "error: ...", "channel_layer": ...}; never raises."""
    status = {}
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await sync_to_async(_database_ok, thread_sensitive=False)()
        status["database"] = "ok"
    except Exception as exc:  # report, do not raise: this is what the probe reads
        status["database"] = f"error: {exc.__class__.__name__}"
    try:
        await events.layer_ping(timeout=CHECK_TIMEOUT)
        status["channel_layer"] = "ok"
    except Exception as exc:
        status["channel_layer"] = f"error: {exc.__class__.__name__}"
    return status
