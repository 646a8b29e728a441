"""Teams: membership, the current team, model access, budgets, the per-user rate limit and usage.

Rules (also in the README):
- A user may belong to several teams and picks the current one; a new conversation is started
  under (and charged to) the current team. A user in no team has no team limits (the first
  administrator of a fresh install, single-user setups).
- A team's allowed models restrict the picker and the server; none selected = every enabled model.
- Budgets are checked before the upstream call: the team's spend this month (and, with a cap,
  the member's spend within the team) must be below the limit. "Exactly at budget" is refused.
  The check is not a reservation: a reply already in flight may take the spend past the limit.
- Months are calendar months in settings.TIME_ZONE; spend resets at 00:00 on the 1st.
- One UsageRecord per reply that reached a terminal state, priced by pricing.reply_cost.

Synchronous ORM code; async callers go through database_sync_to_async.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.core.cache import caches
from django.db import transaction
from django.db.models import Count, QuerySet, Sum
from django.utils import timezone

from .errors import ClientError
from .models import Conversation, Membership, Message, ModelConfig, Team, UsageRecord
from .pricing import reply_cost

ZERO = Decimal(0)


def now() -> dt.datetime:
    """The clock seam: tests freeze time by patching this."""
    return timezone.now()


# ---- months ---------------------------------------------------------------------------------


def month_bounds(moment: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the calendar month holding `moment`, in the configured time zone."""
    local = timezone.localtime(moment or now())
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    # Re-localise: the offset may differ across a daylight-saving change.
    tz = timezone.get_current_timezone()
    return (
        timezone.make_aware(start.replace(tzinfo=None), tz),
        timezone.make_aware(end.replace(tzinfo=None), tz),
    )


def parse_month(text: str | None) -> dt.datetime:
    """'2026-11' -> an aware moment inside that month; the current month when empty or bad."""
    if text:
        try:
            year, month = (int(part) for part in text.split("-", 1))
            return timezone.make_aware(dt.datetime(year, month, 15))
        except (ValueError, OverflowError):
            pass
    return now()


# ---- membership -----------------------------------------------------------------------------


def memberships_for(user) -> list[Membership]:
    if not user.is_authenticated:
        return []
    return list(Membership.objects.filter(user=user).select_related("team"))


def current_membership(user) -> Membership | None:
    """The chosen membership, else the oldest one, else None (a user in no team)."""
    if not user.is_authenticated:
        return None
    return (
        Membership.objects.filter(user=user)
        .select_related("team")
        .order_by("-is_current", "created_at", "id")
        .first()
    )


def current_team_for(user) -> Team | None:
    membership = current_membership(user)
    return membership.team if membership else None


@transaction.atomic
def membership_set(*, user, team: Team, role: str = Membership.Role.MEMBER) -> Membership:
    """Put the user in the team with this role (idempotent); the first team becomes current."""
    membership, created = Membership.objects.get_or_create(
        user=user, team=team, defaults={"role": role}
    )
    if not created and membership.role != role:
        membership.role = role
        membership.save(update_fields=["role"])
    if not Membership.objects.filter(user=user, is_current=True).exists():
        team_choose(user=user, team=team)
        membership.is_current = True
    return membership


@transaction.atomic
def membership_move(*, user, team: Team) -> Membership:
    """Move the user to `team` only (keeping their role), and make it current."""
    old = Membership.objects.filter(user=user).order_by("-is_current").first()
    role = old.role if old else Membership.Role.MEMBER
    Membership.objects.filter(user=user).exclude(team=team).delete()
    membership = membership_set(user=user, team=team, role=role)
    team_choose(user=user, team=team)
    return membership


@transaction.atomic
def team_choose(*, user, team: Team) -> None:
    """Make `team` the user's current team; they must be a member."""
    if not Membership.objects.filter(user=user, team=team).exists():
        raise Membership.DoesNotExist("Not a member of that team")
    Membership.objects.filter(user=user).exclude(team=team).update(is_current=False)
    Membership.objects.filter(user=user, team=team).update(is_current=True)


