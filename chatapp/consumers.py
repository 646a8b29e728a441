"""Websocket transport for one conversation: authenticate, parse, validate, delegate.

The protocol (client frames, server frames, which carry a seq) is documented once, in
chatapp/events; every frame is built there and every channel-layer call is made there.
"""

import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from . import batches, events, generation
from .access import (
    batch_get_for_user,
    conversation_get_for_user,
    model_get_for_user,
    share_get_for_viewer,
)
from .conversations import conversation_set_model
from .dbreads import read_off_loop
from .errors import ClientError
from .models import Batch

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 100_000
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_GONE = 4404  # a shared view whose share was revoked: the page stops reconnecting
CLOSE_TRY_AGAIN = 1013  # the channel layer is down: the page reconnects with backoff


def _kept(scope, event: dict) -> bool:
    """A "close this user's sockets" event spares the session that asked for it (a password
    changed from this browser keeps this browser's sockets)."""
    keep = event.get("keep_session")
    session = scope.get("session")
    return bool(keep) and session is not None and keep == events.session_tag(session.session_key)


class ChatConsumer(AsyncJsonWebsocketConsumer):
    conversation = None
    # Seq of the last "state" this socket was sent, per reply: deltas up to it are in the snapshot.
    attached: dict[int, int]

    # ---- socket hooks ------------------------------------------------------------------------

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            # On the read threads: opening a socket does not queue behind other sockets' sends.
            self.conversation = await read_off_loop(conversation_get_for_user)(
                user, self.scope["url_route"]["kwargs"]["conversation_id"]
            )
        except Http404:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.attached = {}
        # Accept at once: under load the join below waits on the channel layer, and a browser
        # (or proxy) gives up on a handshake that takes seconds. Nothing is missed meanwhile:
        # the state is read after the join, so it holds every delta sent before it.
        await self.accept()
        # Join before reading the state: every delta after the snapshot then reaches us (deltas
        # that arrive meanwhile wait in our channel until send_state returns). The user's group
        # lets losing access close every socket.
        try:
            await events.socket_join(
                socket=self, conversation_id=self.conversation.pk, user_id=user.pk
            )
        except Exception as exc:  # the channel layer is down: the page tries again shortly
            log.warning("socket closed, channel layer unavailable: %r", exc)
            self.conversation = None
            await self.close(code=CLOSE_TRY_AGAIN)
            return
        await self.send_state()

    async def disconnect(self, code: int) -> None:
        # The reply goes on without us: generation is not tied to the socket.
        if self.conversation is not None:
            await events.socket_leave(
                socket=self, conversation_id=self.conversation.pk, user_id=self.scope["user"].pk
            )

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        try:
            if text_data is None:
                raise ClientError("bad_frame", "Frames must be JSON text.")
            try:
                content = json.loads(text_data)
            except ValueError:
                raise ClientError("bad_frame", "That frame is not valid JSON.") from None
            if not isinstance(content, dict):
                raise ClientError("bad_frame", "A frame must be a JSON object with a type.")
            await self.receive_json(content)
        except ClientError as exc:
            await self.send_json(events.frame_error(code=exc.code, message=exc.message))
        except Http404:  # access lost while connected (e.g. deactivated): say so, hang up
            await self.send_json(
                events.frame_error(code="forbidden", message="You no longer have access.")
            )
            await self.close(code=CLOSE_FORBIDDEN)
        except Exception:
            log.exception("websocket frame failed")
            await self.send_json(
                events.frame_error(code="server_error", message="Something went wrong.")
            )

    async def receive_json(self, content: dict, **kwargs) -> None:
        handler = {
            "send": self.handle_send,
            "stop": self.handle_stop,
            "state": self.handle_state,
            "regenerate": self.handle_regenerate,
            "ping": self.handle_ping,
            "edit": self.handle_edit,
        }.get(content.get("type"))
        if handler is None:
            raise ClientError("unknown_type", f"Unknown frame type {content.get('type')!r}.")
        await handler(content)

    # ---- client commands ---------------------------------------------------------------------

    async def handle_send(self, content: dict) -> None:
        text = content.get("text")
        attachment_ids = content.get("attachments") or []
        if not isinstance(attachment_ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in attachment_ids
        ):
            raise ClientError("bad_frame", "attachments must be a list of image ids.")
        if not isinstance(text, str) or (not text.strip() and not attachment_ids):
            raise ClientError("empty", "Type a message or attach an image first.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise ClientError(
                "too_long", f"Messages are limited to {MAX_MESSAGE_CHARS:,} characters."
            )
        user = self.scope["user"]
        # Re-read through the access getter: the conversation (and the user) may have changed.
        conversation = await database_sync_to_async(conversation_get_for_user)(
            user, self.conversation.pk
        )
        if content.get("model") is not None:
            model = await database_sync_to_async(model_get_for_user)(user, content["model"])
            await database_sync_to_async(conversation_set_model)(
                conversation=conversation, model=model
            )
        user_message, reply = await generation.reply_send(
            conversation=conversation, text=text, user=user, attachment_ids=attachment_ids
        )
        await events.deliver(
            conversation.pk,
            events.frame_message(
                user_message=user_message,
                reply=reply,
                title=conversation.title,
                client_id=content.get("client_id"),
            ),
        )

    async def handle_regenerate(self, content: dict) -> None:
        reply_id = content.get("message_id")
        if not isinstance(reply_id, int):
            raise ClientError("bad_frame", "Say which reply to regenerate (message_id).")
        conversation = await database_sync_to_async(conversation_get_for_user)(
            self.scope["user"], self.conversation.pk
        )
        budget = content.get("max_output_tokens")  # the "retry with a larger budget" button
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)):
            raise ClientError("bad_budget", "max_output_tokens must be a whole number.")
        reply = await generation.reply_regenerate(
            conversation=conversation, reply_id=reply_id, max_output_tokens=budget
        )
        await events.deliver(
            conversation.pk, events.frame_reply_replaced(old_id=reply_id, reply=reply)
        )

    async def handle_edit(self, content: dict) -> None:
        message_id, text = content.get("message_id"), content.get("text")
        if not isinstance(message_id, int):
            raise ClientError("bad_frame", "Say which message to edit (message_id).")
        if not isinstance(text, str) or not text.strip():
            raise ClientError("empty", "Type a message first.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise ClientError(
                "too_long", f"Messages are limited to {MAX_MESSAGE_CHARS:,} characters."
            )
        conversation = await database_sync_to_async(conversation_get_for_user)(
            self.scope["user"], self.conversation.pk
        )
        message, reply = await generation.reply_edit(
            conversation=conversation, message_id=message_id, text=text
        )
        await events.deliver(
            conversation.pk, events.frame_message_edited(message=message, reply=reply)
        )

    async def handle_stop(self, content: dict) -> None:
        if not await generation.reply_stop(conversation=self.conversation):
            raise ClientError("not_streaming", "No reply is being written.")

    async def handle_state(self, content: dict) -> None:
        await self.send_state()

    async def handle_ping(self, content: dict) -> None:
        await self.send_json(events.frame_pong())

    async def send_state(self) -> None:
        # A reply may have ended while this socket was away: `last` is then its final form.
        state, last, context = await generation.socket_state(conversation=self.conversation)
        if state is not None:
            self.attached[state["message_id"]] = state["seq"]
        await self.send_json(events.frame_state(reply=state, context=context, last=last))

    # ---- channel-layer events ----------------------------------------------------------------

    async def dispatch(self, message: dict) -> None:
        # Channels runs close_old_connections in the one database thread before every handler.
        # Forwarding a frame touches no database, and that hop per frame per socket queued every
        # stream behind the database work (measured: p50 added latency 2.6 s at 50 streams).
        if message["type"] == "chat.frame":
            await self.chat_frame(message)
        else:
            await super().dispatch(message)

    async def chat_frame(self, event: dict) -> None:
        events.layer_heard()
        seq = event.get("seq")
        if seq is not None and seq <= self.attached.get(event["message_id"], 0):
            return  # already in the snapshot this socket was sent
        await self.send(text_data=event["text"])

    async def user_force_close(self, event: dict) -> None:
        if not _kept(self.scope, event):
            await self.close(code=CLOSE_UNAUTHENTICATED)

    async def layer_probe(self, event: dict) -> None:
        """Another socket joining this conversation checked its subscription: nothing to do."""


