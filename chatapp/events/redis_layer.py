"""The production shape's channel layer: channels_redis's pub/sub layer with concurrent publishes.

channels_redis sends every PUBLISH of a process through one lock per Redis host, so each frame
waits for the round trip of every frame before it, and a socket's SUBSCRIBE (its join) waits
behind all of them: under load, new sockets timed out before they got their state. Publishing
needs no lock (redis-py hands concurrent commands separate pooled connections); subscriptions
keep theirs. Frames from one task stay in order, since each publish is awaited before the next.
"""

import asyncio

from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _wrap_close, decode_hosts


class _ShardConnection(RedisSingleShardConnection):
    async def publish(self, channel, message):
        redis = self._redis
        if redis is None:
            async with self._lock:
                self._ensure_redis()
                redis = self._redis
        await redis.publish(channel, message)


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts=None, *args, **kwargs) -> None:
        super().__init__(hosts, *args, **kwargs)
        self._shards = [_ShardConnection(host, self) for host in decode_hosts(hosts)]


class RedisLayer(RedisPubSubChannelLayer):
    def _get_layer(self):
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
            return layer
