"""Accounts: log-in throttling, set-password links, deactivation and reactivation.

- Log-in guessing: failed attempts are counted per account and per client IP in the cache
  (shared by every process: Redis or the database). Past the limit the account (or IP) is locked
  for LOGIN_LOCK_SECONDS; the lock expires by itself. A locked account is refused before the
  password is checked. The IP is audit.client_ip (REMOTE_ADDR as trusted per the proxy setting).
  Single sign-on refusals (oidc.py) count the same way, through login_failed_record.
- PASSWORD_LOGIN=false refuses passwords to everyone but BREAK_GLASS_USERNAME (a staff account),
  on the app's and the admin's log-in pages alike.
- Every log-in (success, failure, lock), set-password link and deactivation is written to the
  audit log (audit.py), in the same transaction as the change.
- There is no sign-up: staff create a user without a password and hand over a one-time
  set-password link (Django's token generator: single use because it hashes the password, and
  it expires after PASSWORD_RESET_TIMEOUT). It is e-mailed too when EMAIL_HOST is set.
- Access that ends closes the user's open websockets at once, in every process (through
  events.py, `user_sockets_close`): deactivation by any path (admin list action, admin user
  form, team page) also ends every session and refuses new log-ins; a password change or a
  password set through a link closes the sockets of every other session (Django's
  password-changed hook, `SocketsClosedOnPasswordChange`, so no path is missed). Leaving a
  team or a team losing a model needs no close: every send re-checks both (teams.send_check),
  and every send, regeneration and edit re-reads the conversation with its owner's state.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math

from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.tokens import default_token_generator
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from . import audit, events, teams
from .audit import client_ip
from .models import AuditEntry

log = logging.getLogger(__name__)


# ---- log-in throttling ----------------------------------------------------------------------


def _key(kind: str, value: str) -> str:
    digest = hashlib.sha256(value.strip().lower().encode()).hexdigest()[:32]
    return f"login:{kind}:{digest}"


def _limits(*, username: str | None, ip: str) -> list[tuple[str, int, str]]:
    """The counters a failure bumps; `username=None` (a single sign-on failure before the
    person is known, e.g. a bad state) counts against the client address only."""
    limits = [
        (_key("ip", ip or "unknown"), settings.LOGIN_MAX_FAILURES_PER_IP, "your network address")
    ]
    if username is not None:
        account = (
            _key("account", username),
            settings.LOGIN_MAX_FAILURES_PER_ACCOUNT,
            "this account",
        )
        limits.insert(0, account)
    return limits


def login_lock_message(*, username: str | None, ip: str) -> str | None:
    """Why a log-in is refused right now, or None when it may be tried."""
    moment = teams.now().timestamp()
    for key, _, what in _limits(username=username, ip=ip):
        until = cache.get(f"{key}:lock")
        if until and until > moment:
            minutes = max(1, math.ceil((until - moment) / 60))
            unit = "minute" if minutes == 1 else "minutes"
            return (
                f"Too many failed log-ins for {what}. "
                f"For your security, try again in {minutes} {unit}."
            )
    return None


def login_failed(*, username: str | None, ip: str) -> list[str]:
    """Count a failed attempt; -> what it locked ("account", "address"), usually nothing."""
    lock = settings.LOGIN_LOCK_SECONDS
    locked = []
    moment = teams.now().timestamp()
    for key, limit, _ in _limits(username=username, ip=ip):
        cache.add(f"{key}:fails", 0, timeout=lock)
        try:
            failures = cache.incr(f"{key}:fails")
        except ValueError:  # expired in between
            cache.set(f"{key}:fails", 1, timeout=lock)
            failures = 1
        if failures >= limit:
            cache.set(f"{key}:lock", moment + lock, timeout=lock)
            cache.delete(f"{key}:fails")  # after the lock, a fresh set of attempts
            locked.append("account" if key.startswith("login:account:") else "address")
    return locked


def login_failed_record(
    *, username: str | None, reason: str, request, action: str, count: bool = True, **details
) -> None:
    """Count a failed log-in against the throttle (unless `count` is false) and audit it, with
    a `login.lock` entry for each lock it set. Password and single sign-on failures alike."""
    locked = login_failed(username=username, ip=client_ip(request)) if count else []
    known = get_user_model().objects.filter(username=username).first() if username else None
    audit.audit_record(
        actor=None,
        actor_name=username or "",
        action=action,
        obj=known,
        changes={"reason": reason, **details},
        request=request,
    )
    for what in locked:
        audit.audit_record(
            actor=None,
            actor_name=username or "",
            action="login.lock",
            obj=known,
            changes={"locked": what, "seconds": settings.LOGIN_LOCK_SECONDS},
            request=request,
        )


def login_succeeded(*, username: str) -> None:
    cache.delete(f"{_key('account', username)}:fails")


DEACTIVATED = "This account has been deactivated. Ask your administrator."
PASSWORDS_OFF = (
    "Log-in with a password is turned off here: use the single sign-on button on the log-in page."
)


def password_login_allowed(username: str) -> bool:
    """PASSWORD_LOGIN=false leaves passwords to the break-glass account only."""
    if settings.PASSWORD_LOGIN:
        return True
    return bool(settings.BREAK_GLASS_USERNAME) and username == settings.BREAK_GLASS_USERNAME


class ThrottleMixin:
    """Put a log-in form behind the per-account and per-IP locks (and PASSWORD_LOGIN)."""

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        ip = client_ip(self.request)
        refused = login_lock_message(username=username, ip=ip)
        if refused:
            self._audit_failure(username, "locked")
            raise forms.ValidationError(refused, code="locked")
        if not password_login_allowed(username):
            self._count_failure(username, "passwords_off")
            raise forms.ValidationError(PASSWORDS_OFF, code="passwords_off")
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            try:
                self._refuse_if_deactivated(username)
            except forms.ValidationError:
                self._audit_failure(username, "deactivated")
                raise
            self._count_failure(username, "bad_credentials")
            raise
        if not settings.PASSWORD_LOGIN and not self.get_user().is_staff:
            # The break-glass name must belong to a staff account to be let in by password.
            self._count_failure(username, "passwords_off")
            raise forms.ValidationError(PASSWORDS_OFF, code="passwords_off")
        login_succeeded(username=username)
        audit.audit_record(actor=self.get_user(), action="login.success", request=self.request)
        return cleaned

    def _count_failure(self, username: str, reason: str) -> None:
        login_failed_record(
            username=username, reason=reason, request=self.request, action="login.failure"
        )

    def _known_user(self, username: str):
        return get_user_model().objects.filter(username=username).first() if username else None

    def _audit_failure(self, username: str, reason: str) -> None:
        audit.audit_record(
            actor=None,
            actor_name=username,
            action="login.failure",
            obj=self._known_user(username),
            changes={"reason": reason},
            request=self.request,
        )

    def _refuse_if_deactivated(self, username: str) -> None:
        # The backend answers "wrong password" for inactive users; with the right password, say why.
        user = get_user_model().objects.filter(username=username, is_active=False).first()
        if user is not None and user.check_password(self.cleaned_data.get("password") or ""):
            raise forms.ValidationError(DEACTIVATED, code="inactive")


class ThrottledAuthenticationForm(ThrottleMixin, AuthenticationForm):
    """The app's log-in page."""


