"""The websocket protocol, and the one place that talks to the channel layer.

Every frame a socket receives is built here, and every `group_send`, `group_add` and
`group_discard` is made here (memory_layer.py beside it is the embedded default's layer itself).

Groups: every socket watching a conversation (in any process) is in `conversation.<id>`; every
running reply listens on `generation.<message id>` for stop and state requests, answered on the
asker's own channel; every socket of a user is in `user.<id>` so losing access closes them all;
every read-only shared view is in `share.<share id>` too, so a revoke closes them.

Client frames (handled by consumers.ChatConsumer):
- "send" {text, model?, attachments?: [image ids], client_id?}: save a message, start a reply.
- "stop": stop the conversation's running reply, whichever process writes it.
- "state": ask for a fresh "state" frame (after a seq gap, a "layer.up", or a quiet spell).
- "regenerate" {message_id, max_output_tokens?}: Retry / Regenerate the last reply.
- "edit" {message_id, text}: change an earlier user message and write a new reply to it.
- "ping": answered with "pong" (the page sends one every ~25 s).

Server frames (seq: only "delta" carries one; every other frame is harmless when repeated):
- "state" {reply: {message_id, seq, content, reasoning, status} | null, last?, context}: sent on
  connect and on request. `reply` is the running reply's text so far and its seq; when nothing
  runs, `last` is the latest reply's final form (it may have ended while away).
- "delta" {message_id, seq, text?, reasoning?}: the next slice of the running reply. After a
  "state" the socket receives deltas with seq > the state's seq, in order, each once. A seq that
  is not last seq + 1 means frames were lost (a dropped socket, a channel-layer outage): the page
  asks for "state" and continues from it.
- "message" {message, reply, title, client_id}: a user message was saved and its reply started.
- "reply.status" {message_id, text}: "retrying (2/4)…" or a place in the provider's queue.
- "reply.end" {message_id, status, seq, message, context}: the reply's final form. Delivered at
  least once (retried until the layer takes it); render it by id.
- "reply.replaced" {old_id, reply}: Retry / Regenerate replaced a reply with a new one.
- "message.edited" {message, reply}: an edit; every message after `message` is gone.
- "error" {code, message, message_id?}: a refused frame, or (with message_id) a reply's failure.
- "layer.down" / "layer.up": this server lost / regained its channel layer (Redis). The page
  shows "reconnecting…" meanwhile and asks for "state" on "layer.up".
- "pong".
"context" is {used, window, percent, budget, cache_hit_rate}: how full the context window is.

Batch sockets (consumers.BatchConsumer, /ws/batches/<id>/; every socket watching a batch, in any
process, is in `batch.<id>`; the runner publishes from whichever worker runs it):
- client "state": ask for a fresh "batch.state"; "ping": answered with "pong".
- "batch.state" {batch, items}: sent on connect and on request. `batch` is {id, name, status,
  status_text, progress: {total, ended, counts, tokens, cost_usd, cache_share, cache_saved_usd},
  estimate, ...}; `items` every item's current form (status, answer or values, tokens, cost).
- "batch.item" {item, batch}: one item changed (started, answered, failed, cancelled), with the
  batch's progress after it. Render by item id: a repeated or late frame is harmless.
- "batch.status" {batch}: the batch started, paused, reached its budget, completed or was
  cancelled.
Batch frames are best effort (a layer outage may drop one): the page asks for "state" on
reconnect, on "layer.up" and every few seconds while the batch runs.

Shared views (consumers.SharedConsumer, /ws/shared/<share id>/; read-only; every socket on a
share, in any process, is in `share.<id>` as well as the conversation's group):
- client "state" and "ping" as above; "send", "stop", "regenerate" and "edit" are refused with
  an "error" {code: "read_only"} and change nothing.
- server frames: the conversation's frames above ("state", "delta", "message", "reply.end", …),
  so a viewer follows a reply live with the same seq promise; and "share.revoked" {message}:
  the share ended (revoked, or the conversation deleted). The socket is then closed (4404).

Publishing on the streaming path never raises into the reply: `publish` reports failure,
`deliver` retries with backoff until the layer takes the frame. Frames are encoded to JSON once
here, so a consumer forwards text without re-encoding it per token.
"""

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
import weakref