def is_team_admin(user, team: Team | None = None) -> bool:
    if not user.is_authenticated or not user.is_active:
        return False
    admin = Membership.objects.filter(user=user, role=Membership.Role.ADMIN)
    return admin.filter(team=team).exists() if team else admin.exists()


def teams_administered_by(user) -> list[Team]:
    """Teams whose page this user may see: their own as team admin; every team for staff."""
    if not user.is_authenticated or not user.is_active:
        return []
    if user.is_staff:
        return list(Team.objects.all())
    return list(
        Team.objects.filter(memberships__user=user, memberships__role=Membership.Role.ADMIN)
    )


# ---- models ---------------------------------------------------------------------------------


def restrict_models(queryset: QuerySet, user) -> QuerySet:
    """Narrow a ModelConfig queryset to what the user's current team may use."""
    return restrict_models_for_team(queryset, current_team_for(user))


def restrict_models_for_team(queryset: QuerySet, team: Team | None) -> QuerySet:
    if team is None:
        return queryset
    allowed = list(team.allowed_models.values_list("pk", flat=True))
    return queryset.filter(pk__in=allowed) if allowed else queryset


# ---- spend ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spend:
    cost_usd: Decimal
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    replies: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def spend(*, moment: dt.datetime | None = None, **filters) -> Spend:
    """Totals of the usage records matching `filters` in the month holding `moment`."""
    start, end = month_bounds(moment)
    totals = UsageRecord.objects.filter(
        created_at__gte=start, created_at__lt=end, **filters
    ).aggregate(
        cost=Sum("cost_usd"),
        prompt=Sum("prompt_tokens"),
        cached=Sum("cached_tokens"),
        completion=Sum("completion_tokens"),
        replies=Count("id"),
    )
    return Spend(
        cost_usd=totals["cost"] or ZERO,
        prompt_tokens=totals["prompt"] or 0,
        cached_tokens=totals["cached"] or 0,
        completion_tokens=totals["completion"] or 0,
        replies=totals["replies"] or 0,
    )


def _money(amount: Decimal) -> str:
    return f"${amount:,.2f}"


def _reset_text(end: dt.datetime) -> str:
    local = timezone.localtime(end)
    return f"{local.day} {local:%B %Y} (00:00 {local:%Z})"


# ---- the send gate --------------------------------------------------------------------------


def budget_check(*, conversation: Conversation, user) -> None:
    """Refuse (ClientError) a send when the conversation's team is at its budget or the user at
    their cap, or the conversation's model is not allowed for its team."""
    team = conversation.team
    if team is None:
        return
    if not Membership.objects.filter(user=user, team=team).exists():
        raise ClientError(
            "not_in_team",
            f"This conversation is charged to team {team.name}, which you are no longer in. "
            "Start a new chat.",
        )
    if conversation.model_id is not None:
        allowed = restrict_models_for_team(
            ModelConfig.objects.filter(pk=conversation.model_id), team
        )
        if not allowed.exists():
            raise ClientError(
                "model_unavailable",
                f"Team {team.name} may not use {conversation.model}. Pick another model.",
            )
    _, end = month_bounds()
    if team.monthly_budget_usd is not None:
        spent = spend(team=team).cost_usd
        if spent >= team.monthly_budget_usd:
            raise ClientError(
                "budget_exceeded",
                f"Team {team.name} has reached its monthly budget of "
                f"{_money(team.monthly_budget_usd)}: {_money(spent)} spent this month. "
                f"It resets on {_reset_text(end)}.",
            )
    if team.member_monthly_cap_usd is not None:
        spent = spend(team=team, user=user).cost_usd
        if spent >= team.member_monthly_cap_usd:
            raise ClientError(
                "budget_exceeded",
                f"You have reached your monthly cap of {_money(team.member_monthly_cap_usd)} "
                f"in team {team.name}: {_money(spent)} spent this month. "
                f"It resets on {_reset_text(end)}.",
            )


