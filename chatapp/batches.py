"""Batches: one question over many images, each answered as its own request.

Services (synchronous ORM code; the runner and async views go through database_sync_to_async):
- fields -> a JSON schema -> the request's `response_format` (json_schema where the model
  supports it, json_object plus the app's own validation where it does not); answers validated here.
- the estimate (prompt tokens from the image sizes, the question and the expected output; cost
  against the team's budget left; duration from the provider's concurrency) and the refusal of a
  batch that would not fit the budget;
- create, pause, resume, cancel, retry failed items, delete (images go with the batch);
- claims: an item is answered by whoever holds its claim; the final save is a compare-and-set on
  (status running, claim) with the usage record in the same transaction, so a dead worker's item
  is claimed again once its lease runs out and no item is ever answered twice;
- recovery: a batch still running whose runner's lease ran out is queued again;
- exports (CSV, Excel-friendly CSV, JSONL) and "open as a conversation".

The runner itself (provider calls, the gate, progress frames) is chatapp/batch_runner.py.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import uuid
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from . import teams
from .attachments import _delete_unreferenced, _image_ids_of, format_bytes
from .audit import audit_record
from .errors import ClientError
from .models import (
    Attachment,
    AttachmentPart,
    Batch,
    BatchItem,
    Conversation,
    Message,
    ModelConfig,
    UsageRecord,
)
from .pricing import cache_savings, reply_cost
from .reaper import PROCESS_ID

FIELD_TYPES = {
    "text": "text",
    "number": "number",
    "date": "date (YYYY-MM-DD)",
    "yesno": "yes/no (true or false)",
    "choice": "one of a list",
}
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
MAX_FIELDS = 30
MAX_QUESTION_CHARS = 8000
# Kimi's vision encoder: one token per 28x28 pixel patch (14 px patches merged 2x2).
IMAGE_PATCH = 28
REQUEST_OVERHEAD_TOKENS = 20
EXPECTED_TEXT_ANSWER_TOKENS = 400
EXPECTED_TOKENS_PER_FIELD = 25
ACTIVE = (Batch.Status.QUEUED, Batch.Status.RUNNING)
OPEN_ITEMS = (BatchItem.Status.PENDING, BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED)
FINISHED_ITEMS = (BatchItem.Status.DONE, BatchItem.Status.INVALID)


# ---- fields -> schema -> response_format ----------------------------------------------------


def fields_clean(raw) -> list[dict]:
    """Validate the fields a user defined; -> [{name, type, description, choices}]."""
    if raw in (None, ""):
        return []
    if not isinstance(raw, list):
        raise ClientError("bad_fields", "Fields must be a list.")
    if len(raw) > MAX_FIELDS:
        raise ClientError("bad_fields", f"At most {MAX_FIELDS} fields.")
    out, seen = [], set()
    for entry in raw:
        if not isinstance(entry, dict):
            raise ClientError("bad_fields", "Each field needs a name and a type.")
        name = str(entry.get("name") or "").strip()
        kind = str(entry.get("type") or "text").strip()
        if not FIELD_NAME.match(name):
            raise ClientError(
                "bad_fields",
                f"“{name[:40]}” is not a usable field name: letters, digits and _ only, "
                "starting with a letter (e.g. vendor, total_amount).",
            )
        if name in seen:
            raise ClientError("bad_fields", f"The field {name} is defined twice.")
        seen.add(name)
        if kind not in FIELD_TYPES:
            raise ClientError("bad_fields", f"The field {name} has an unknown type.")
        field = {"name": name, "type": kind, "description": str(entry.get("description") or "")}
        field["description"] = field["description"].strip()[:500]
        if kind == "choice":
            choices = entry.get("choices") or []
            if isinstance(choices, str):
                choices = choices.split(",")
            choices = [str(c).strip() for c in choices if str(c).strip()]
            if len(choices) < 2:
                raise ClientError("bad_fields", f"The field {name} needs at least two choices.")
            field["choices"] = choices[:50]
        out.append(field)
    return out


def _property(field: dict) -> dict:
    kind = field["type"]
    if kind == "number":
        prop: dict = {"type": ["number", "null"]}
    elif kind == "yesno":
        prop = {"type": ["boolean", "null"]}
    elif kind == "choice":
        prop = {"type": ["string", "null"], "enum": [*field["choices"], None]}
    elif kind == "date":
        prop = {"type": ["string", "null"], "pattern": r"^\d{4}-\d{2}-\d{2}$"}
    else:
        prop = {"type": ["string", "null"]}
    if field.get("description"):
        prop["description"] = field["description"]
    return prop


def fields_schema(fields: list[dict]) -> dict:
    """The JSON schema of one answer: every field required, null when the image lacks it."""
    return {
        "type": "object",
        "properties": {f["name"]: _property(f) for f in fields},
        "required": [f["name"] for f in fields],
        "additionalProperties": False,
    }


def structured_mode(model: ModelConfig) -> str:
    """json_schema or json_object for this model (staff choice, else its family's contract)."""
    if model.structured_output != "auto":
        return model.structured_output
    contract = model.contract or {}
    if contract.get("structured_output") in ("json_schema", "json_object"):
        return contract["structured_output"]
    family = model.family or ""
    # Kimi K3 documents response_format json_schema; Workers AI's Kimi schema lists it too.
    if family.startswith("kimi-k3") or model.provider.kind == "workers_ai":
        return "json_schema"
    return "json_object"


def response_format(fields: list[dict], mode: str) -> dict | None:
    if not fields:
        return None
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "answer", "strict": True, "schema": fields_schema(fields)},
        }
    return {"type": "json_object"}