import orjson
from channels.layers import get_channel_layer
from django.conf import settings

from ..context_window import acontext_for
from ..conversations import message_to_dict

log = logging.getLogger(__name__)

# A publish that takes longer than this counts as failed (a hung Redis must not hold a reply).
PUBLISH_TIMEOUT = 2.0
# At-least-once frames: backoff between tries, and how long to keep trying.
DELIVER_BACKOFF = (0.1, 5.0)
DELIVER_GIVE_UP = 600.0
# A revoke tells open shared views for this long while the layer is down (the request waits).
SHARE_CLOSE_GIVE_UP = 5.0


def conversation_group(conversation_id: int) -> str:
    return f"conversation.{conversation_id}"


def generation_group(message_id: int) -> str:
    return f"generation.{message_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def batch_group(batch_id: int) -> str:
    return f"batch.{batch_id}"


def share_group(share_id: int) -> str:
    return f"share.{share_id}"


# ---- frames ------------------------------------------------------------------------------------


def encode(frame: dict) -> str:
    """Compact UTF-8 JSON, once per frame for every socket (orjson: a tenth of the stdlib's
    cost, and this runs per streamed frame)."""
    return orjson.dumps(frame).decode()


def frame_state(*, reply: dict | None, context: dict, last=None) -> dict:
    frame = {"type": "state", "reply": reply, "context": context}
    if reply is None:
        frame["last"] = message_to_dict(last) if last is not None else None
    return frame


def frame_delta(*, message_id: int, seq: int, text: str, reasoning: str) -> dict:
    frame: dict = {"type": "delta", "message_id": message_id, "seq": seq}
    if text:
        frame["text"] = text
    if reasoning:
        frame["reasoning"] = reasoning
    return frame


def frame_message(*, user_message, reply, title: str, client_id) -> dict:
    return {
        "type": "message",
        "message": message_to_dict(user_message),
        "reply": message_to_dict(reply),
        "title": title,
        "client_id": client_id,
    }


def frame_reply_status(*, message_id: int, text: str) -> dict:
    return {"type": "reply.status", "message_id": message_id, "text": text}


def frame_reply_end(*, message, context: dict | None) -> dict:
    """The one shape of a reply's end, whoever ends it (its generation or the reaper)."""
    return {
        "type": "reply.end",
        "message_id": message.pk,
        "status": message.status,
        "seq": message.seq,
        "message": message_to_dict(message),
        "context": context,
    }


def frame_reply_replaced(*, old_id: int, reply) -> dict:
    return {"type": "reply.replaced", "old_id": old_id, "reply": message_to_dict(reply)}


def frame_message_edited(*, message, reply) -> dict:
    return {
        "type": "message.edited",
        "message": message_to_dict(message),
        "reply": message_to_dict(reply),
    }


def frame_error(*, code: str, message: str, message_id: int | None = None) -> dict:
    frame: dict = {"type": "error", "code": code, "message": message}
    if message_id is not None:
        frame["message_id"] = message_id
    return frame


def frame_pong() -> dict:
    return {"type": "pong"}


def frame_layer(*, up: bool) -> dict:
    return {"type": "layer.up" if up else "layer.down"}


def frame_batch_state(*, state: dict) -> dict:
    return {"type": "batch.state", **state}


def frame_batch_item(*, item: dict, batch: dict) -> dict:
    return {"type": "batch.item", "item": item, "batch": batch}


def frame_batch_status(*, batch: dict) -> dict:
    return {"type": "batch.status", "batch": batch}


# ---- publishing to a conversation ------------------------------------------------------------


async def broadcast(conversation_id: int, frame: dict) -> None:
    """Send one frame to every socket on the conversation; raises when the layer fails."""
    message = {"type": "chat.frame", "text": encode(frame)}
    if frame["type"] == "delta":
        message["message_id"] = frame["message_id"]
        message["seq"] = frame["seq"]
    async with asyncio.timeout(PUBLISH_TIMEOUT):
        await get_channel_layer().group_send(conversation_group(conversation_id), message)


