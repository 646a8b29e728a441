"""Running a batch: every item one independent request, answered exactly once.

`batch_run(batch_id=...)` is what a worker's job runs (chatapp/tasks.py). It marks the batch
running and then, on the live path, runs up to `batches.provider_concurrency(model)` lanes; each
lane claims the next free item (compare-and-set with a lease), asks the provider through the
shared concurrency gate at batch priority (chat sends go ahead of batch items in the line),
validates a structured answer (one retry with the validation error, then "invalid" with the raw
answer kept), and saves it with its usage record only while its claim still holds. A heartbeat
renews the leases, and watches for pause and cancel; a dead runner's items are claimed again by
any runner once their leases run out, and the batch itself is queued again by the recovery sweep.

Workers AI models go through its asynchronous batch API instead (`queueRequest`), and models on
an OpenAI-compatible server with cheaper batch prices through `/v1/batches`: items are
submitted in payloads under Workers AI's size cap, the request id is saved before polling (a restarted
runner polls it rather than sending the items again), results are mapped back by id and failed
items are left retryable.

Every request is the question (and the fields) first and the image last, with the batch's one
affinity id, so the provider's prefix cache serves the shared part of every request.
"""

import asyncio
import logging
import random

from channels.db import database_sync_to_async
from django.conf import settings

from . import batches, context_window, events
from .attachments import read_image
from .generation import MAX_RETRY_AFTER, retry_delay
from .images import data_url
from .models import Batch, BatchItem
from .providers import errors as provider_errors
from .providers.base import ChatRequest, ProviderError, Usage
from .providers.gate import BATCH, GatedClient
from .providers.openai_compat import dumps
from .providers.registry import batch_client_for, client_for, openai_batch_client_for
from .providers.workers_ai import BATCH_MAX_BYTES, BatchPending

log = logging.getLogger(__name__)

RETRY_PROMPT = (
    "That answer does not fit the requested format: {error} Answer again with only the JSON object."
)
FAILED_MESSAGE = "The provider could not answer this item."
STALLED_MESSAGE = "The model stopped sending data for this item."
ASYNC_CHUNK_ITEMS = 100


class _Stop(Exception):
    pass


def _image_parts(item: BatchItem) -> list[dict]:
    parts = []
    attachment = item.attachment
    if attachment is None:
        return parts
    for part in attachment.parts.select_related("image").all():
        data = read_image(part.image)
        if data is not None:
            parts.append(
                {"type": "image_url", "image_url": {"url": data_url(data, part.image.mime)}}
            )
    return parts


def item_messages(batch: Batch, item: BatchItem) -> list[dict]:
    """Question first, image last (the shared prefix comes before what differs)."""
    text = batches.prompt_text(batch.question, batch.fields)
    images = _image_parts(item)
    if not images:
        raise ProviderError("This item's image is no longer available.", code="image_missing")
    return [{"role": "user", "content": [{"type": "text", "text": text}, *images]}]


def retry_messages(messages: list[dict], raw: str, error: str) -> list[dict]:
    """The item's request once more, with the answer that did not fit and what was wrong."""
    return [
        *messages,
        {"role": "assistant", "content": raw or "(empty)"},
        {"role": "user", "content": RETRY_PROMPT.format(error=error)},
    ]


def _request(batch: Batch, messages: list[dict]) -> ChatRequest:
    model = batch.model
    return ChatRequest(
        model=model.model_id,
        messages=messages,
        affinity_id=batch.affinity_id,
        # Extraction needs no long thinking: off where the family has a switch (the contract
        # drops it where thinking cannot be turned off), for cost and speed.
        thinking=False if model.reasoning else None,
        contract=model.contract or {},
        response_format=batches.response_format(batch.fields, batches.structured_mode(model)),
    )