class ThrottledAdminAuthenticationForm(ThrottleMixin, AdminAuthenticationForm):
    """The Django admin's log-in page: the same locks (it is another door to the same accounts)."""


# ---- set-password links ---------------------------------------------------------------------


def set_password_link(*, user, request) -> str:
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    return request.build_absolute_uri(reverse("set-password", args=[uid, token]))


def set_password_link_issue(*, user, request) -> tuple[str, bool]:
    """A fresh one-time link for the user; e-mailed when mail is configured. -> (link, mailed)"""
    link = set_password_link(user=user, request=request)
    audit.audit_record(
        actor=getattr(request, "user", None),
        action="password.link_issued",
        obj=user,
        request=request,
    )
    mailed = False
    if settings.EMAIL_HOST and user.email:
        hours = settings.PASSWORD_RESET_TIMEOUT // 3600
        try:
            send_mail(
                "Set your Kimi Chat password",
                f"Hello {user.get_username()},\n\nSet your password here (the link works once, "
                f"for {hours} hours):\n\n{link}\n",
                settings.DEFAULT_FROM_EMAIL,
                [user.email],
            )
            mailed = True
        except OSError:
            log.exception("could not e-mail the set-password link to user %s", user.pk)
    return link, mailed


# ---- deactivation ---------------------------------------------------------------------------