class BatchConsumer(AsyncJsonWebsocketConsumer):
    """Live progress of one batch: its owner's sockets get "batch.state" on connect and the
    runner's "batch.item" / "batch.status" frames (protocol in chatapp/events)."""

    batch_id: int | None = None

    # ---- socket hooks ------------------------------------------------------------------------

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            batch = await database_sync_to_async(batch_get_for_user)(
                user, self.scope["url_route"]["kwargs"]["batch_id"]
            )
        except Http404:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        try:
            await events.batch_socket_join(socket=self, batch_id=batch.pk, user_id=user.pk)
        except Exception as exc:
            log.warning("batch socket refused, channel layer unavailable: %r", exc)
            await self.close(code=CLOSE_TRY_AGAIN)
            return
        self.batch_id = batch.pk
        await self.accept()
        await self.send_state()

    async def disconnect(self, code: int) -> None:
        if self.batch_id is not None:
            await events.batch_socket_leave(
                socket=self, batch_id=self.batch_id, user_id=self.scope["user"].pk
            )

    async def receive_json(self, content: dict, **kwargs) -> None:
        handler = {"state": self.handle_state, "ping": self.handle_ping}.get(
            content.get("type") if isinstance(content, dict) else None
        )
        if handler is None:
            await self.send_json(
                events.frame_error(code="unknown_type", message="Unknown frame type.")
            )
            return
        await handler(content)

    # ---- client commands ---------------------------------------------------------------------

    async def handle_state(self, content: dict) -> None:
        await self.send_state()

    async def handle_ping(self, content: dict) -> None:
        await self.send_json(events.frame_pong())

    async def send_state(self) -> None:
        try:
            await database_sync_to_async(batch_get_for_user)(self.scope["user"], self.batch_id)
            state = await database_sync_to_async(batches.batch_state)(batch_id=self.batch_id)
        except (Http404, Batch.DoesNotExist):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.send_json(events.frame_batch_state(state=state))

    # ---- channel-layer events ----------------------------------------------------------------

    async def batch_frame(self, event: dict) -> None:
        await self.send(text_data=event["text"])

    async def user_force_close(self, event: dict) -> None:
        if not _kept(self.scope, event):
            await self.close(code=CLOSE_UNAUTHENTICATED)


