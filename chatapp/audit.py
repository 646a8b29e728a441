"""The audit log: who did what, to what, from where, and when.

`audit_record` writes one AuditEntry in the caller's transaction (a plain INSERT through the
default connection), so an entry exists exactly when the change it records was committed: call it
inside the same `transaction.atomic` block as the change. It never reads the request body and
never stores secrets: a provider's API key shows as "set" / "replaced" / "", passwords never.

The client address is `client_ip(request)`: REMOTE_ADDR, which the ASGI front rewrites from
X-Forwarded-For as far as TRUSTED_PROXIES allows; it is the only function that reads it
(log-in throttling uses it too, through accounts.py).

Entries are never edited: the admin shows them read-only, and the only delete is retention
(`audit_purge`, run by `manage.py prepare` and `manage.py purge_audit`), which removes entries
older than AUDIT_RETENTION_DAYS (0 keeps them forever).
"""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models

from . import teams
from .models import AuditEntry

# What the admin may change, and which fields of each object the log shows before -> after.
# Secrets (password hashes, API keys) never appear; they are summarised by `_secret_state`.
SKIPPED_FIELDS = {
    "password",
    "last_login",
    "api_key",
    "client_secret",
    "created_at",
    "updated_at",
    "date_joined",
}


def client_ip(request) -> str:
    """The client's address as trusted per the proxy setting ("" when there is no request)."""
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


def _actor_name(actor) -> str:
    if actor is None or not getattr(actor, "is_authenticated", False):
        return ""
    return actor.get_username()


def audit_record(
    *,
    actor,
    action: str,
    obj: models.Model | None = None,
    changes: dict | None = None,
    request=None,
    address: str | None = None,
    actor_name: str | None = None,
) -> AuditEntry:
    """Write one entry (in the caller's transaction).

    actor: the user who acted (None or AnonymousUser for a failed log-in or the system);
    action: a dotted name such as "login.failure" or "team.changed";
    obj: the object acted on; changes: {"field": [before, after]} or any small JSON detail;
    address: the client address when there is no request (a websocket passes its scope's).
    """
    user = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    if address is None:
        address = client_ip(request)
    return AuditEntry.objects.create(
        actor=user,
        actor_name=(actor_name if actor_name is not None else _actor_name(actor))[:150],
        action=action[:64],
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(obj.pk) if obj is not None and obj.pk is not None else "",
        object_repr=str(obj)[:200] if obj is not None else "",
        changes=_jsonable(changes or {}),
        address=(address or "")[:64],
    )


# ---- before -> after of a model object --------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def snapshot(obj: models.Model) -> dict:
    """The object's recordable state: concrete fields, many-to-many and team memberships.

    Costs a few queries (one per many-to-many and one for memberships): admin saves only.
    """
    state: dict[str, Any] = {}
    if obj is None or obj.pk is None:
        return state
    for field in obj._meta.concrete_fields:
        if field.name in SKIPPED_FIELDS:
            continue
        if field.is_relation:
            related = getattr(obj, field.name, None)
            state[field.name] = str(related) if related is not None else None
        else:
            state[field.name] = _jsonable(field.value_from_object(obj))
    for field in obj._meta.many_to_many:
        state[field.name] = sorted(str(o) for o in getattr(obj, field.name).all())
    if hasattr(obj, "api_key"):
        state["api_key"] = "set" if obj.api_key else ""
    if hasattr(obj, "client_secret"):  # an identity provider's (oidc.py)
        state["client_secret"] = "set" if obj.client_secret else ""
    if hasattr(obj, "memberships"):
        rows = obj.memberships.select_related("user", "team")
        state["memberships"] = sorted(
            f"{m.user.get_username()} in {m.team.name} ({m.role})" for m in rows
        )
    return state


def diff(before: dict, after: dict) -> dict:
    """{"field": [before, after]} for every field whose value changed (added/removed too)."""
    return {
        key: [before.get(key), after.get(key)]
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


# ---- retention and reporting -----------------------------------------------------------------


def audit_purge() -> int:
    """Delete entries older than AUDIT_RETENTION_DAYS (0 = keep forever). -> rows deleted."""
    days = settings.AUDIT_RETENTION_DAYS
    if days <= 0:
        return 0
    deleted, _ = AuditEntry.objects.filter(
        created_at__lt=teams.now() - timedelta(days=days)
    ).delete()
    return deleted


def audit_search(*, query: str = "", action: str = "", actor: str = "") -> models.QuerySet:
    """Entries, newest first, filtered by free text (object, actor, address), action prefix and
    actor name."""
    entries = AuditEntry.objects.all()
    if action:
        entries = entries.filter(action__startswith=action)
    if actor:
        entries = entries.filter(actor_name__iexact=actor)
    if query:
        entries = entries.filter(
            models.Q(object_repr__icontains=query)
            | models.Q(actor_name__icontains=query)
            | models.Q(address__icontains=query)
            | models.Q(object_type__icontains=query)
        )
    return entries.order_by("-created_at", "-id")


def change_text(changes: dict) -> str:
    """One line per field: `field: before → after` (other details as `key: value`)."""
    lines = []
    for key, value in (changes or {}).items():
        if isinstance(value, list) and len(value) == 2:
            lines.append(f"{key}: {_show(value[0])} → {_show(value[1])}")
        else:
            lines.append(f"{key}: {_show(value)}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


CSV_HEADER = [
    "time (UTC)",
    "actor",
    "action",
    "object type",
    "object id",
    "object",
    "change",
    "address",
]


def csv_text(entries) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for entry in entries.iterator():
        writer.writerow(
            [
                entry.created_at.isoformat(),
                entry.actor_name,
                entry.action,
                entry.object_type,
                entry.object_id,
                entry.object_repr,
                change_text(entry.changes),
                entry.address,
            ]
        )
    return out.getvalue()
