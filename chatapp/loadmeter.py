"""How far behind this process's event loop is running, to size the streaming coalescing window.

A short timer is scheduled over and over; how late it fires (smoothed) is the loop's lag. An idle
loop fires it on time, so a reply's deltas go out one frame per arrival; a loop busy relaying
hundreds of streams fires it late, and the flusher then waits a little between frames so each
frame carries more tokens (fewer frames, less work per token) instead of falling further behind.
"""

import asyncio
import weakref

from django.conf import settings

PERIOD = 0.02  # seconds between lag samples: 50 wake-ups a second, negligible
SMOOTHING = 0.3  # weight of the newest sample in the running average
IDLE_LAG = 0.002  # below this the loop counts as free: no wait between frames
WINDOW_PER_LAG = 2.0  # the wait between frames, as a multiple of the measured lag


class _Meter:
    def __init__(self) -> None:
        self.lag = 0.0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(PERIOD)
            late = max(0.0, loop.time() - started - PERIOD)
            self.lag += SMOOTHING * (late - self.lag)


_meters: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Meter]" = (
    weakref.WeakKeyDictionary()
)


# The last loop asked about and its meter: a process has one loop, and this is read before every
# frame of every reply, so the common case skips the weak-keyed lookup.
_last: tuple[asyncio.AbstractEventLoop | None, _Meter | None] = (None, None)


def loop_lag() -> float:
    """The running loop's smoothed lag in seconds (starts measuring on first use)."""
    global _last
    loop = asyncio.get_running_loop()
    cached_loop, meter = _last
    if cached_loop is not loop or meter is None or meter.task is None or meter.task.done():
        meter = _meters.get(loop)
        if meter is None:
            meter = _meters[loop] = _Meter()
        if meter.task is None or meter.task.done():
            meter.task = loop.create_task(meter._run(), name="loop-lag-meter")
        _last = (loop, meter)
    return meter.lag


def coalesce_window() -> float:
    """Seconds a reply waits after sending a frame before sending the next (0: the next turn of
    the loop), growing with load up to STREAM_FLUSH_INTERVAL."""
    lag = loop_lag()
    if lag < IDLE_LAG:
        return 0.0
    return min(settings.STREAM_FLUSH_INTERVAL, lag * WINDOW_PER_LAG)
