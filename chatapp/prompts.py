"""The prompt library: saved prompts with a title, text and optional {{variables}}.

Personal (the owner's) or a team's (curated by its admins and staff, read by its members);
access.py holds the rules. Typing "/" at the start of the composer lists them (static
chatapp/prompts.js); the prompts page creates, edits, imports and exports them.

Changes to a team's prompts are audited in their transaction. Import/export is a JSON document
{"format": "kimichat.prompts.v1", "prompts": [{"title", "text"}]}. Synchronous ORM code; raises
ClientError for input the user must correct.
"""

import json
import re

from django.db import transaction

from . import audit
from .access import prompt_may_curate, prompts_for_user
from .errors import ClientError
from .models import SavedPrompt, Team

FORMAT = "kimichat.prompts.v1"
TITLE_MAX = 200
TEXT_MAX = 20_000
IMPORT_MAX_PROMPTS = 500
IMPORT_MAX_BYTES = 2 * 1024 * 1024
VARIABLE = re.compile(r"\{\{\s*([^{}\n]{1,60}?)\s*\}\}")


def variables(text: str) -> list[str]:
    """The distinct {{variable}} names in order of first appearance."""
    seen: list[str] = []
    for name in VARIABLE.findall(text or ""):
        if name not in seen:
            seen.append(name)
    return seen


def prompt_to_dict(prompt: SavedPrompt, *, user=None) -> dict:
    return {
        "id": prompt.pk,
        "title": prompt.title,
        "text": prompt.text,
        "variables": variables(prompt.text),
        "team": prompt.team.name if prompt.team_id else None,
        "team_id": prompt.team_id,
        "may_edit": prompt_may_curate(user, prompt) if user is not None else False,
    }


def prompt_list(user, *, query: str = "") -> list[dict]:
    """Every prompt the user may use (personal first, then their teams'), optionally filtered by
    words in the title or text."""
    rows = prompts_for_user(user).order_by("team__name", "title", "id")
    words = query.lower().split()
    result = []
    for prompt in rows:
        haystack = f"{prompt.title}\n{prompt.text}".lower()
        if all(word in haystack for word in words):
            result.append(prompt_to_dict(prompt, user=user))
    # Personal prompts first (team None sorts last in SQL on some databases).
    result.sort(key=lambda p: p["team"] is not None)
    return result


def _clean(title, text) -> tuple[str, str]:
    title = " ".join(str(title or "").split())
    text = str(text or "").strip()
    if not title:
        raise ClientError("empty_title", "Give the prompt a title.")
    if len(title) > TITLE_MAX:
        raise ClientError("title_too_long", f"Titles are limited to {TITLE_MAX} characters.")
    if not text:
        raise ClientError("empty_text", "Write the prompt's text.")
    if len(text) > TEXT_MAX:
        raise ClientError("text_too_long", f"Prompts are limited to {TEXT_MAX:,} characters.")
    return title, text


def _audit(user, action, prompt, changes, request) -> None:
    """Team prompts are shared material: their changes are audited (personal ones are not)."""
    if prompt.team_id is not None:
        audit.audit_record(actor=user, action=action, obj=prompt, changes=changes, request=request)


def prompt_create(*, user, title, text, team: Team | None = None, request=None) -> SavedPrompt:
    """The caller resolved `team` through access.team_get_for_curator."""
    title, text = _clean(title, text)
    with transaction.atomic():
        prompt = SavedPrompt.objects.create(
            title=title, text=text, owner=None if team else user, team=team, created_by=user
        )
        _audit(
            user,
            "prompt.created",
            prompt,
            {"title": [None, title], "text": [None, text], "team": [None, str(team)]}
            if team
            else {},
            request,
        )
    return prompt


def prompt_update(*, prompt: SavedPrompt, user, title, text, request=None) -> SavedPrompt:
    title, text = _clean(title, text)
    before = {"title": prompt.title, "text": prompt.text}
    prompt.title, prompt.text = title, text
    with transaction.atomic():
        prompt.save(update_fields=["title", "text", "updated_at"])
        changes = audit.diff(before, {"title": title, "text": text})
        if changes:
            _audit(user, "prompt.changed", prompt, changes, request)
    return prompt


def prompt_delete(*, prompt: SavedPrompt, user, request=None) -> None:
    with transaction.atomic():
        _audit(
            user,
            "prompt.deleted",
            prompt,
            {"title": [prompt.title, None], "text": [prompt.text, None]},
            request,
        )
        prompt.delete()


# ---- import / export ---------------------------------------------------------------------------


def prompts_export(*, user, team: Team | None) -> str:
    """The user's personal prompts, or `team`'s, as a JSON document."""
    rows = prompts_for_user(user)
    rows = rows.filter(team=team) if team else rows.filter(owner=user)
    document = {
        "format": FORMAT,
        "scope": team.name if team else "personal",
        "prompts": [{"title": p.title, "text": p.text} for p in rows.order_by("title", "id")],
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


def prompts_import(*, user, data: bytes, team: Team | None, request=None) -> dict:
    """Add the document's prompts to the user's personal library (or `team`'s). All or
    nothing; a prompt whose title and text are already there is skipped, not duplicated."""
    if len(data) > IMPORT_MAX_BYTES:
        raise ClientError("too_large", "That file is too large for a prompt library.")
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        raise ClientError(
            "bad_json", "That file is not JSON. Export a library to see the format."
        ) from None
    if isinstance(document, list):
        items = document
    elif isinstance(document, dict) and isinstance(document.get("prompts"), list):
        items = document["prompts"]
    else:
        raise ClientError(
            "bad_format", 'The file must hold {"prompts": [{"title": …, "text": …}, …]}.'
        )
    if len(items) > IMPORT_MAX_PROMPTS:
        raise ClientError(
            "too_many", f"A file can hold at most {IMPORT_MAX_PROMPTS} prompts; this one has more."
        )
    cleaned = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ClientError("bad_format", f"Prompt {number} is not an object with a title.")
        try:
            cleaned.append(_clean(item.get("title"), item.get("text")))
        except ClientError as exc:
            raise ClientError(exc.code, f"Prompt {number}: {exc.message}") from None
    existing = prompts_for_user(user)
    existing = existing.filter(team=team) if team else existing.filter(owner=user)
    have = set(existing.values_list("title", "text"))
    added = skipped = 0
    with transaction.atomic():
        for title, text in cleaned:
            if (title, text) in have:
                skipped += 1
                continue
            have.add((title, text))
            prompt_create(user=user, title=title, text=text, team=team, request=request)
            added += 1
    return {"added": added, "skipped": skipped}