def prompt_text(question: str, fields: list[dict]) -> str:
    """The shared prefix of every item's request: the question (and the fields) go first, the
    image last, so the provider's prefix cache serves this part of every request."""
    if not fields:
        return question
    lines = [
        question,
        "",
        "Answer with one JSON object and nothing else, with exactly these keys "
        "(null when the image does not show it):",
    ]
    for field in fields:
        kind = FIELD_TYPES[field["type"]]
        if field["type"] == "choice":
            kind = "one of: " + ", ".join(json.dumps(c) for c in field["choices"])
        line = f"- {field['name']}: {kind}"
        if field.get("description"):
            line += f" — {field['description']}"
        lines.append(line)
    return "\n".join(lines)


class AnswerInvalid(ValueError):
    pass


def _json_text(raw: str) -> str:
    text = raw.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    return fenced.group(1) if fenced else text


def answer_validate(fields: list[dict], raw: str) -> dict:
    """The answer's values, checked against the fields; raises AnswerInvalid saying what is
    wrong (sent back to the model once, then kept with the raw answer)."""
    try:
        data = json.loads(_json_text(raw))
    except ValueError:
        raise AnswerInvalid("The answer is not valid JSON.") from None
    if not isinstance(data, dict):
        raise AnswerInvalid("The answer must be one JSON object.")
    values: dict = {}
    for field in fields:
        name, kind = field["name"], field["type"]
        if name not in data:
            raise AnswerInvalid(f"The key {name!r} is missing.")
        value = data[name]
        if value is None:
            values[name] = None
            continue
        if kind == "number":
            if isinstance(value, str):
                try:
                    value = float(value.replace(",", "").strip())
                except ValueError:
                    raise AnswerInvalid(f"{name} must be a number.") from None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AnswerInvalid(f"{name} must be a number.")
            if isinstance(value, float) and not math.isfinite(value):
                raise AnswerInvalid(f"{name} must be a finite number.")
        elif kind == "yesno":
            if not isinstance(value, bool):
                raise AnswerInvalid(f"{name} must be true or false.")
        elif kind == "date":
            try:
                dt.date.fromisoformat(value) if isinstance(value, str) else None
            except ValueError:
                value = None
                raise AnswerInvalid(f"{name} must be a date written YYYY-MM-DD.") from None
            if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}$", value):
                raise AnswerInvalid(f"{name} must be a date written YYYY-MM-DD.")
        elif kind == "choice":
            if value not in field["choices"]:
                raise AnswerInvalid(f"{name} must be one of {', '.join(field['choices'])}.")
        elif not isinstance(value, str):
            value = json.dumps(value) if isinstance(value, dict | list) else str(value)
        values[name] = value
    return values


# ---- estimate -------------------------------------------------------------------------------


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)  # a rough rule; the estimate says "about"


def image_tokens(width: int, height: int) -> int:
    return math.ceil(width / IMAGE_PATCH) * math.ceil(height / IMAGE_PATCH)


def expected_output_tokens(fields: list[dict]) -> int:
    return 40 + EXPECTED_TOKENS_PER_FIELD * len(fields) if fields else EXPECTED_TEXT_ANSWER_TOKENS