async def publish(conversation_id: int, frame: dict) -> bool:
    """Best effort (deltas, status lines): False when the layer failed; never raises."""
    try:
        await broadcast(conversation_id, frame)
    except Exception as exc:
        _watch().publish_failed(exc)
        return False
    return True


_deliveries: set[asyncio.Task] = set()


async def deliver(conversation_id: int, frame: dict) -> None:
    """At least once: send now (so frames keep their order while the layer is up), and when
    that fails keep retrying in the background with backoff until the layer takes it."""
    if await publish(conversation_id, frame):
        return
    task = asyncio.get_running_loop().create_task(_redeliver(conversation_id, frame))
    _deliveries.add(task)
    task.add_done_callback(_deliveries.discard)


async def _redeliver(conversation_id: int, frame: dict) -> None:
    delay, cap = DELIVER_BACKOFF
    deadline = time.monotonic() + DELIVER_GIVE_UP
    await asyncio.sleep(random.uniform(delay / 2, delay))
    while not await publish(conversation_id, frame):
        if time.monotonic() > deadline:
            log.error("gave up delivering %s to conversation %s", frame["type"], conversation_id)
            return
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(cap, delay * 2)


async def deliveries_flush(timeout: float) -> None:
    """Wait (bounded) for pending at-least-once frames: tests and shutdown."""
    if _deliveries:
        await asyncio.wait(list(_deliveries), timeout=timeout)


async def reply_end(*, message, context: dict | None = None) -> None:
    """Tell every socket on the conversation that this reply ended (at least once). `context`:
    the context meter when the caller computed it already (the generation does, in its final
    save's hop), else it is read here."""
    if context is None:
        try:
            context = await acontext_for(message.conversation_id)
        except Exception:  # a database blip: the end matters more than the meter
            log.exception("context meter for reply %s failed", message.pk)
    await deliver(message.conversation_id, frame_reply_end(message=message, context=context))


# ---- batches -----------------------------------------------------------------------------------


async def batch_publish(batch_id: int, frame: dict) -> bool:
    """Best effort: one frame to every socket watching the batch; False when the layer failed."""
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            await get_channel_layer().group_send(
                batch_group(batch_id), {"type": "batch.frame", "text": encode(frame)}
            )
    except Exception as exc:
        log.info("batch %s frame %s not published: %r", batch_id, frame["type"], exc)
        return False
    return True


async def batch_socket_join(*, socket, batch_id: int, user_id: int) -> None:
    layer = get_channel_layer()
    await layer.group_add(batch_group(batch_id), socket.channel_name)
    await layer.group_add(user_group(user_id), socket.channel_name)
    _watch().add(socket)


async def batch_socket_leave(*, socket, batch_id: int, user_id: int) -> None:
    _watch().discard(socket)
    layer = get_channel_layer()
    try:
        await layer.group_discard(batch_group(batch_id), socket.channel_name)
        await layer.group_discard(user_group(user_id), socket.channel_name)
    except Exception as exc:
        log.info("batch socket leave during a channel-layer outage: %r", exc)


# ---- sockets -----------------------------------------------------------------------------------


async def socket_join(*, socket, conversation_id: int, user_id: int) -> None:
    """Add a socket to its conversation's and its user's groups, returning once it is live.

    With Redis pub/sub a SUBSCRIBE is not confirmed when group_add returns; a probe sent through
    the group and received back proves it is, so every delta published after this returns (and
    after the state snapshot the caller reads next) reaches the socket.
    """
    layer = get_channel_layer()
    group = conversation_group(conversation_id)
    await layer.group_add(group, socket.channel_name)
    await layer.group_add(user_group(user_id), socket.channel_name)
    mailbox = _mailbox()
    await mailbox.open()
    key, echoed = mailbox.expect()
    try:
        await mailbox.join_group(group)
        try:
            async with asyncio.timeout(10):
                await layer.group_send(group, {"type": "layer.probe", "probe": key})
                await echoed
        except TimeoutError:  # a slow Redis: the page's seq-gap check still heals a lost delta
            pass
        finally:
            await mailbox.leave_group(group)
    finally:
        mailbox.forget(key)
    _watch().add(socket)