def sessions_delete_for(*, user) -> int:
    """End every database session of the user (scans live sessions: fine for team sizes)."""
    doomed = [
        session.pk
        for session in Session.objects.filter(expire_date__gt=teams.now()).iterator()
        if str(session.get_decoded().get("_auth_user_id")) == str(user.pk)
    ]
    Session.objects.filter(pk__in=doomed).delete()
    return len(doomed)


def _decided_by(actor) -> str:
    """Who a deactivation is recorded as: staff (also the system, with no actor) or a team
    admin. Staff decisions win: a team admin cannot undo one."""
    if actor is None or not getattr(actor, "is_authenticated", False) or actor.is_staff:
        return BY_STAFF
    return BY_TEAM_ADMIN


BY_STAFF = "staff"
BY_TEAM_ADMIN = "team admin"


def user_sockets_close(*, user_id: int, keep_session: str | None = None) -> None:
    """Close the user's open sockets in every process once the current transaction commits
    (at once outside one); `keep_session` (a session key) keeps that session's sockets."""

    def close() -> None:
        try:
            async_to_sync(events.user_sockets_close)(user_id, keep_session=keep_session)
        except Exception:  # the channel layer is down: the next send re-checks anyway
            log.exception("could not close the sockets of user %s", user_id)

    transaction.on_commit(close)


def user_access_end(*, user) -> None:
    """A deactivated user (by whatever path): end every session, close every socket."""
    sessions_delete_for(user=user)
    user_sockets_close(user_id=user.pk)


@transaction.atomic
def user_deactivate(*, user, actor=None, request=None) -> None:
    """Log the user out everywhere and refuse new log-ins. The audit entry records who decided
    (staff or a team admin): see deactivated_by_staff."""
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)
    audit.audit_record(
        actor=actor,
        action="user.deactivated",
        obj=user,
        changes={"is_active": [user.is_active, False], "deactivated_by": _decided_by(actor)},
        request=request,
    )
    user.is_active = False
    user_access_end(user=user)


# The session changing its own password keeps its sockets (set around the view that does it).
_password_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "password_session", default=None
)


@contextlib.contextmanager
def password_change_from(request, *, user_id):
    """Around a view that may change `user_id`'s password: when that is the requester's own
    password, the requester's session keeps its sockets (Django gives it a new key meanwhile)."""
    own = getattr(request, "user", None) is not None and str(request.user.pk) == str(user_id)
    token = _password_session.set(request.session.session_key if own else None)
    try:
        yield
    finally:
        _password_session.reset(token)


class SocketsClosedOnPasswordChange:
    """Listed in AUTH_PASSWORD_VALIDATORS for Django's password-changed hook (called by
    User.save() after set_password, whichever path changed it: admin, set-password link,
    `changepassword`): every other session of the user loses its open sockets."""

    def validate(self, password, user=None) -> None:
        return None

    def password_changed(self, password, user=None) -> None:
        if user is not None and user.pk is not None:
            user_sockets_close(user_id=user.pk, keep_session=_password_session.get())

    def get_help_text(self) -> str:
        return "Changing it closes the account's chat windows open elsewhere."


@transaction.atomic
def user_reactivate(*, user, actor=None, request=None) -> None:
    get_user_model().objects.filter(pk=user.pk).update(is_active=True)
    audit.audit_record(
        actor=actor,
        action="user.reactivated",
        obj=user,
        changes={"is_active": [user.is_active, True]},
        request=request,
    )
    user.is_active = True


def deactivated_by_staff(user) -> bool:
    """Whether the user's current deactivation is staff's decision: made by staff (the admin's
    action or user form, or the system), or not recorded at all. Only a deactivation a team
    admin made on the team page may be undone by a team admin."""
    if user.is_active:
        return False
    entries = AuditEntry.objects.filter(
        object_type=user._meta.label_lower, object_id=str(user.pk)
    ).only("changes")
    for entry in entries.order_by("-created_at", "-id")[:50]:
        change = (entry.changes or {}).get("is_active")
        if isinstance(change, list) and len(change) == 2 and change[1] is False:
            return entry.changes.get("deactivated_by") != BY_TEAM_ADMIN
    return True


def set_password_link_used(*, user, request) -> None:
    """Record a password set through a one-time link (call inside the save's transaction)."""
    audit.audit_record(actor=user, action="password.set_via_link", obj=user, request=request)


def logged_out(*, user, request) -> None:
    audit.audit_record(actor=user, action="logout", request=request)