def images_for_batch(user, attachment_ids: list[int]) -> list[Attachment]:
    found = {
        a.pk: a
        for a in Attachment.objects.filter(
            pk__in=attachment_ids, owner=user, message__isnull=True, batch_item__isnull=True
        ).prefetch_related("parts__image")
    }
    missing = [pk for pk in attachment_ids if pk not in found]
    if missing:
        raise ClientError("bad_images", "Some images are gone; upload them again.")
    return [found[pk] for pk in attachment_ids]


def budget_left(*, team, user) -> Decimal | None:
    """What the team (and the member's cap) still allows this month; None = unlimited."""
    if team is None:
        return None
    left = None
    if team.monthly_budget_usd is not None:
        left = team.monthly_budget_usd - teams.spend(team=team).cost_usd
    if team.member_monthly_cap_usd is not None:
        mine = team.member_monthly_cap_usd - teams.spend(team=team, user=user).cost_usd
        left = mine if left is None else min(left, mine)
    return max(left, Decimal(0)) if left is not None else None


def provider_concurrency(model: ModelConfig) -> int:
    limit = model.provider.max_concurrency or 0
    return max(1, min(settings.BATCH_CONCURRENCY, limit) if limit else settings.BATCH_CONCURRENCY)


def estimate(
    *, user, team, model: ModelConfig, question: str, fields: list[dict], images: list
) -> dict:
    """Tokens, cost and duration of a batch before it starts. `images` are Attachments."""
    shared = text_tokens(prompt_text(question, fields)) + REQUEST_OVERHEAD_TOKENS
    output = expected_output_tokens(fields)
    prompt = 0
    for attachment in images:
        prompt += shared + sum(
            image_tokens(p.image.width, p.image.height) for p in attachment.parts.all()
        )
    completion = output * len(images)
    mode = batch_mode(model)
    # At the batch prices when a provider batch API will run it (what the items will cost).
    cost = item_cost(
        model=model, prompt=prompt, cached=0, completion=completion, batch_api=mode != "live"
    )
    left = budget_left(team=team, user=user)
    lanes = provider_concurrency(model)
    seconds = math.ceil(len(images) / lanes) * settings.BATCH_ITEM_SECONDS
    return {
        "items": len(images),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": str(cost),
        "budget_left_usd": None if left is None else str(left.quantize(Decimal("0.01"))),
        "fits_budget": left is None or cost <= left,
        "concurrency": lanes,
        "seconds": seconds,
        "mode": mode,
    }


def batch_mode(model: ModelConfig) -> str:
    """Which API runs the batch: Workers AI's async batch (queueRequest) on its /ai/run models;
    OpenAI-style /v1/batches on an OpenAI-compatible server where staff gave the model batch
    prices below its live ones (their word that the server has the Batch API, and it is
    cheaper); else the live chat API, item by item through the provider gate."""
    provider = model.provider
    if provider.kind == "workers_ai" and not provider.base_url.rstrip("/").endswith("/v1"):
        return "workers_ai"
    if (
        provider.kind == "openai_compat"
        and model.price_batch_input is not None
        and model.price_batch_output is not None
        and model.price_batch_input < model.price_input
    ):
        return "openai_batch"
    return "live"


def _money(amount) -> str:
    return f"${Decimal(amount):,.2f}"


# ---- create and control ---------------------------------------------------------------------


