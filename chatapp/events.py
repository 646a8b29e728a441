"""The one place that talks to the channel layer's groups.

Every socket watching a conversation (in any process) is in `conversation.<id>`; every running
reply listens on `generation.<message id>` for a stop request and for state requests, which it
answers on the asker's own channel; every socket of a user is in `user.<id>` so deactivation can
close them all. Events for sockets are encoded to JSON once here, so each consumer forwards text
without re-encoding it per token; a delta also carries its message id and seq outside the text,
so a consumer can drop what its snapshot already holds without parsing.
"""

import asyncio
import json

from channels.layers import get_channel_layer


def conversation_group(conversation_id: int) -> str:
    return f"conversation.{conversation_id}"


def generation_group(message_id: int) -> str:
    return f"generation.{message_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


async def conversation_join(conversation_id: int, channel: str) -> None:
    """Add a socket's channel to the conversation's group, returning once it is live.

    With Redis pub/sub a SUBSCRIBE is not confirmed when group_add returns; a probe sent through
    the group and received back proves it is, so every delta published after this returns (and
    after the state snapshot the caller reads next) reaches the socket.
    """
    layer = get_channel_layer()
    group = conversation_group(conversation_id)
    await layer.group_add(group, channel)
    probe = await layer.new_channel()
    await layer.group_add(group, probe)
    try:
        async with asyncio.timeout(10):
            await layer.group_send(group, {"type": "layer.probe", "probe": probe})
            while (await layer.receive(probe)).get("probe") != probe:
                pass
    except TimeoutError:  # a slow Redis: the page's seq-gap check still heals a lost delta
        pass
    finally:
        await layer.group_discard(group, probe)


async def broadcast(conversation_id: int, event: dict) -> None:
    """Send one client frame to every socket on the conversation."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    message = {"type": "chat.frame", "text": text}
    if event.get("type") == "delta":
        message["message_id"] = event["message_id"]
        message["seq"] = event["seq"]
    await get_channel_layer().group_send(conversation_group(conversation_id), message)


async def request_stop(message_id: int) -> None:
    """Ask the generation writing this reply to stop, wherever it runs."""
    await get_channel_layer().group_send(generation_group(message_id), {"type": "generation.stop"})


async def user_sockets_close(user_id: int) -> None:
    """Close every open socket of this user, in any process (deactivation)."""
    await get_channel_layer().group_send(user_group(user_id), {"type": "user.force_close"})


async def ask_state(message_id: int, *, timeout: float) -> dict | None:
    """Ask the generation writing this reply (any process) for its state; None on no answer."""
    layer = get_channel_layer()
    try:
        async with asyncio.timeout(timeout):
            reply_to = await layer.new_channel()
            # Round trip first, so the answer cannot beat our subscription to reply_to.
            await layer.send(reply_to, {"type": "probe"})
            await layer.receive(reply_to)
            await layer.group_send(
                generation_group(message_id), {"type": "generation.state", "reply_to": reply_to}
            )
            answer = await layer.receive(reply_to)
    except TimeoutError:
        return None
    return answer.get("state")


async def answer_state(reply_to: str, state: dict) -> None:
    await get_channel_layer().send(reply_to, {"type": "generation.state_reply", "state": state})


async def layer_ping(*, timeout: float) -> None:
    """A round trip through the channel layer (raises when it is down or too slow)."""
    layer = get_channel_layer()
    async with asyncio.timeout(timeout):
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "health.ping"})
        await layer.receive(channel)