class Runner:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.model = batch.model
        self.claim = batches.new_claim()
        self.stopping: str | None = None  # "pause" | "cancel" | "budget"
        self.items_running: dict[int, asyncio.Task] = {}

    # ---- the provider -------------------------------------------------------------------------

    def _client(self):
        provider = self.model.provider

        async def on_wait(position: int) -> None:
            return None

        return GatedClient(
            client_for(
                kind=provider.kind,
                base_url=provider.base_url,
                api_key=provider.api_key,
                name=provider.name,
            ),
            key=str(provider.pk),
            limit=provider.max_concurrency,
            on_wait=on_wait,
            priority=BATCH,
        )

    async def _ask_once(self, request: ChatRequest) -> tuple[str, Usage]:
        stall = settings.UPSTREAM_STALL_TIMEOUT
        content: list[str] = []
        usage = Usage()
        stream = aiter(self._client().stream(request))
        try:
            while True:
                try:
                    async with asyncio.timeout(stall):
                        item = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ProviderError(
                        STALLED_MESSAGE, retryable=True, code="upstream_stalled"
                    ) from None
                if item.content:
                    content.append(item.content)
                if item.usage is not None:
                    usage = item.usage
        finally:
            await stream.aclose()
        return "".join(content), usage

    async def _ask(self, request: ChatRequest) -> tuple[str, Usage]:
        """One answer, retrying 429s and 5xx with backoff (the provider's hint respected)."""
        retries = settings.UPSTREAM_MAX_RETRIES
        for attempt in range(1, retries + 2):
            try:
                return await self._ask_once(request)
            except ProviderError as exc:
                if not exc.retryable or attempt > retries:
                    raise
                if exc.retry_after and exc.retry_after > MAX_RETRY_AFTER:
                    raise
                # A tokens-per-minute limit below this request's own size: waiting cannot help.
                final = provider_errors.never_fits(
                    exc, request_tokens=context_window.estimate_messages(request.messages)
                )
                if final is not None:
                    raise final from exc
                delay = retry_delay(attempt, exc.retry_after)
                log.info("batch %s: %r, retry %s in %.1fs", self.batch.pk, exc, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ---- one item -----------------------------------------------------------------------------

    async def _answer(self, item: BatchItem) -> dict:
        """-> the fields for batches.item_finish."""
        batch = self.batch
        messages = await database_sync_to_async(item_messages)(batch, item)
        total = Usage()
        attempts = 0

        def add(usage: Usage) -> None:
            total.prompt_tokens += usage.prompt_tokens
            total.cached_tokens += usage.cached_tokens
            total.completion_tokens += usage.completion_tokens

        try:
            attempts += 1
            raw, usage = await self._ask(_request(batch, messages))
            add(usage)
            if not batch.fields:
                status = BatchItem.Status.DONE if raw.strip() else BatchItem.Status.INVALID
                error = "" if raw.strip() else "The model returned an empty answer."
                return self._result(status, raw, None, error, total, attempts)
            try:
                values = batches.answer_validate(batch.fields, raw)
                return self._result(BatchItem.Status.DONE, raw, values, "", total, attempts)
            except batches.AnswerInvalid as exc:
                first_error = str(exc)
            # Once more, with what was wrong.
            first_raw = raw
            retry = retry_messages(messages, raw, first_error)
            attempts += 1
            try:
                raw2, usage = await self._ask(_request(batch, retry))
            except ProviderError:
                # The retry could not be asked: the first answer is kept, marked invalid.
                return self._result(
                    BatchItem.Status.INVALID,
                    first_raw,
                    None,
                    f"Invalid answer: {first_error}",
                    total,
                    attempts,
                )
            add(usage)
            try:
                values = batches.answer_validate(batch.fields, raw2)
                return self._result(BatchItem.Status.DONE, raw2, values, "", total, attempts)
            except batches.AnswerInvalid as exc:
                return self._result(
                    BatchItem.Status.INVALID, raw2, None, f"Invalid answer: {exc}", total, attempts
                )
        except ProviderError as exc:
            return self._result(
                BatchItem.Status.FAILED,
                "",
                None,
                exc.user_message or FAILED_MESSAGE,
                total,
                attempts,
            )

    @staticmethod
    def _result(status, answer, values, error, usage: Usage, attempts: int) -> dict:
        return {
            "status": status,
            "answer": answer,
            "values": values,
            "error": error,
            "prompt": usage.prompt_tokens,
            "cached": usage.cached_tokens,
            "completion": usage.completion_tokens,
            "attempts": attempts,
        }

    async def _run_item(self, item: BatchItem) -> None:
        try:
            # Inside the try: a cancel that lands while "running" is being published must
            # release the item too, or it stays running in a cancelled batch.
            await self._publish_item(item.pk)  # "running"
            result = await self._answer(item)
        except asyncio.CancelledError:
            released = await database_sync_to_async(batches.item_release)(
                item_id=item.pk, claim=self.claim, cancelled=self.stopping == "cancel"
            )
            if released is not None:
                await asyncio.shield(self._publish_item(item.pk))
            raise
        except Exception:
            log.exception("batch %s item %s failed unexpectedly", self.batch.pk, item.pk)
            result = self._result(
                BatchItem.Status.FAILED,
                "",
                None,
                "Something went wrong with this item.",
                Usage(),
                1,
            )
        saved = await database_sync_to_async(batches.item_finish)(
            item_id=item.pk, claim=self.claim, **result
        )
        if saved is None:
            log.warning("batch %s item %s: claim lost, answer dropped", self.batch.pk, item.pk)
            return
        log.info(
            "batch item batch=%s item=%s status=%s prompt=%s cached=%s completion=%s",
            self.batch.pk,
            item.pk,
            result["status"],
            result["prompt"],
            result["cached"],
            result["completion"],
        )
        await self._publish_item(item.pk)

    # ---- lanes, heartbeat ---------------------------------------------------------------------

    async def _lane(self) -> None:
        while not self.stopping:
            if await database_sync_to_async(batches.batch_over_budget)(batch=self.batch):
                self.stopping = "budget"
                return
            item = await database_sync_to_async(batches.item_claim)(
                batch_id=self.batch.pk, claim=self.claim
            )
            if item is None:
                if await database_sync_to_async(batches.items_open_elsewhere)(
                    batch_id=self.batch.pk
                ):
                    await asyncio.sleep(1.0)  # another runner's items: wait to take them over
                    continue
                return
            await self._run_item_guarded(item)

    async def _run_item_guarded(self, item: BatchItem) -> None:
        # Its own task, so a cancel stops exactly this item's request.
        task = asyncio.ensure_future(self._run_item(item))
        self.items_running[item.pk] = task
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        finally:
            self.items_running.pop(item.pk, None)

    async def _heartbeat(self) -> None:
        every = max(0.2, min(1.0, settings.BATCH_LEASE_SECONDS / 3))
        while True:
            await asyncio.sleep(every)
            try:
                status = await database_sync_to_async(batches.batch_heartbeat)(
                    batch_id=self.batch.pk, claim=self.claim
                )
            except Exception:
                log.exception("batch %s heartbeat failed", self.batch.pk)
                continue
            if status == Batch.Status.CANCELLED:
                self.stopping = "cancel"
                for task in list(self.items_running.values()):
                    task.cancel()
            elif status != Batch.Status.RUNNING and not self.stopping:
                self.stopping = "pause"  # in-flight items finish; no new ones start

    async def _publish_item(self, item_id: int) -> None:
        batch_id, item, batch = await database_sync_to_async(batches.batch_item_event)(
            item_id=item_id
        )
        await events.batch_publish(batch_id, events.frame_batch_item(item=item, batch=batch))

    async def publish_status(self) -> None:
        state = await database_sync_to_async(_batch_dict)(self.batch.pk)
        if state is not None:
            await events.batch_publish(self.batch.pk, events.frame_batch_status(batch=state))

    async def run(self) -> None:
        # The heartbeat first: nothing (a slow first publish) may outlast the batch's lease.
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self.publish_status()
            if self.batch.mode in ("workers_ai", "openai_batch"):
                await self._run_async_api()
            else:
                lanes = batches.provider_concurrency(self.model)
                await asyncio.gather(*(self._lane() for _ in range(lanes)))
        finally:
            heartbeat.cancel()
        await database_sync_to_async(batches.batch_end)(
            batch_id=self.batch.pk, budget=self.stopping == "budget"
        )
        await self.publish_status()

    # ---- Workers AI async batch ---------------------------------------------------------------

    def _async_bodies(
        self, items: list[BatchItem], retries: dict[int, tuple[str, str]] | None = None
    ) -> list[dict]:
        """One chat body per item; `retries` {item id: (raw answer, validation error)} asks
        those items once more with what was wrong (the schema retry, as on the live path)."""
        bodies = []
        for item in items:
            messages = item_messages(self.batch, item)
            if retries and item.pk in retries:
                messages = retry_messages(messages, *retries[item.pk])
            request = _request(self.batch, messages)
            body = {"messages": request.messages, "external_reference": str(item.pk)}
            if request.response_format:
                body["response_format"] = request.response_format
            if request.thinking_param is not None:
                body["chat_template_kwargs"] = {"thinking": request.thinking_param}
            bodies.append(body)
        return bodies

    async def _run_async_api(self) -> None:
        provider = self.model.provider
        make = openai_batch_client_for if self.batch.mode == "openai_batch" else batch_client_for
        client = make(base_url=provider.base_url, api_key=provider.api_key)
        # A runner that died after submitting: poll its request ids, never send them again.
        orphans = await database_sync_to_async(batches.items_submitted_orphans)(
            batch_id=self.batch.pk, claim=self.claim
        )
        for request_id, item_ids in orphans.items():
            await self._collect(client, request_id, item_ids)
        while not self.stopping:
            if await database_sync_to_async(batches.batch_over_budget)(batch=self.batch):
                self.stopping = "budget"
                return
            items = await database_sync_to_async(batches.items_claim_many)(
                batch_id=self.batch.pk, claim=self.claim, limit=ASYNC_CHUNK_ITEMS
            )
            if not items:
                if await database_sync_to_async(batches.items_open_elsewhere)(
                    batch_id=self.batch.pk
                ):
                    await asyncio.sleep(1.0)
                    continue
                return
            bodies = await database_sync_to_async(self._async_bodies)(items)
            for chunk_items, chunk_bodies in _chunks(items, bodies):
                try:
                    request_id = await client.submit(
                        model=self.model.model_id,
                        requests=chunk_bodies,
                        affinity_id=self.batch.affinity_id,
                    )
                except ProviderError as exc:
                    for item in chunk_items:
                        await self._finish_async(item.pk, error=exc)
                    continue
                await database_sync_to_async(batches.items_submitted)(
                    claim=self.claim, item_ids=[i.pk for i in chunk_items], request_id=request_id
                )
                for item in chunk_items:
                    await self._publish_item(item.pk)
                await self._collect(client, request_id, [i.pk for i in chunk_items])

    async def _retry_async(self, client, retries: dict[int, dict]) -> None:
        """Answers that failed the schema, asked once more through the same async API with the
        validation error. Their first answer and its usage are saved with the new request id
        first, so a runner taking over after a crash knows these are second answers."""
        items = await database_sync_to_async(_items_by_pk)(list(retries))
        bodies = await database_sync_to_async(self._async_bodies)(
            items, {pk: (r["answer"], r["error"]) for pk, r in retries.items()}
        )
        for chunk_items, chunk_bodies in _chunks(items, bodies):
            ids = [i.pk for i in chunk_items]
            try:
                request_id = await client.submit(
                    model=self.model.model_id,
                    requests=chunk_bodies,
                    affinity_id=self.batch.affinity_id,
                )
            except ProviderError as exc:
                for pk in ids:
                    await self._finish_async(pk, error=exc, prior=retries[pk])
                continue
            await database_sync_to_async(batches.items_resubmitted)(
                claim=self.claim,
                request_id=request_id,
                retries={pk: retries[pk] for pk in ids},
            )
            await self._collect(client, request_id, ids)

    async def _collect(self, client, request_id: str, item_ids: list[int]) -> None:
        """Poll with backoff until done; map each result to its item by id."""
        delay = settings.BATCH_POLL_INTERVAL
        # Items already in their schema retry (first answer saved with this request id).
        second = await database_sync_to_async(batches.items_in_retry)(item_ids=item_ids)
        while True:
            if self.stopping == "cancel":
                for pk in item_ids:
                    await database_sync_to_async(batches.item_release)(
                        item_id=pk, claim=self.claim, cancelled=True
                    )
                    await self._publish_item(pk)
                return
            try:
                results = await client.poll(model=self.model.model_id, request_id=request_id)
                break
            except BatchPending:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 1.5, 60.0)
            except ProviderError as exc:
                if not exc.retryable:
                    for pk in item_ids:
                        await self._finish_async(pk, error=exc, prior=second.get(pk))
                    return
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 1.5, 60.0)
        by_id = {}
        for position, result in enumerate(results):
            reference = result.external_reference
            key = int(reference) if reference and str(reference).isdigit() else None
            if key not in item_ids:  # no reference: results are in submission order by id
                key = item_ids[result.id] if 0 <= result.id < len(item_ids) else None
            if key is None and position < len(item_ids):
                key = item_ids[position]
            by_id[key] = result
        retries: dict[int, dict] = {}
        for pk in item_ids:
            result = by_id.get(pk)
            prior = second.get(pk)
            if result is None:
                await self._finish_async(
                    pk,
                    error=ProviderError("The provider returned no answer for this item."),
                    prior=prior,
                )
            elif result.error is not None:
                await self._finish_async(pk, error=result.error, prior=prior)
            else:
                content, usage = result.item.content, result.item.usage or Usage()
                if prior is None and self.batch.fields:
                    try:
                        batches.answer_validate(self.batch.fields, content)
                    except batches.AnswerInvalid as exc:
                        retries[pk] = {
                            "answer": content,
                            "error": str(exc),
                            "prompt": usage.prompt_tokens,
                            "cached": usage.cached_tokens,
                            "completion": usage.completion_tokens,
                        }
                        continue
                await self._finish_async(pk, content=content, usage=usage, prior=prior)
        if retries and self.stopping != "cancel":
            await self._retry_async(client, retries)
        else:
            for pk, first in retries.items():
                await self._finish_async(
                    pk, content=first["answer"], prior=None, usage=_usage(first)
                )

    async def _finish_async(self, item_id, *, content="", usage=None, error=None, prior=None):
        """An async result saved: `prior` is the first answer of an item in its schema retry
        (its usage adds up; when the retry fails too, the raw answer is kept as invalid)."""
        usage = usage or Usage()
        attempts = 1
        if prior is not None:
            attempts = 2
            first = _usage(prior)
            usage = Usage(
                prompt_tokens=usage.prompt_tokens + first.prompt_tokens,
                cached_tokens=usage.cached_tokens + first.cached_tokens,
                completion_tokens=usage.completion_tokens + first.completion_tokens,
            )
        batch = self.batch
        if error is not None and prior is not None:
            # The retry could not be answered: the first answer is kept, marked invalid.
            result = self._result(
                BatchItem.Status.INVALID,
                prior["answer"],
                None,
                f"Invalid answer: {prior['error']}",
                usage,
                attempts,
            )
        elif error is not None:
            result = self._result(
                BatchItem.Status.FAILED,
                "",
                None,
                error.user_message or FAILED_MESSAGE,
                usage,
                attempts,
            )
        elif not batch.fields:
            ok = bool(content.strip())
            result = self._result(
                BatchItem.Status.DONE if ok else BatchItem.Status.INVALID,
                content,
                None,
                "" if ok else "The model returned an empty answer.",
                usage,
                attempts,
            )
        else:
            try:
                values = batches.answer_validate(batch.fields, content)
                result = self._result(BatchItem.Status.DONE, content, values, "", usage, attempts)
            except batches.AnswerInvalid as exc:
                result = self._result(
                    BatchItem.Status.INVALID,
                    content,
                    None,
                    f"Invalid answer: {exc}",
                    usage,
                    attempts,
                )
        saved = await database_sync_to_async(batches.item_finish)(
            item_id=item_id, claim=self.claim, batch_api=True, **result
        )
        if saved is not None:
            await self._publish_item(item_id)