def batch_create(
    *,
    user,
    model: ModelConfig,
    question: str,
    fields_raw,
    attachment_ids: list[int],
    name: str = "",
    address: str = "",
) -> Batch:
    """Check everything, then commit the batch with its items and queue its job. A batch whose
    estimate is over the team's budget left is refused (ClientError budget_exceeded)."""
    question = (question or "").strip()
    if not question:
        raise ClientError("no_question", "Write the question to ask about every image.")
    if len(question) > MAX_QUESTION_CHARS:
        raise ClientError("too_long", f"The question is over {MAX_QUESTION_CHARS} characters.")
    if not model.vision:
        raise ClientError("no_vision", f"{model.display_name} cannot see images. Pick another.")
    fields = fields_clean(fields_raw)
    ids = [int(i) for i in attachment_ids if str(i).isdigit()]
    if not ids:
        raise ClientError("no_images", "Add the images to ask about.")
    if len(ids) > settings.BATCH_MAX_ITEMS:
        raise ClientError(
            "too_many",
            f"A batch takes at most {settings.BATCH_MAX_ITEMS} images ({len(ids)} given).",
        )
    images = images_for_batch(user, ids)
    team = teams.current_team_for(user)
    if (
        team is not None
        and not teams.restrict_models_for_team(
            ModelConfig.objects.filter(pk=model.pk), team
        ).exists()
    ):
        raise ClientError("model_unavailable", f"Team {team.name} may not use {model}.")
    guess = estimate(
        user=user, team=team, model=model, question=question, fields=fields, images=images
    )
    if not guess["fits_budget"]:
        raise ClientError(
            "budget_exceeded",
            f"This batch would cost about {_money(guess['cost_usd'])}, more than the "
            f"{_money(guess['budget_left_usd'])} left in team {team.name}'s budget this month. "
            "It was not started: use fewer images or ask a team admin for more budget.",
        )
    with transaction.atomic():
        batch = Batch.objects.create(
            owner=user,
            team=team,
            model=model,
            name=(name or "").strip()[:200] or question.splitlines()[0][:80],
            question=question,
            fields=fields,
            mode=guess["mode"],
            estimate=guess,
        )
        BatchItem.objects.bulk_create(
            BatchItem(batch=batch, position=i, attachment=a, filename=a.filename)
            for i, a in enumerate(images, start=1)
        )
        audit_record(
            actor=user,
            action="batch.started",
            obj=batch,
            changes={
                "items": len(images),
                "model": model.display_name,
                "mode": batch.mode,
                "estimated_cost_usd": guess["cost_usd"],
                "team": team.name if team else None,
            },
            address=address,
        )
    return batch


AUDIT_ACTIONS = {
    "pause": "batch.paused",
    "resume": "batch.resumed",
    "cancel": "batch.cancelled",
    "retry": "batch.retried",
}


def batch_set_status(*, batch: Batch, action: str, actor=None, address: str = "") -> Batch:
    """pause | resume | cancel | retry (failed and invalid items run again), audited in the
    same transaction. The caller queues a job when the batch comes back QUEUED
    (tasks.batch_control)."""
    with transaction.atomic():
        locked = Batch.objects.select_for_update().get(pk=batch.pk)
        before = locked.status
        detail: dict = {}
        if action == "pause":
            if locked.status not in ACTIVE:
                raise ClientError("not_running", "Only a running batch can be paused.")
            locked.status = Batch.Status.PAUSED
        elif action == "resume":
            if locked.status not in (Batch.Status.PAUSED, Batch.Status.BUDGET):
                raise ClientError("not_paused", "Only a paused batch can be resumed.")
            if locked.status == Batch.Status.BUDGET:
                left = budget_left(team=locked.team, user=locked.owner)
                if left is not None and left <= 0:
                    raise ClientError(
                        "budget_exceeded",
                        "The team's budget is still used up for this month; it cannot resume.",
                    )
            locked.status = Batch.Status.QUEUED
        elif action == "cancel":
            if locked.status in (Batch.Status.COMPLETE, Batch.Status.CANCELLED):
                raise ClientError("finished", "This batch has already ended.")
            locked.status = Batch.Status.CANCELLED
            # Items not yet sent end here; a running one is stopped by its runner.
            locked.items.filter(status=BatchItem.Status.PENDING).update(
                status=BatchItem.Status.CANCELLED, finished_at=timezone.now()
            )
        elif action == "retry":
            retried = locked.items.filter(
                status__in=(BatchItem.Status.FAILED, BatchItem.Status.INVALID)
            ).update(status=BatchItem.Status.PENDING, error="", claim="", request_id="")
            if not retried:
                raise ClientError("nothing_to_retry", "No failed items to retry.")
            detail["items"] = retried
            if locked.status not in ACTIVE:
                locked.status = Batch.Status.QUEUED
        else:
            raise ClientError("bad_action", "Unknown action.")
        locked.save(update_fields=["status", "updated_at"])
        audit_record(
            actor=actor,
            action=AUDIT_ACTIONS[action],
            obj=locked,
            changes={"status": [before, locked.status], **detail},
            address=address,
        )
    return locked


@transaction.atomic
def batch_delete(*, batch: Batch, actor=None, address: str = "") -> None:
    """Delete a batch with its items and images (files no other message uses go too). Usage
    records stay: the spend happened."""
    audit_record(
        actor=actor,
        action="batch.deleted",
        obj=batch,
        changes={"items": batch.items.count()},
        address=address,
    )
    attachments = Attachment.objects.filter(batch_item__batch=batch)
    image_ids = _image_ids_of(attachments)
    Batch.objects.filter(pk=batch.pk).update(status=Batch.Status.CANCELLED)
    attachments.delete()
    batch.delete()
    _delete_unreferenced(image_ids)


