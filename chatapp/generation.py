"""The life of one assistant reply: the only module that talks to both a provider and the
channel layer.

A reply runs as its own asyncio task, not tied to any socket: closing the tab does not stop it.
Deltas are coalesced into one frame per STREAM_FLUSH_INTERVAL and numbered (seq) so a socket that
(re)attaches gets the text so far with its seq, then live deltas from seq+1. The database is
written at the start, at most once per STREAM_CHECKPOINT_INTERVAL, and at the end; never per
token.

Crash safety: the reply's Message holds a lease (owner process, expiry) that the checkpointer
renews as a heartbeat; if this process dies, any process's reaper (reaper.py) marks the reply
interrupted once the lease runs out. A socket on another process gets the running reply's state
by asking over the channel layer (events.ask_state); this task answers from memory.

`Generation._save_final` is the one place a running reply reaches its terminal state (complete,
cancelled, error, or interrupted at shutdown); the reaper covers replies whose process died. The
two can never both end a reply: each writes the terminal status only while the row is still
streaming (and, for the owner, still its own), and the usage record goes in the same transaction.

Channel-layer faults never end a reply: a failed publish is logged and the frame's text counts as
sent (sockets see the seq gap, or "layer.up", and ask for state); checkpoints keep saving what
the provider sent, so a crash during an outage loses at most one checkpoint interval.
"""

import asyncio
import logging
import random
import time

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from . import checkpoints, context_window, events, loadmeter, model_catalog, reaper, teams
from .conversations import (
    earlier_messages,
    history_for_request,
    last_reply,
    turn_edit,
    turn_regenerate,
    turn_start,
)
from .dbreads import read_off_loop
from .errors import ClientError
from .models import Conversation, Message
from .pricing import reply_cost
from .providers import errors as provider_errors
from .providers.base import ChatRequest, ProviderClient, ProviderError, Usage
from .providers.gate import GatedClient, ordinal
from .providers.openai_compat import merge_reasoning_details
from .providers.registry import client_for

log = logging.getLogger(__name__)

# Replies running in this process, by message id (for state snapshots and shutdown).
RUNNING: dict[int, "Generation"] = {}

# A provider asking us to wait longer than this is not retried: the user would stare at a spinner.
MAX_RETRY_AFTER = 60.0

STALLED_MESSAGE = "The model stopped sending data; the reply was ended."

THINKING_BUDGET_MESSAGE = (
    "The model used its whole output budget while thinking, before writing an answer. "
    "Retry with a larger output budget."
)


class _StallGuard:
    """Cancels the current task when no item arrived for `seconds`. One timer per stream,
    moved only when it fires: an asyncio.timeout around every chunk (a timer handle made and
    cancelled per token) cost about 7 % of the process at 200 streams (py-spy)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._fired = False
        self._handle = self._loop.call_at(self._last + seconds, self._check)

    def fed(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self.seconds
        if self._loop.time() >= due:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def tripped(self) -> bool:
        """Whether the CancelledError being handled is this guard's (it is then withdrawn,
        as asyncio.timeout does); False for any other cancel (a stop, a shutdown)."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        self._handle.cancel()