def _usage(first: dict) -> Usage:
    return Usage(
        prompt_tokens=first["prompt"],
        cached_tokens=first["cached"],
        completion_tokens=first["completion"],
    )


def _items_by_pk(item_ids: list[int]) -> list[BatchItem]:
    found = BatchItem.objects.select_related("attachment").in_bulk(item_ids)
    return [found[pk] for pk in item_ids if pk in found]


def _chunks(items: list[BatchItem], bodies: list[dict]):
    """Split under Workers AI's payload cap (10 MB per batch request)."""
    limit = BATCH_MAX_BYTES * 9 // 10
    chunk_items, chunk_bodies, size = [], [], 0
    for item, body in zip(items, bodies, strict=True):
        body_size = len(dumps(body))
        if chunk_bodies and size + body_size > limit:
            yield chunk_items, chunk_bodies
            chunk_items, chunk_bodies, size = [], [], 0
        chunk_items.append(item)
        chunk_bodies.append(body)
        size += body_size
    if chunk_bodies:
        yield chunk_items, chunk_bodies


def _batch_dict(batch_id: int) -> dict | None:
    batch = Batch.objects.select_related("model").filter(pk=batch_id).first()
    return batches.batch_to_dict(batch) if batch else None


async def batch_run(*, batch_id: int) -> None:
    """The job: run the batch until its items are done, or it is paused, cancelled or out of
    budget. Safe to run twice at once (claims), and after a crash (leases)."""
    batch = await database_sync_to_async(batches.batch_begin)(batch_id=batch_id)
    if batch is None or batch.model is None:
        return
    await Runner(batch).run()