# ---- claims (the runner's side) -------------------------------------------------------------


def _lease() -> dt.datetime:
    return timezone.now() + timedelta(seconds=settings.BATCH_LEASE_SECONDS)


def batch_begin(*, batch_id: int) -> Batch | None:
    """Mark a queued (or orphaned running) batch running with a fresh lease; None when it has
    nothing to do (paused, cancelled, complete, deleted)."""
    updated = Batch.objects.filter(pk=batch_id, status__in=ACTIVE).update(
        status=Batch.Status.RUNNING, lease_expires_at=_lease(), updated_at=timezone.now()
    )
    if not updated:
        return None
    return Batch.objects.select_related("model__provider", "team", "owner").get(pk=batch_id)


def batch_heartbeat(*, batch_id: int, claim: str) -> str:
    """Renew the batch's and this runner's items' leases; -> the batch's status now."""
    lease = _lease()
    Batch.objects.filter(pk=batch_id, status=Batch.Status.RUNNING).update(lease_expires_at=lease)
    BatchItem.objects.filter(
        batch_id=batch_id,
        claim=claim,
        status__in=(BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED),
    ).update(lease_expires_at=lease)
    status = Batch.objects.filter(pk=batch_id).values_list("status", flat=True).first()
    return status or Batch.Status.CANCELLED


def _claimable(now: dt.datetime) -> Q:
    return Q(status=BatchItem.Status.PENDING) | Q(
        status__in=(BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED), lease_expires_at__lt=now
    )


def item_claim(*, batch_id: int, claim: str) -> BatchItem | None:
    """Take the next item nobody holds (pending, or held by a runner whose lease ran out)."""
    now = timezone.now()
    for pk in (
        BatchItem.objects.filter(_claimable(now), batch_id=batch_id)
        .order_by("position")[:5]
        .values_list("pk", flat=True)
    ):
        # Compare-and-set: of two runners racing for one item, one update matches.
        taken = (
            BatchItem.objects.filter(_claimable(now), pk=pk)
            .exclude(status=BatchItem.Status.SUBMITTED)
            .update(status=BatchItem.Status.RUNNING, claim=claim, lease_expires_at=_lease())
        )
        if taken:
            return BatchItem.objects.select_related("attachment").get(pk=pk)
    return None


def items_claim_many(*, batch_id: int, claim: str, limit: int) -> list[BatchItem]:
    """Up to `limit` items for one async provider batch (the Workers AI path)."""
    taken = []
    while len(taken) < limit:
        item = item_claim(batch_id=batch_id, claim=claim)
        if item is None:
            break
        taken.append(item)
    return taken


def items_submitted(*, claim: str, item_ids: list[int], request_id: str) -> None:
    """The provider has the items (its request id is kept, so a restarted runner polls it
    instead of sending them again)."""
    BatchItem.objects.filter(pk__in=item_ids, claim=claim).update(
        status=BatchItem.Status.SUBMITTED,
        request_id=request_id,
        lease_expires_at=_lease(),
        answer="",
        error="",
    )


def items_resubmitted(*, claim: str, request_id: str, retries: dict[int, dict]) -> None:
    """Items whose answer failed the schema, asked once more under `request_id`: the first
    answer, its validation error and its usage are kept on the item (a non-empty error on a
    submitted item marks its second answer, also for a runner taking over after a crash)."""
    for pk, first in retries.items():
        BatchItem.objects.filter(
            pk=pk,
            claim=claim,
            status__in=(BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED),
        ).update(
            status=BatchItem.Status.SUBMITTED,
            request_id=request_id,
            lease_expires_at=_lease(),
            answer=first["answer"],
            error=first["error"] or "The answer does not fit the requested format.",
            prompt_tokens=first["prompt"],
            cached_tokens=first["cached"],
            completion_tokens=first["completion"],
        )


def items_in_retry(*, item_ids: list[int]) -> dict[int, dict]:
    """Of these submitted items, those waiting for their schema retry's answer -> the first
    answer, its error and its usage."""
    rows = (
        BatchItem.objects.filter(pk__in=item_ids, status=BatchItem.Status.SUBMITTED)
        .exclude(error="")
        .values_list("pk", "answer", "error", "prompt_tokens", "cached_tokens", "completion_tokens")
    )
    return {
        pk: {"answer": a, "error": e, "prompt": p, "cached": c, "completion": n}
        for pk, a, e, p, c, n in rows
    }