async def socket_leave(*, socket, conversation_id: int, user_id: int) -> None:
    _watch().discard(socket)
    layer = get_channel_layer()
    try:
        await layer.group_discard(conversation_group(conversation_id), socket.channel_name)
        await layer.group_discard(user_group(user_id), socket.channel_name)
        await layer.channel_discard(socket.channel_name)
    except Exception as exc:  # the layer is down: its subscriptions go with this process's
        log.info("socket leave during a channel-layer outage: %r", exc)


def session_tag(session_key: str | None) -> str:
    """A session's name on the wire (the key itself never goes through the channel layer)."""
    if not session_key:
        return ""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


async def user_sockets_close(user_id: int, *, keep_session: str | None = None) -> None:
    """Close every open socket of this user, in any process (access ended), except those of
    the session whose key is `keep_session` (the one that changed its own password)."""
    await get_channel_layer().group_send(
        user_group(user_id),
        {"type": "user.force_close", "keep_session": session_tag(keep_session)},
    )


# ---- running replies ---------------------------------------------------------------------------


async def generation_listen(message_id: int) -> str:
    """A channel of this reply's own that receives stop and state requests from any process."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(generation_group(message_id), channel)
    return channel


async def generation_receive(channel: str) -> dict:
    return await get_channel_layer().receive(channel)


async def generation_unlisten(message_id: int, channel: str) -> None:
    try:
        await get_channel_layer().group_discard(generation_group(message_id), channel)
    except Exception as exc:
        log.info("generation %s left its group during a layer outage: %r", message_id, exc)


async def request_stop(message_id: int) -> None:
    """Ask the generation writing this reply to stop, wherever it runs."""
    await get_channel_layer().group_send(generation_group(message_id), {"type": "generation.stop"})


class _Mailbox:
    """One channel per process (and event loop) on which many callers wait for their answers,
    matched by a key in the message ("request_id" or "probe"), read by one task.

    A new channel per state request or per join probe would stay subscribed in Redis for the
    life of the process: channels_redis drops a channel only when a receive on it is cancelled.
    Groups the mailbox joins for probes are counted, so concurrent joins of one group share one
    subscription and leave it when the last one is done.
    """

    def __init__(self, layer) -> None:
        self.layer = layer
        self.channel: str | None = None
        self.reader: asyncio.Task | None = None
        self.opening = asyncio.Lock()
        self.waiting: dict[str, asyncio.Future] = {}
        self.group_users: dict[str, int] = {}
        self.group_ready: dict[str, asyncio.Future] = {}

    async def open(self) -> str:
        async with self.opening:
            if self.channel is None or self.reader is None or self.reader.done():
                channel = await self.layer.new_channel()
                # Round trip first, so no answer can beat our subscription to the channel.
                await self.layer.send(channel, {"type": "probe"})
                await self.layer.receive(channel)
                self.group_users.clear()
                self.group_ready.clear()
                self.channel = channel
                self.reader = asyncio.create_task(self._read(channel))
            return self.channel

    def expect(self) -> tuple[str, asyncio.Future]:
        key = uuid.uuid4().hex
        self.waiting[key] = asyncio.get_running_loop().create_future()
        return key, self.waiting[key]

    def forget(self, key: str) -> None:
        self.waiting.pop(key, None)

    async def join_group(self, group: str) -> None:
        self.group_users[group] = self.group_users.get(group, 0) + 1
        ready = self.group_ready.get(group)
        if ready is None:
            ready = self.group_ready[group] = asyncio.get_running_loop().create_future()
            try:
                await self.layer.group_add(group, self.channel)
            except BaseException as exc:
                self.group_ready.pop(group, None)
                ready.set_exception(exc)
                ready.exception()  # retrieved here: the caller sees exc itself
                raise
            ready.set_result(None)
        else:
            await asyncio.shield(ready)

    async def leave_group(self, group: str) -> None:
        users = self.group_users.get(group, 0) - 1
        if users > 0:
            self.group_users[group] = users
            return
        self.group_users.pop(group, None)
        if self.group_ready.pop(group, None) is not None:
            await self.layer.group_discard(group, self.channel)

    async def _read(self, channel: str) -> None:
        try:
            while True:
                message = await self.layer.receive(channel)
                key = message.get("request_id") or message.get("probe") or ""
                answer = self.waiting.get(key)
                if answer is not None and not answer.done():
                    answer.set_result(message)
        except BaseException as exc:
            # The layer failed (or the loop is closing): the next caller opens a new channel;
            # those waiting now fall back (state from the checkpoint, join without its probe).
            if self.channel == channel:
                self.channel = None
            for answer in self.waiting.values():
                if not answer.done():
                    answer.set_exception(RuntimeError(f"mailbox closed: {exc!r}"))
            if isinstance(exc, asyncio.CancelledError):
                raise


# One mailbox per event loop and layer (its reader task and lock belong to one loop).
_mailboxes: "weakref.WeakKeyDictionary[object, _Mailbox]" = weakref.WeakKeyDictionary()


def _mailbox() -> _Mailbox:
    layer, loop = get_channel_layer(), asyncio.get_running_loop()
    mailbox = _mailboxes.get(loop)
    if mailbox is None or mailbox.layer is not layer:
        mailbox = _mailboxes[loop] = _Mailbox(layer)
    return mailbox


async def ask_state(message_id: int, *, timeout: float) -> dict | None:
    """Ask the generation writing this reply (any process) for its state; None on no answer."""
    mailbox = _mailbox()
    key = ""
    try:
        async with asyncio.timeout(timeout):
            channel = await mailbox.open()
            key, answer = mailbox.expect()
            await mailbox.layer.group_send(
                generation_group(message_id),
                {"type": "generation.state", "reply_to": channel, "request_id": key},
            )
            return (await answer).get("state")
    except TimeoutError:
        return None
    except Exception as exc:  # the layer is down: the caller falls back to the checkpoint
        log.info("state request for reply %s failed: %r", message_id, exc)
        return None
    finally:
        mailbox.forget(key)


async def answer_state(reply_to: str, state: dict, *, request_id: str = "") -> None:
    try:
        await get_channel_layer().send(
            reply_to, {"type": "generation.state_reply", "state": state, "request_id": request_id}
        )
    except Exception as exc:
        log.info("could not answer a state request: %r", exc)


class _Pinger:
    """Round trips on one channel per process, one at a time: a new channel per ping would stay
    subscribed in Redis for the life of the process."""

    def __init__(self) -> None:
        self.channel: str | None = None
        self.lock = asyncio.Lock()
        self.count = 0

    async def ping(self) -> None:
        layer = get_channel_layer()
        async with self.lock:
            if self.channel is None:
                self.channel = await layer.new_channel()
            self.count += 1
            try:
                await layer.send(self.channel, {"type": "health.ping", "n": self.count})
                while (await layer.receive(self.channel)).get("n") != self.count:
                    pass  # the answer to an earlier ping
            except BaseException:
                # A cancelled receive unsubscribes the channel (channels_redis): start afresh.
                self.channel = None
                raise


_pingers: "weakref.WeakKeyDictionary[object, _Pinger]" = weakref.WeakKeyDictionary()


async def layer_ping(*, timeout: float) -> None:
    """A round trip through the channel layer (raises when it is down or too slow)."""
    layer = get_channel_layer()
    pinger = _pingers.get(layer)
    if pinger is None:
        pinger = _pingers[layer] = _Pinger()
    async with asyncio.timeout(timeout):
        await pinger.ping()


# ---- is the layer up? --------------------------------------------------------------------------


class _LayerWatch:
    """This process's view of its channel layer, told to its own sockets directly.

    While any socket is open, a round trip through the layer every LAYER_WATCH_INTERVAL (and
    any failed publish at once) decides whether the layer is up; on each change every local
    socket gets "layer.down" or "layer.up", sent straight to it since the layer cannot carry it.
    """

    def __init__(self) -> None:
        self.sockets: weakref.WeakSet = weakref.WeakSet()
        self.up = True
        self.task: asyncio.Task | None = None

    def add(self, socket) -> None:
        self.sockets.add(socket)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="layer-watch")

    def discard(self, socket) -> None:
        self.sockets.discard(socket)

    def publish_failed(self, exc: Exception) -> None:
        if self.up:
            log.warning("channel layer publish failed: %r; frames are held and retried", exc)
            self._set(up=False)
            if self.task is None or self.task.done():
                self.task = asyncio.get_running_loop().create_task(self._run(), name="layer-watch")

    def _set(self, *, up: bool) -> None:
        global _watches_down
        if up == self.up:
            return
        self.up = up
        _watches_down += -1 if up else 1
        if up:
            log.warning("channel layer is back")
        text = encode(frame_layer(up=up))
        for socket in list(self.sockets):
            asyncio.get_running_loop().create_task(_send_quietly(socket, text))

    async def _run(self) -> None:
        interval = settings.LAYER_WATCH_INTERVAL
        while self.sockets or not self.up:
            await asyncio.sleep(interval if self.up else interval / 2)
            try:
                await layer_ping(timeout=interval)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # this watch is being stopped
                # A CancelledError from inside the layer's client (a lost connection) is a
                # failed round trip like any other, not the end of the watch.
                self._set(up=False)
            except Exception:
                self._set(up=False)
            else:
                self._set(up=True)

    def heard(self) -> None:
        """A message for a local socket came through the layer: it is up again, whatever the
        next round trip says (a page is never left showing "reconnecting" while frames flow)."""
        if not self.up:
            self._set(up=True)


async def _send_quietly(socket, text: str) -> None:
    with contextlib.suppress(Exception):  # the socket is closing: nothing to tell
        await socket.send(text_data=text)


_watches: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LayerWatch]" = (
    weakref.WeakKeyDictionary()
)
# How many watches (one per event loop) see their layer down: layer_heard runs for every frame
# every socket receives, and while this is 0 it reads one global and returns.
_watches_down = 0


def _watch() -> _LayerWatch:
    loop = asyncio.get_running_loop()
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _LayerWatch()
    return watch


def layer_is_up() -> bool:
    return _watch().up


def layer_heard() -> None:
    """Called for every frame a local socket receives through the layer."""
    if not _watches_down:
        return
    watch = _watches.get(asyncio.get_running_loop())
    if watch is not None and not watch.up:
        watch.heard()


# ---- shared views (issue 16) -------------------------------------------------------------------


def frame_share_revoked() -> dict:
    return {
        "type": "share.revoked",
        "message": "This conversation is no longer shared with you.",
    }


async def share_socket_join(*, socket, share_id: int, conversation_id: int, user_id: int) -> None:
    """A read-only viewer: the conversation's frames (socket_join, with its probe) and the
    share's own group, through which a revoke reaches it in any process."""
    await get_channel_layer().group_add(share_group(share_id), socket.channel_name)
    await socket_join(socket=socket, conversation_id=conversation_id, user_id=user_id)


async def share_socket_leave(*, socket, share_id: int, conversation_id: int, user_id: int) -> None:
    try:
        await get_channel_layer().group_discard(share_group(share_id), socket.channel_name)
    except Exception as exc:
        log.info("shared socket leave during a channel-layer outage: %r", exc)
    # Last: it also unsubscribes the socket's own channel.
    await socket_leave(socket=socket, conversation_id=conversation_id, user_id=user_id)


async def share_sockets_close(share_id: int) -> None:
    """Close every open view of this share, in any process (revoked). Retried like `deliver`
    while the layer is down; a view that still misses it re-checks access on its next state."""
    delay, cap = DELIVER_BACKOFF
    deadline = time.monotonic() + SHARE_CLOSE_GIVE_UP
    while True:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await get_channel_layer().group_send(
                    share_group(share_id), {"type": "share.revoked"}
                )
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                log.error("could not tell share %s's views it was revoked: %r", share_id, exc)
                return
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(cap, delay * 2)
