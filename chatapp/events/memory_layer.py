"""The embedded default's channel layer: Channels' in-memory layer without its per-call sweep.

channels.layers.InMemoryChannelLayer scans every channel and every group membership for expired
entries on each receive and each group_send, and starts a task per recipient of a group send.
With a few hundred sockets streaming, that sweep was the process's largest single cost (py-spy,
200 streams: 22 % of samples in _clean_expired). This layer sweeps at most once per second and
sends to a group's members directly, without Channels' deepcopy per member for flat messages of
strings and numbers; capacity, expiry and group expiry behave as before.
"""

import asyncio
import contextlib
import time

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

_IMMUTABLE = (str, int, float, bool, type(None))


class LocalInMemoryChannelLayer(InMemoryChannelLayer):
    sweep_interval = 1.0  # seconds; expiry is measured in minutes, so this loses nothing

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            super()._clean_expired()
            # receive keeps a channel's queue between messages: drop the idle ones here.
            for channel, queue in list(self.channels.items()):
                if queue.empty() and not queue._getters:
                    del self.channels[channel]

    async def receive(self, channel: str) -> dict:
        """As Channels' receive, but the channel's queue stays between messages: Channels drops
        it whenever it runs empty and makes a new one (capacity lookup included) for the next
        message, which for a socket receiving a reply's frames was once per frame."""
        self.require_valid_channel_name(channel)
        self._clean_expired()
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        _, message = await queue.get()
        return message

    async def group_send(self, group: str, message: dict) -> None:
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        members = list(self.groups.get(group, ()))
        if not all(isinstance(v, _IMMUTABLE) for v in message.values()):
            for channel in members:
                # As in Channels, a full channel drops the message; send never suspends.
                with contextlib.suppress(ChannelFull):
                    await self.send(channel, message)
            return
        # A flat message of strings and numbers (every streamed frame): a shallow copy per
        # member is as safe as Channels' deepcopy, at a fraction of its cost per token.
        expires = time.time() + self.expiry
        for channel in members:
            queue = self.channels.get(channel)
            if queue is None:
                queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((expires, dict(message)))

    async def channel_discard(self, channel: str) -> None:
        """Forget a socket's channel when it leaves (see RedisLayer.channel_discard)."""
        self.channels.pop(channel, None)
        self._remove_from_groups(channel)