def items_submitted_orphans(*, batch_id: int, claim: str) -> dict[str, list[int]]:
    """Submitted items whose runner died: take them over, by request id."""
    now = timezone.now()
    rows = BatchItem.objects.filter(
        batch_id=batch_id, status=BatchItem.Status.SUBMITTED, lease_expires_at__lt=now
    ).values_list("pk", "request_id")
    found: dict[str, list[int]] = {}
    for pk, request_id in rows:
        taken = BatchItem.objects.filter(
            pk=pk, status=BatchItem.Status.SUBMITTED, lease_expires_at__lt=now
        ).update(claim=claim, lease_expires_at=_lease())
        if taken:
            found.setdefault(request_id, []).append(pk)
    return found


def items_open_elsewhere(*, batch_id: int) -> bool:
    """Items another live runner still holds."""
    return BatchItem.objects.filter(
        batch_id=batch_id,
        status__in=(BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED),
        lease_expires_at__gte=timezone.now(),
    ).exists()


def item_cost(*, model: ModelConfig, prompt: int, cached: int, completion: int, batch_api: bool):
    """Priced at the model's batch prices when the provider's batch API ran it (where set)."""
    cost = reply_cost(
        model=model, prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion
    )
    batch_in, batch_out = model.price_batch_input, model.price_batch_output
    if batch_api and batch_in is not None and batch_out is not None:
        cost = ((prompt * batch_in + completion * batch_out) / Decimal(1_000_000)).quantize(
            Decimal("0.000001")
        )
    return cost


def item_finish(
    *,
    item_id: int,
    claim: str,
    status: str,
    answer: str = "",
    values: dict | None = None,
    error: str = "",
    prompt: int = 0,
    cached: int = 0,
    completion: int = 0,
    batch_api: bool = False,
    attempts: int = 1,
) -> BatchItem | None:
    """The one place an item reaches its end: only while this claim still holds it; its usage
    record in the same transaction. None when the claim was lost (another runner has it)."""
    with transaction.atomic():
        item = (
            # Only the item row is locked (the model join is nullable: PostgreSQL refuses FOR
            # UPDATE on an outer join's nullable side).
            BatchItem.objects.select_for_update(of=("self",))
            .select_related("batch__model__provider", "batch__owner")
            .filter(
                pk=item_id,
                claim=claim,
                status__in=(BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED),
            )
            .first()
        )
        if item is None:
            return None
        batch = item.batch
        model = batch.model
        cost = (
            item_cost(
                model=model,
                prompt=prompt,
                cached=cached,
                completion=completion,
                batch_api=batch_api,
            )
            if model is not None
            else Decimal(0)
        )
        item.status = status
        item.answer = answer
        item.values = values
        item.error = error
        item.prompt_tokens = prompt
        item.cached_tokens = cached
        item.completion_tokens = completion
        item.cost_usd = cost
        item.attempts = item.attempts + attempts
        item.lease_expires_at = None
        item.finished_at = timezone.now()
        item.save()
        # Every item that ends writes its record, a failure too (at what it cost, usually
        # nothing), as a chat reply does; a retried item writes one per run.
        UsageRecord.objects.create(
            user_id=batch.owner_id,
            team_id=batch.team_id,
            batch=batch,
            batch_item=item,
            batch_name=f"{str(batch)[:180]} (#{batch.pk})",
            model=model,
            model_name=model.display_name if model else "",
            provider_name=model.provider.name if model else "",
            status=status,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            cost_usd=cost,
            created_at=teams.now(),
        )
    return item


def item_release(*, item_id: int, claim: str, cancelled: bool) -> BatchItem | None:
    """A runner stopping mid-item: back to pending (pause, shutdown) or cancelled (cancel)."""
    status = BatchItem.Status.CANCELLED if cancelled else BatchItem.Status.PENDING
    updated = BatchItem.objects.filter(
        pk=item_id, claim=claim, status__in=(BatchItem.Status.RUNNING, BatchItem.Status.SUBMITTED)
    ).update(status=status, claim="", lease_expires_at=None, request_id="")
    return BatchItem.objects.filter(pk=item_id).first() if updated else None


def batch_over_budget(*, batch: Batch) -> bool:
    left = budget_left(team=batch.team, user=batch.owner)
    return left is not None and left <= 0


