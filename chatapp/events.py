"""The one place that talks to the channel layer's groups.

Every socket watching a conversation (in any process) is in `conversation.<id>`; every running
reply listens on `generation.<message id>` for a stop request; every socket of a user is in
`user.<id>` so deactivation can close them all. Events for sockets are encoded to
JSON once here, so each consumer forwards text without re-encoding it per token.
"""

import json

from channels.layers import get_channel_layer


def conversation_group(conversation_id: int) -> str:
    return f"conversation.{conversation_id}"


def generation_group(message_id: int) -> str:
    return f"generation.{message_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


async def broadcast(conversation_id: int, event: dict) -> None:
    """Send one client frame to every socket on the conversation."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    await get_channel_layer().group_send(
        conversation_group(conversation_id), {"type": "chat.frame", "text": text}
    )


async def request_stop(message_id: int) -> None:
    """Ask the generation writing this reply to stop, wherever it runs."""
    await get_channel_layer().group_send(generation_group(message_id), {"type": "generation.stop"})


async def user_sockets_close(user_id: int) -> None:
    """Close every open socket of this user, in any process (deactivation)."""
    await get_channel_layer().group_send(user_group(user_id), {"type": "user.force_close"})