RATE_WINDOW_SECONDS = 60


def _rate_key(user_id: int, second: int) -> str:
    return f"rate:{user_id}:{second}"


def rate_limit_check(*, user) -> None:
    """Count one request against the user's limit over the last minute; refuse (ClientError)
    past it. A sliding window, not calendar minutes: requests are counted per second (one
    cache counter each, incremented atomically) and the last 60 seconds are summed, so a burst
    across a minute boundary still gets the limit, not twice it. A refused request is not
    counted. Concurrent requests can only make the check stricter (each sees the others)."""
    limit = settings.USER_REQUESTS_PER_MINUTE
    if limit <= 0:
        return
    cache = caches["rate"]
    moment = now().timestamp()
    second = int(moment)
    current = _rate_key(user.pk, second)
    ttl = 2 * RATE_WINDOW_SECONDS
    cache.add(current, 0, timeout=ttl)
    try:
        cache.incr(current)
    except ValueError:  # expired between add and incr
        cache.set(current, 1, timeout=ttl)
    seconds = range(second - RATE_WINDOW_SECONDS + 1, second + 1)
    counts = cache.get_many([_rate_key(user.pk, s) for s in seconds])
    per_second = [(s, int(counts.get(_rate_key(user.pk, s)) or 0)) for s in seconds]
    total = sum(count for _, count in per_second)
    if total <= limit:
        return
    with contextlib.suppress(ValueError):
        cache.decr(current)  # a refused request does not count
    # The wait: until enough of the earliest requests leave the window to admit one more.
    must_leave, left, wait = total - limit, 0, RATE_WINDOW_SECONDS
    for s, count in per_second:
        left += count - (1 if s == second else 0)
        if left >= must_leave:
            wait = max(1, math.ceil(s + RATE_WINDOW_SECONDS - moment))
            break
    raise ClientError(
        "rate_limited",
        f"You can send {limit} messages a minute. Try again in {wait} seconds.",
    )


# ---- usage records --------------------------------------------------------------------------


def usage_record_for_reply(*, message: Message) -> None:
    """Write the one usage record of a reply that reached a terminal state (idempotent: a
    second call for the same reply writes nothing). One INSERT … ON CONFLICT DO NOTHING: the
    final save runs this per reply, so a read-then-write would cost three more statements."""
    conversation = message.conversation  # no query when the caller loaded it with the message
    model = message.model
    prompt = message.prompt_tokens or 0
    cached = message.cached_tokens or 0
    completion = message.completion_tokens or 0
    if message.cost_usd is not None:  # priced when saved (as the model that answered)
        cost = message.cost_usd
    elif model is not None:
        cost = reply_cost(
            model=model, prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion
        )
    else:
        cost = ZERO
    record = UsageRecord(
        message=message,
        user_id=conversation.owner_id,
        team_id=conversation.team_id,
        conversation=conversation,
        model=model,
        model_name=model.display_name if model else "",
        provider_name=model.provider.name if model else "",
        served_model=message.served_model,
        status=message.status,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        cost_usd=cost,
        created_at=now(),
    )
    UsageRecord.objects.bulk_create([record], ignore_conflicts=True)


def member_rows(team: Team) -> list[dict]:
    """The team page: each member with this month's spend and tokens inside the team."""
    rows = []
    memberships = team.memberships.select_related("user").order_by("user__username")
    for membership in memberships:
        rows.append(
            {
                "membership": membership,
                "user": membership.user,
                "spend": spend(team=team, user=membership.user),
            }
        )
    return rows


def team_summary(team: Team) -> dict:
    total = spend(team=team)
    left = None
    if team.monthly_budget_usd is not None:
        left = max(team.monthly_budget_usd - total.cost_usd, ZERO)
    return {"team": team, "spend": total, "budget_left": left, "members": member_rows(team)}