def batch_end(*, batch_id: int, budget: bool = False) -> Batch | None:
    """The runner ran out of items (complete) or of budget (paused with that status)."""
    if budget:
        with transaction.atomic():
            if Batch.objects.filter(pk=batch_id, status=Batch.Status.RUNNING).update(
                status=Batch.Status.BUDGET, lease_expires_at=None
            ):
                audit_record(
                    actor=None,
                    actor_name="batch runner",
                    action="batch.paused",
                    obj=Batch.objects.get(pk=batch_id),
                    changes={"status": [Batch.Status.RUNNING, Batch.Status.BUDGET]},
                )
    elif not BatchItem.objects.filter(batch_id=batch_id, status__in=OPEN_ITEMS).exists():
        Batch.objects.filter(pk=batch_id, status=Batch.Status.RUNNING).update(
            status=Batch.Status.COMPLETE, lease_expires_at=None
        )
    return Batch.objects.filter(pk=batch_id).first()


def batches_stale(*, queued_ids_without_job) -> list[int]:
    """Batches to queue again: running ones whose runner's lease ran out (a worker died, the
    server restarted), and queued ones whose job is gone (`queued_ids_without_job` filters)."""
    now = timezone.now()
    stale = Batch.objects.filter(status=Batch.Status.RUNNING, lease_expires_at__lt=now)
    revived = []
    for pk in stale.values_list("pk", flat=True):
        # Compare-and-set: of two processes recovering at once, one queues the job.
        if Batch.objects.filter(
            pk=pk, status=Batch.Status.RUNNING, lease_expires_at__lt=now
        ).update(status=Batch.Status.QUEUED, lease_expires_at=None):
            revived.append(pk)
    queued = Batch.objects.filter(status=Batch.Status.QUEUED).exclude(pk__in=revived)
    return revived + queued_ids_without_job(list(queued.values_list("pk", flat=True)))


# ---- what the page shows --------------------------------------------------------------------


def item_to_dict(item: BatchItem) -> dict:
    return {
        "id": item.pk,
        "position": item.position,
        "filename": item.filename,
        "thumbnail": f"/attachments/{item.attachment_id}/thumbnail/"
        if item.attachment_id
        else None,
        "status": item.status,
        "answer": item.answer,
        "values": item.values,
        "error": item.error,
        "prompt_tokens": item.prompt_tokens,
        "cached_tokens": item.cached_tokens,
        "completion_tokens": item.completion_tokens,
        "cost_usd": str(item.cost_usd),
    }


def batch_progress(batch: Batch) -> dict:
    counts = dict(batch.items.values("status").annotate(n=Count("id")).values_list("status", "n"))
    totals = batch.items.aggregate(
        prompt=Sum("prompt_tokens"),
        cached=Sum("cached_tokens"),
        completion=Sum("completion_tokens"),
        cost=Sum("cost_usd"),
    )
    total = sum(counts.values())
    prompt, cached = totals["prompt"] or 0, totals["cached"] or 0
    ended = sum(counts.get(s, 0) for s in (*FINISHED_ITEMS, "failed", "cancelled"))
    saved = cache_savings(model=batch.model, cached_tokens=cached) if batch.model else Decimal(0)
    return {
        "total": total,
        "ended": ended,
        "counts": counts,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": totals["completion"] or 0,
        "cost_usd": str((totals["cost"] or Decimal(0)).quantize(Decimal("0.000001"))),
        "cache_share": round(cached / prompt, 4) if prompt else None,
        "cache_saved_usd": str(saved),
    }


STATUS_TEXT = {
    Batch.Status.QUEUED: "Queued: waiting for a worker",
    Batch.Status.RUNNING: "Running",
    Batch.Status.PAUSED: "Paused",
    Batch.Status.BUDGET: "Paused: the team's monthly budget is used up. Resume once there is budget again.",
    Batch.Status.COMPLETE: "Complete",
    Batch.Status.CANCELLED: "Cancelled",
}


def batch_to_dict(batch: Batch) -> dict:
    return {
        "id": batch.pk,
        "name": str(batch),
        "question": batch.question,
        "fields": batch.fields,
        "model": batch.model.display_name if batch.model else "",
        "status": batch.status,
        "status_text": STATUS_TEXT.get(batch.status, batch.status),
        "mode": batch.mode,
        "estimate": batch.estimate,
        "progress": batch_progress(batch),
    }


def batch_state(*, batch_id: int) -> dict:
    batch = Batch.objects.select_related("model").get(pk=batch_id)
    return {"batch": batch_to_dict(batch), "items": [item_to_dict(i) for i in batch.items.all()]}