class Generation:
    def __init__(
        self,
        *,
        message_id: int,
        conversation_id: int,
        client: ProviderClient,
        request: ChatRequest,
        model_name: str,
    ) -> None:
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.client = client
        self.request = request
        self.model_name = model_name
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict] = {}
        self.reasoning_details: list[dict] = []
        self.usage: Usage | None = None
        self.finish_reason = ""
        self.served_model = ""  # the `model` the provider's chunks name (a redirect shows here)
        self.seq = 0
        # Text already broadcast (what any browser may have seen) and what is waiting.
        self.sent_content = ""
        self.sent_reasoning = ""
        self._pending_content: list[str] = []
        self._pending_reasoning: list[str] = []
        self._has_pending = asyncio.Event()
        self._streaming_done = False
        self.stop_requested = False
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.retries = 0
        self.task: asyncio.Task | None = None
        self._stream_task: asyncio.Task | None = None

    # ---- public ------------------------------------------------------------------------------

    def state(self) -> dict:
        """Text broadcast so far and its seq: the snapshot a re-attaching socket starts from."""
        return {
            "message_id": self.message_id,
            "seq": self.seq,
            "content": self.sent_content,
            "reasoning": self.sent_reasoning,
            "status": Message.Status.STREAMING,
        }

    def stop(self) -> None:
        self.stop_requested = True
        if self._stream_task and not self._stream_task.done():
            self._stream_task.cancel()

    # ---- the task ----------------------------------------------------------------------------

    async def run(self) -> None:
        # The reply row was created with this process's lease (generation._turn_commit).
        listener = asyncio.create_task(self._listen())
        flusher = asyncio.create_task(self._flusher())
        checkpointer = asyncio.create_task(self._checkpointer())
        status, error = Message.Status.COMPLETE, ""
        self._stream_task = asyncio.create_task(self._stream_with_retries())
        try:
            await self._stream_task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                # This process is shutting down: keep what arrived; the reply is interrupted.
                status = Message.Status.INTERRUPTED
                error = "The server restarted while this reply was being written."
                await asyncio.shield(self._finish(status, error, listener, flusher, checkpointer))
                raise
            status = Message.Status.CANCELLED
        except ProviderError as exc:
            log.warning("reply %s failed: %r %s", self.message_id, exc, exc.detail[:500])
            status, error = Message.Status.ERROR, exc.user_message
            frame = events.frame_error(
                code=exc.code, message=exc.user_message, message_id=self.message_id
            )
            if exc.code == "model_not_found" and "model" in exc.detail.lower():
                # Retired upstream (the body names the model, not a wrong URL): offer its
                # successor.
                frame.update(
                    await database_sync_to_async(model_catalog.model_gone)(self.message_id)
                )
            await events.deliver(self.conversation_id, frame)
        except Exception:
            log.exception("reply %s failed unexpectedly", self.message_id)
            status, error = Message.Status.ERROR, "Something went wrong while writing this reply."
        else:
            if self.finish_reason == "length" and not "".join(self.content).strip():
                status, error = Message.Status.ERROR, THINKING_BUDGET_MESSAGE
        await self._finish(status, error, listener, flusher, checkpointer)

    async def _stream_with_retries(self) -> None:
        retries = settings.UPSTREAM_MAX_RETRIES
        for attempt in range(1, retries + 2):
            try:
                await self._stream_once()
                return
            except ProviderError as exc:
                received = self.content or self.reasoning
                if not exc.retryable or received or attempt > retries:
                    raise
                final = provider_errors.never_fits(
                    exc, request_tokens=context_window.estimate_messages(self.request.messages)
                )
                if final is not None:
                    raise final from exc
                if exc.retry_after and exc.retry_after > MAX_RETRY_AFTER:
                    raise
                self.retries = attempt
                delay = retry_delay(attempt, exc.retry_after)
                log.info("reply %s: %r, retry %s in %.1fs", self.message_id, exc, attempt, delay)
                await events.publish(
                    self.conversation_id,
                    events.frame_reply_status(
                        message_id=self.message_id, text=f"retrying ({attempt}/{retries})…"
                    ),
                )
                await asyncio.sleep(delay)

    async def _stream_once(self) -> None:
        # The stall guard is ours, whatever the provider client does: no item for this long
        # (even if keep-alive bytes flow) ends the attempt.
        guard = _StallGuard(settings.UPSTREAM_STALL_TIMEOUT)
        stream = aiter(self.client.stream(self.request))
        try:
            while True:
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if guard.tripped():
                        raise ProviderError(
                            STALLED_MESSAGE,
                            retryable=True,
                            code="upstream_stalled",
                            detail=f"no data for {guard.seconds:g}s",
                        ) from None
                    raise
                guard.fed()
                self._take(item)
        finally:
            guard.close()
            await stream.aclose()

    def _take(self, item) -> None:
        if item.content or item.reasoning:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if item.reasoning:
                self.reasoning.append(item.reasoning)
                self._pending_reasoning.append(item.reasoning)
            if item.content:
                self.content.append(item.content)
                self._pending_content.append(item.content)
            self._has_pending.set()
        if item.tool_calls:
            self._merge_tool_calls(item.tool_calls)
        if item.reasoning_details:
            merge_reasoning_details(self.reasoning_details, item.reasoning_details)
        if item.usage is not None:
            self.usage = item.usage
        if item.finish_reason:
            self.finish_reason = item.finish_reason
        if item.model:
            self.served_model = item.model

    def _merge_tool_calls(self, deltas: list[dict]) -> None:
        for position, delta in enumerate(deltas):
            index = delta.get("index", position)
            call = self.tool_calls.setdefault(
                index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if delta.get("id"):
                call["id"] = delta["id"]
            function = delta.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""

    # ---- broadcasting ------------------------------------------------------------------------

    async def _flusher(self) -> None:
        """Coalesce by load, not by clock: a frame goes out as soon as the loop is free, and
        tokens that arrive while it is being sent are merged into the next one. When the loop
        runs late (many streams) the pause between frames grows with its lag, up to
        STREAM_FLUSH_INTERVAL, so a busy process sends fewer, fuller frames."""
        while True:
            await self._has_pending.wait()
            self._has_pending.clear()
            # Read before sending: tokens that arrive while this frame is being published (the
            # stream may end meanwhile) must still go out on the next pass, not be dropped.
            done = self._streaming_done
            await self._send_pending()
            if done:
                return
            if not self._streaming_done:
                await asyncio.sleep(loadmeter.coalesce_window())

    def _commit_pending(self) -> dict | None:
        """Give the waiting text the next seq: from here on it counts as sent, and the state
        snapshot and checkpoints include it. A socket that misses its frame (a channel-layer
        outage) sees the seq gap and asks for state, so nothing is shown twice or lost."""
        if not (self._pending_content or self._pending_reasoning):
            return None
        text = "".join(self._pending_content)
        reasoning = "".join(self._pending_reasoning)
        self._pending_content.clear()
        self._pending_reasoning.clear()
        self.seq += 1
        self.sent_content += text
        self.sent_reasoning += reasoning
        return events.frame_delta(
            message_id=self.message_id, seq=self.seq, text=text, reasoning=reasoning
        )

    async def _send_pending(self) -> None:
        frame = self._commit_pending()
        if frame is not None:
            await events.publish(self.conversation_id, frame)  # never raises

    def checkpoint(self) -> tuple[str, str, int]:
        """(content, reasoning, seq) to save. While the layer is down the flusher may be stuck
        in a publish: commit what waits, so the checkpoint holds what the provider sent."""
        if not events.layer_is_up():
            self._commit_pending()
        return self.sent_content, self.sent_reasoning, self.seq

    async def _listen(self) -> None:
        """Stop requests and state requests from sockets on any process; joins again after a
        channel-layer outage kept it from joining."""
        while True:
            try:
                channel = await events.generation_listen(self.message_id)
            except Exception as exc:
                log.info("reply %s: cannot listen for stop requests yet: %r", self.message_id, exc)
                await asyncio.sleep(1.0)
                continue
            try:
                while True:
                    message = await events.generation_receive(channel)
                    kind = message.get("type")
                    if kind == "generation.stop":
                        self.stop()
                    elif kind == "generation.state" and message.get("reply_to"):
                        await events.answer_state(
                            message["reply_to"],
                            self.state(),
                            request_id=message.get("request_id", ""),
                        )
            finally:
                await events.generation_unlisten(self.message_id, channel)

    # ---- persistence -------------------------------------------------------------------------

    async def _checkpointer(self) -> None:
        """Save the partial reply at a bounded rate, so a crash loses at most one interval, and
        renew its lease (the heartbeat), batched with every other running reply of this process
        (chatapp/checkpoints.py)."""
        await checkpoints.track(self)

    async def _finish(self, status: str, error: str, *tasks: asyncio.Task) -> None:
        listener, flusher, checkpointer = tasks
        listener.cancel()
        checkpointer.cancel()
        self._streaming_done = True
        self._has_pending.set()
        await flusher  # publishing never raises
        saved = await self._save_final_retrying(status, error)
        RUNNING.pop(self.message_id, None)
        if saved is None:
            return
        message, context = saved
        await events.reply_end(message=message, context=context)
        log.info(
            "reply conversation=%s message=%s model=%s status=%s prompt=%s cached=%s "
            "completion=%s ttft_ms=%s duration_ms=%d retries=%d",
            self.conversation_id,
            self.message_id,
            self.model_name,
            status,
            self.usage.prompt_tokens if self.usage else None,
            self.usage.cached_tokens if self.usage else None,
            self.usage.completion_tokens if self.usage else None,
            self.ttft_ms,
            (time.monotonic() - self.started) * 1000,
            self.retries,
        )

    @property
    def ttft_ms(self) -> int | None:
        if self.first_token_at is None:
            return None
        return int((self.first_token_at - self.started) * 1000)

    async def _save_final_retrying(
        self, status: str, error: str
    ) -> tuple[Message, dict | None] | None:
        """The final save, retried with backoff through a database outage (a failover, a
        restarted pooler). None when the reply is not ours to end any more, or the database
        stayed away too long (the reaper then ends it from its last checkpoint)."""
        deadline = time.monotonic() + settings.STREAM_FINAL_SAVE_RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                return await database_sync_to_async(self._save_final_with_context)(status, error)
            except DatabaseError as exc:
                if time.monotonic() > deadline:
                    log.error("reply %s: final save abandoned: %r", self.message_id, exc)
                    return None
                log.warning("reply %s: final save failed (%r), retrying", self.message_id, exc)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(5.0, delay * 2)

    def _save_final(self, status: str, error: str) -> Message | None:
        """Write the terminal state and its usage record in one transaction, only if the reply
        is still streaming under this process (compare-and-set against the reaper)."""
        message = (
            Message.objects.select_related("model__provider", "conversation__model")
            .filter(pk=self.message_id)
            .first()
        )
        if message is None:  # deleted with its conversation while being written
            log.info("reply %s: gone before its final save", self.message_id)
            return None
        now = timezone.now()
        fields = {
            "content": "".join(self.content),
            "reasoning": "".join(self.reasoning),
            "status": status,
            "error": error,
            "finish_reason": self.finish_reason or "",
            "seq": self.seq,
            "time_to_first_token_ms": self.ttft_ms,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if self.tool_calls:
            fields["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if self.reasoning_details:
            fields["reasoning_details"] = self.reasoning_details
        if self.usage is not None:
            fields["prompt_tokens"] = self.usage.prompt_tokens
            fields["cached_tokens"] = self.usage.cached_tokens
            fields["completion_tokens"] = self.usage.completion_tokens
            if message.model is not None:
                # Priced as the model that answered: a reseller may redirect K2.5 to K3.
                served, priced = model_catalog.served_model_for(
                    model=message.model, served=self.served_model
                )
                if served:
                    fields["served_model"] = served
                    log.warning(
                        "reply %s: asked %s, answered by %s",
                        self.message_id,
                        message.model.model_id,
                        served,
                    )
                fields["cost_usd"] = reply_cost(
                    model=priced,
                    prompt_tokens=self.usage.prompt_tokens,
                    cached_tokens=self.usage.cached_tokens,
                    completion_tokens=self.usage.completion_tokens,
                )
        with transaction.atomic():
            ended = Message.objects.filter(
                pk=self.message_id, status=Message.Status.STREAMING, owner=reaper.PROCESS_ID
            ).update(**fields)
            if not ended:
                log.warning(
                    "reply %s was ended elsewhere (the reaper?): this process's end (%s) is "
                    "dropped",
                    self.message_id,
                    status,
                )
                return None
            for name, value in fields.items():
                setattr(message, name, value)
            teams.usage_record_for_reply(message=message)
            Conversation.objects.filter(pk=self.conversation_id).update(updated_at=now)
        return message

    def _save_final_with_context(
        self, status: str, error: str
    ) -> tuple[Message, dict | None] | None:
        """The final save and, in the same hop, the context meter for the end frame (None if
        it cannot be computed: the meter must never hold up the end of a reply)."""
        message = self._save_final(status, error)
        if message is None:
            return None
        try:
            return message, context_window.context_after_reply(message)
        except Exception:  # the save is committed: never retry it for the meter's sake
            log.exception("context meter for reply %s failed", self.message_id)
            return message, None


def retry_delay(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never shorter than the provider's own hint."""
    backoff = random.uniform(0, min(30.0, settings.UPSTREAM_RETRY_BASE_DELAY * 2**attempt))
    return max(backoff, retry_after or 0.0)


# ---- entry points for the consumer ---------------------------------------------------------


def _admit(*, conversation: Conversation, max_output_tokens: int | None = None) -> None:
    """The gates a new reply passes before its turn is written: a usable model, then budgets.
    The context window and the rate limit come after the turn, in _turn_commit."""
    model = conversation.model
    if model is not None and not model.available:
        # Retired or gone from the provider's list: say so, and what to continue with (the
        # page offers it), instead of failing at the provider on every send.
        raise ClientError(
            "model_retired", model_catalog.model_gone_message(model, conversation.owner)
        )
    if model is None or not model.enabled or not model.provider.enabled:
        raise ClientError("model_unavailable", "Pick a model before sending.")
    if max_output_tokens is not None:  # "retry with a larger budget", kept on the conversation
        context_window.conversation_set_max_output_tokens(
            conversation=conversation, value=max_output_tokens
        )
    # The context window is checked by _plan_reply once the turn is written (with its
    # images), in the same transaction: a turn that does not fit is rolled back whole.
    teams.budget_check(conversation=conversation, user=conversation.owner)


@transaction.atomic
def _turn_commit(*, conversation: Conversation, admit: dict, turn, **turn_args):
    """Every gate, the turn's rows and the request plan in one database hop and one
    transaction: whatever refuses (model, window with its images, budget, rate limit) rolls
    the whole turn back, so a refused send leaves no message and its images stay unsent,
    ready for a resend. Returns (turn's result, plan, owner is staff)."""
    _admit(conversation=conversation, **admit)
    # The reply is created already claimed by this process (it starts here right after).
    lease = {"owner": reaper.PROCESS_ID, "lease_expires_at": reaper.lease_deadline()}
    result = turn(conversation=conversation, lease=lease, **turn_args)
    reply = result[1] if isinstance(result, tuple) else result
    plan = _plan_reply(conversation=conversation, reply=reply)
    teams.rate_limit_check(user=conversation.owner)  # last: a refused send uses no slot
    return result, plan, conversation.owner.is_staff


async def reply_send(
    *, conversation: Conversation, text: str, user=None, attachment_ids: list[int] = ()
) -> tuple[Message, Message]:
    """Commit the user's message (and its images) and start the reply; returns (user message,
    reply)."""
    (user_message, reply), plan, staff = await database_sync_to_async(_turn_commit)(
        conversation=conversation,
        admit={},
        turn=turn_start,
        text=text,
        user=user,
        attachment_ids=attachment_ids,
    )
    await _reply_begin(conversation=conversation, reply=reply, plan=plan, staff=staff)
    return user_message, reply


async def reply_regenerate(
    *, conversation: Conversation, reply_id: int, max_output_tokens: int | None = None
) -> Message:
    """Write the last reply again (Retry after an error, or Regenerate), optionally with a
    larger output budget (kept on the conversation)."""
    reply, plan, staff = await database_sync_to_async(_turn_commit)(
        conversation=conversation,
        admit={"max_output_tokens": max_output_tokens},
        turn=turn_regenerate,
        reply_id=reply_id,
    )
    await _reply_begin(conversation=conversation, reply=reply, plan=plan, staff=staff)
    return reply


async def reply_edit(
    *, conversation: Conversation, message_id: int, text: str
) -> tuple[Message, Message]:
    """Replace an earlier user message (and every later turn) and write a new reply to it."""
    # The same gates as a send: the edited turn must fit, and budgets / rate limits apply.
    (message, reply), plan, staff = await database_sync_to_async(_turn_commit)(
        conversation=conversation,
        admit={},
        turn=turn_edit,
        message_id=message_id,
        text=text,
    )
    await _reply_begin(conversation=conversation, reply=reply, plan=plan, staff=staff)
    return message, reply


async def _reply_begin(
    *, conversation: Conversation, reply: Message, plan, staff: bool
) -> Generation:
    """Start the reply's own task with its planned request."""
    model = conversation.model
    provider = model.provider

    async def waiting(position: int) -> None:
        text = f"waiting for the provider: {ordinal(position)} in line" if position else ""
        await events.publish(
            conversation.pk, events.frame_reply_status(message_id=reply.pk, text=text)
        )

    client = GatedClient(
        client_for(
            kind=provider.kind,
            base_url=provider.base_url,
            api_key=provider.api_key,
            name=provider.name,
        ),
        key=str(provider.pk),
        limit=provider.max_concurrency,
        on_wait=waiting,
        staff=staff,
    )
    generation = Generation(
        message_id=reply.pk,
        conversation_id=conversation.pk,
        client=client,
        request=plan.request,
        model_name=model.display_name,
    )
    RUNNING[reply.pk] = generation
    generation.task = asyncio.create_task(generation.run(), name=f"reply-{reply.pk}")
    return generation


def _plan_reply(*, conversation: Conversation, reply: Message) -> context_window.Plan:
    """History (with the turn's images) -> the clamped request; ClientError when it does not
    fit the window. Run inside the turn's transaction, so a refusal writes nothing."""
    earlier = earlier_messages(conversation, before=reply)  # read once for both
    messages = history_for_request(conversation, before=reply, earlier=earlier)
    return context_window.plan_request(
        conversation=conversation,
        model=conversation.model,
        messages=messages,
        earlier=earlier,
    )


async def reply_stop(*, conversation: Conversation) -> bool:
    """Stop the conversation's running reply, wherever it runs. False when none is running."""
    message_id = await _streaming_message_id(conversation)
    if message_id is None:
        return False
    local = RUNNING.get(message_id)
    if local is not None:
        local.stop()
    else:
        await events.request_stop(message_id)
    return True


def _state_rows(conversation: Conversation) -> tuple[Message | None, Message | None, dict]:
    """What a socket's state frame is built from, in one read: the running reply's row (its
    owner, lease and last checkpoint), else the last reply, and the context meter."""
    streaming = (
        Message.objects.filter(conversation=conversation, status=Message.Status.STREAMING)
        .only("id", "owner", "lease_expires_at", "seq", "content", "reasoning", "status")
        .order_by("-id")
        .first()
    )
    last = last_reply(conversation) if streaming is None else None
    return streaming, last, context_window.context_state(conversation)


async def socket_state(*, conversation: Conversation) -> tuple[dict | None, Message | None, dict]:
    """(running reply's state or None, last reply when none runs, context meter) for a socket:
    one database hop on the read threads (chatapp/dbreads.py), so a socket opening under load
    does not queue behind the sends being written."""
    streaming, last, context = await read_off_loop(_state_rows)(conversation)
    if streaming is None:
        return None, last, context
    state = await _running_state(streaming)
    if state is None:  # it ended since the read: its final form
        last = await read_off_loop(last_reply)(conversation)
    return state, last, context


async def _running_state(row: Message) -> dict | None:
    """The exact state of a running reply: from memory when it runs here, from its process
    when another live one owns it, else its last checkpoint; None when it has ended since
    `row` was read."""
    local = RUNNING.get(row.pk)
    if local is not None:
        return local.state()
    if (
        row.owner
        and row.owner != reaper.PROCESS_ID
        and row.lease_expires_at
        and row.lease_expires_at > timezone.now()
    ):
        # Running on another process: it answers from memory with the exact text and seq.
        state = await events.ask_state(row.pk, timeout=settings.STREAM_STATE_TIMEOUT)
        if state is not None:
            return state
    # Not answering (it just ended, or its process died): read it again, as it is now.
    row = await read_off_loop(_streaming_row)(row.pk)
    if row is None:
        return None
    return {
        "message_id": row.pk,
        "seq": row.seq,
        "content": row.content,
        "reasoning": row.reasoning,
        "status": row.status,
    }


def _streaming_row(message_id: int) -> Message | None:
    return (
        Message.objects.filter(pk=message_id, status=Message.Status.STREAMING)
        .only("id", "seq", "content", "reasoning", "status")
        .first()
    )


async def _streaming_message_id(conversation: Conversation) -> int | None:
    return await (
        Message.objects.filter(conversation=conversation, status=Message.Status.STREAMING)
        .order_by("-id")
        .values_list("id", flat=True)
        .afirst()
    )
