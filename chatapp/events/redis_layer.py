"""The production shape's channel layer: channels_redis's pub/sub layer with concurrent publishes.

channels_redis sends every PUBLISH of a process through one lock per Redis host, so each frame
waits for the round trip of every frame before it, and a socket's SUBSCRIBE (its join) waits
behind all of them: under load, new sockets timed out before they got their state. Publishing
needs no lock (redis-py hands concurrent commands separate pooled connections); subscriptions
keep theirs. A socket's channel is unsubscribed when it leaves (`channel_discard`). Frames from one task stay in order, since each publish is awaited before the next.
"""

import asyncio

from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _wrap_close, decode_hosts

# redis-py's asyncio pool (8.x, as pinned) holds at most 100 connections by default and raises
# MaxConnectionsError past that instead of waiting: at 200 streams the publishes of one process
# overran it, every overrun counted as a layer failure and its delta was dropped. Publishes wait
# for one of these slots instead (the pool keeps room for the subscriber and the rest).
PUBLISH_SLOTS = 64


class _ShardConnection(RedisSingleShardConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._publish_slots = asyncio.Semaphore(PUBLISH_SLOTS)

    async def publish(self, channel, message):
        redis = self._redis
        if redis is None:
            async with self._lock:
                self._ensure_redis()
                redis = self._redis
        async with self._publish_slots:
            await redis.publish(channel, message)


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts=None, *args, **kwargs) -> None:
        super().__init__(hosts, *args, **kwargs)
        self._shards = [_ShardConnection(host, self) for host in decode_hosts(hosts)]

    async def channel_discard(self, channel: str) -> None:
        if self.channels.pop(channel, None) is not None:
            await self._get_shard(channel).unsubscribe(channel)


class RedisLayer(RedisPubSubChannelLayer):
    async def channel_discard(self, channel: str) -> None:
        """Unsubscribe a socket's channel when it leaves.

        channels_redis unsubscribes a channel only when a receive on it is cancelled; Channels
        cancels its consumer's pending receive at the end, but when a frame for the socket
        arrives together with the disconnect that receive has already finished, nothing is
        cancelled, and the subscription stays in Redis for the life of the process (seen: about
        one in three sockets closed during a streaming reply).
        """
        await self._get_layer().channel_discard(channel)

    def _get_layer(self):
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
            return layer