# ---- shared views (issue 16) -------------------------------------------------------------------

READ_ONLY = (
    "This is a shared conversation: it is read-only. "
    "Use “Continue as my copy” to carry on in a conversation of your own."
)


class SharedConsumer(ChatConsumer):
    """A read-only view of a conversation through a share (/ws/shared/<share id>/).

    The same frames as the owner's socket (state on connect, deltas with their seq, reply ends),
    so a reply is followed live; every command that would change anything is refused. Access is
    access.share_get_for_viewer, checked on connect and again on every "state"; a revoke
    reaches the socket through the share's group (any process) and closes it.
    """

    share_id: int | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            share = await database_sync_to_async(share_get_for_viewer)(
                user, self.scope["url_route"]["kwargs"]["share_id"]
            )
        except Http404:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.attached = {}
        await self.accept()
        try:
            await events.share_socket_join(
                socket=self,
                share_id=share.pk,
                conversation_id=share.conversation_id,
                user_id=user.pk,
            )
        except Exception as exc:
            log.warning("shared socket closed, channel layer unavailable: %r", exc)
            await self.close(code=CLOSE_TRY_AGAIN)
            return
        self.share_id = share.pk
        self.conversation = share.conversation
        # Revoked between the check and the join: the revoke's event may have gone before we
        # were in the group, so look once more now that any later one will reach us.
        if not await self._still_shared():
            return
        await self.send_state()

    async def disconnect(self, code: int) -> None:
        if self.share_id is not None:
            await events.share_socket_leave(
                socket=self,
                share_id=self.share_id,
                conversation_id=self.conversation.pk,
                user_id=self.scope["user"].pk,
            )

    async def receive_json(self, content: dict, **kwargs) -> None:
        kind = content.get("type")
        handler = {"state": self.handle_state, "ping": self.handle_ping}.get(kind)
        if handler is None:
            if kind in ("send", "stop", "regenerate", "edit"):
                raise ClientError("read_only", READ_ONLY)
            raise ClientError("unknown_type", f"Unknown frame type {kind!r}.")
        await handler(content)

    async def handle_state(self, content: dict) -> None:
        if await self._still_shared():
            await self.send_state()

    async def _still_shared(self) -> bool:
        try:
            await database_sync_to_async(share_get_for_viewer)(self.scope["user"], self.share_id)
        except Http404:
            await self.share_revoked({})
            return False
        return True

    async def share_revoked(self, event: dict) -> None:
        await self.send_json(events.frame_share_revoked())
        await self.close(code=CLOSE_GONE)