def batch_item_event(*, item_id: int) -> tuple[int, dict, dict]:
    item = BatchItem.objects.select_related("batch__model").get(pk=item_id)
    return item.batch_id, item_to_dict(item), batch_to_dict(item.batch)


def batches_for_user(user) -> list[Batch]:
    return list(Batch.objects.filter(owner=user).select_related("model")[:50])


def attachment_size_label(attachment: Attachment) -> str:
    parts = [p.image for p in attachment.parts.all()]
    return f"{parts[0].width}×{parts[0].height}, {format_bytes(sum(p.bytes for p in parts))}"


# ---- exports --------------------------------------------------------------------------------


def _columns(batch: Batch) -> list[str]:
    answer_columns = [f["name"] for f in batch.fields] if batch.fields else ["answer"]
    return [
        "item",
        "file",
        "status",
        *answer_columns,
        "error",
        "raw_answer",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_usd",
    ]


def _row(batch: Batch, item: BatchItem) -> list:
    if batch.fields:
        values = item.values or {}
        answers = [values.get(f["name"]) for f in batch.fields]
        raw = item.answer if item.status == BatchItem.Status.INVALID else ""
    else:
        answers = [item.answer]
        raw = ""
    answers = [
        "" if v is None else ("yes" if v is True else "no" if v is False else v) for v in answers
    ]
    return [
        item.position,
        item.filename,
        item.status,
        *answers,
        item.error,
        raw,
        item.prompt_tokens,
        item.cached_tokens,
        item.completion_tokens,
        item.cost_usd,
    ]


def _spreadsheet_safe(value):
    """Cells a spreadsheet would run as a formula start with a quote instead."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def batch_exported(*, batch: Batch, actor, fmt: str, address: str = "") -> None:
    audit_record(
        actor=actor,
        action="batch.exported",
        obj=batch,
        changes={"format": fmt, "items": batch.items.count()},
        address=address,
    )


def export_csv(batch: Batch, *, excel: bool = False) -> str:
    """Fields as columns. `excel`: a UTF-8 byte order mark, CRLF rows and formula-safe cells,
    so Excel (and LibreOffice) opens it with the right characters as a spreadsheet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n" if excel else "\n")
    writer.writerow(_columns(batch))
    for item in batch.items.all():
        row = _row(batch, item)
        writer.writerow([_spreadsheet_safe(v) for v in row] if excel else row)
    return ("\ufeff" if excel else "") + out.getvalue()


def export_jsonl(batch: Batch) -> str:
    lines = []
    for item in batch.items.all():
        entry = {
            "item": item.position,
            "file": item.filename,
            "status": item.status,
            "values" if batch.fields else "answer": item.values if batch.fields else item.answer,
            "error": item.error or None,
            "usage": {
                "prompt_tokens": item.prompt_tokens,
                "cached_tokens": item.cached_tokens,
                "completion_tokens": item.completion_tokens,
            },
            "cost_usd": str(item.cost_usd),
        }
        if batch.fields and item.status == BatchItem.Status.INVALID:
            entry["raw_answer"] = item.answer
        lines.append(json.dumps(entry, ensure_ascii=False))
    return "\n".join(lines) + ("\n" if lines else "")


# ---- follow-up ------------------------------------------------------------------------------


@transaction.atomic
def item_open_conversation(*, item: BatchItem, user) -> Conversation:
    """A normal conversation holding the item's question, image and answer, to ask more."""
    batch = item.batch
    conversation = Conversation.objects.create(
        owner=user, team=batch.team, model=batch.model, title=f"{batch} #{item.position}"[:200]
    )
    question = Message.objects.create(
        conversation=conversation,
        role=Message.Role.USER,
        content=prompt_text(batch.question, batch.fields),
    )
    source = item.attachment
    if source is not None:
        copy = Attachment.objects.create(
            owner=user,
            conversation=conversation,
            message=question,
            filename=source.filename,
            source_format=source.source_format,
            source_width=source.source_width,
            source_height=source.source_height,
            thumbnail=source.thumbnail,
        )
        AttachmentPart.objects.bulk_create(
            AttachmentPart(attachment=copy, index=p.index, image_id=p.image_id)
            for p in source.parts.all()
        )
    Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        content=item.answer or item.error,
        status=Message.Status.COMPLETE,
        model=batch.model,
    )
    return conversation


def new_claim() -> str:
    return f"{PROCESS_ID}:{uuid.uuid4().hex[:8]}"[:64]
