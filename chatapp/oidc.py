"""Single sign-on with the company's identity provider (OpenID Connect), teams from its groups.

The protocol is Authlib's (its Django client: discovery, authorization code flow with PKCE S256,
state kept in the session and single use, nonce, token exchange, ID token signature checked
against the provider's JWKS with the key set refetched on an unknown key id). We add what Authlib
leaves to the caller: the issuer and audience are checked explicitly (Authlib checks `aud` only
when told to), `email_verified: false` is refused, and so is a response without an ID token.

Who gets in (`identity_check`): per provider, optional e-mail domains and optional required
groups (either one of them is enough). A sign-in that passes finds the user by the provider's
`sub`; else links to the active account with the same e-mail (verified, or the provider does not
say); else creates the account (just in time, no usable password). A deactivated account is
refused. Teams (`memberships_sync`): on every sign-in the memberships this provider made are
brought in line with the user's groups through the provider's group mappings (added, role
changed, removed); manual memberships (synced_by empty) are left alone.

Every refusal is audited and counted by the log-in throttle (accounts.login_failed) except an
unreachable provider, which is not the user's doing. All writes of one sign-in (account,
identity, memberships, their audit entries) commit together.

Blocking HTTP (requests, under Authlib) runs in the sync view, bounded by OIDC_TIMEOUT.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from urllib.parse import urlencode

import requests
from authlib.integrations.base_client.errors import MismatchingStateError, OAuthError
from authlib.integrations.django_client import DjangoIntegration, DjangoOAuth2App
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.urls import reverse
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)

from . import accounts, audit, teams
from .models import Membership, OIDCGroupMapping, OIDCIdentity, OIDCProvider, Team

log = logging.getLogger(__name__)

SESSION_PROVIDER = "oidc_provider_id"
SESSION_ID_TOKEN = "oidc_id_token"
ASK_ADMIN = "Ask your administrator."


@dataclass
class SignInRefused(Exception):
    """A sign-in that does not go through; `message` is shown to the person as is."""

    reason: str
    message: str
    status: int = 403
    username: str | None = None  # who tried, when known (throttle and audit)
    counts: bool = True  # counted by the log-in throttle

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# ---- audit --------------------------------------------------------------------------------------


def _audit(*, action: str, actor=None, obj=None, changes=None, request=None, actor_name=None):
    """Every audit entry of this module goes through here (in the caller's transaction)."""
    return audit.audit_record(
        actor=actor,
        action=action,
        obj=obj,
        changes=changes,
        request=request,
        actor_name=actor_name,
    )


# ---- configuration ------------------------------------------------------------------------------


def split_list(text: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", text or "") if item.strip()]


def providers_for_login() -> list[OIDCProvider]:
    ensure_env_provider()
    return list(OIDCProvider.objects.filter(enabled=True))


def provider_get(slug: str) -> OIDCProvider:
    """The enabled provider with this slug (OIDCProvider.DoesNotExist otherwise)."""
    ensure_env_provider()
    return OIDCProvider.objects.get(slug=slug, enabled=True)


_seeded = False
_seed_lock = threading.Lock()


def ensure_env_provider() -> None:
    """Seed from OIDC_* once per process on first use, so a plain `migrate` + server deploy
    (without `manage.py start` / `prepare`, which seed at start) gets its button too."""
    global _seeded
    if _seeded:
        return
    with _seed_lock:
        if not _seeded:
            provider_seed_from_env()
            _seeded = True


@transaction.atomic
def provider_seed_from_env() -> OIDCProvider | None:
    """Make the provider from the OIDC_* variables match them (the first provider)."""
    if not (settings.OIDC_ISSUER and settings.OIDC_CLIENT_ID):
        OIDCProvider.objects.filter(managed_by_env=True).update(enabled=False)
        return None
    values = {
        "label": settings.OIDC_LABEL,
        "issuer": settings.OIDC_ISSUER,
        "client_id": settings.OIDC_CLIENT_ID,
        "scopes": settings.OIDC_SCOPES,
        "groups_claim": settings.OIDC_GROUPS_CLAIM,
        "allowed_domains": settings.OIDC_ALLOWED_DOMAINS,
        "required_groups": settings.OIDC_REQUIRED_GROUPS,
        "enabled": True,
    }
    provider = OIDCProvider.objects.filter(managed_by_env=True).first()
    if provider is None:
        provider = OIDCProvider(slug="sso", managed_by_env=True)
    for field, value in values.items():
        setattr(provider, field, value)
    provider.client_secret = settings.OIDC_CLIENT_SECRET
    provider.save()
    return provider


_clients: dict[tuple[int, float], DjangoOAuth2App] = {}


def oidc_client(provider: OIDCProvider) -> DjangoOAuth2App:
    """Authlib's client for this provider, kept per process while its settings are unchanged
    (so discovery and the key set are fetched once, not per sign-in)."""
    key = (provider.pk, provider.updated_at.timestamp())
    client = _clients.get(key)
    if client is None:
        for stale in [k for k in _clients if k[0] == provider.pk]:
            del _clients[stale]
        name = f"oidc-{provider.slug}"
        client = DjangoOAuth2App(
            DjangoIntegration(name),
            name=name,
            client_id=provider.client_id,
            client_secret=provider.client_secret,
            server_metadata_url=provider.issuer.rstrip("/") + "/.well-known/openid-configuration",
            client_kwargs={
                "scope": provider.scopes,
                "code_challenge_method": "S256",
                "default_timeout": settings.OIDC_TIMEOUT,
            },
        )
        _clients[key] = client
    return client


def _metadata(provider: OIDCProvider) -> dict:
    try:
        metadata = oidc_client(provider).load_server_metadata()
    except (requests.RequestException, ValueError) as exc:
        log.warning("identity provider %s unreachable: %s", provider.slug, exc)
        raise SignInRefused(
            "provider_unreachable",
            f"{provider.label} could not be reached. Try again in a minute; if it keeps "
            f"happening, {ASK_ADMIN.lower()}",
            status=502,
            counts=False,
        ) from None
    if metadata.get("issuer", "").rstrip("/") != provider.issuer.rstrip("/"):
        _clients.clear()
        raise SignInRefused(
            "issuer_mismatch",
            f"{provider.label} is not set up correctly here (its issuer does not match). "
            + ASK_ADMIN,
            status=502,
            counts=False,
        )
    return metadata


# ---- the flow -----------------------------------------------------------------------------------


def callback_url(request, provider: OIDCProvider) -> str:
    return request.build_absolute_uri(reverse("oidc-callback", args=[provider.slug]))


def login_begin(*, request, provider: OIDCProvider):
    """The redirect to the provider's sign-in page (state, nonce and PKCE verifier kept in the
    session for the callback)."""
    _metadata(provider)
    refused = accounts.login_lock_message(username=None, ip=accounts.client_ip(request))
    if refused:
        raise SignInRefused("locked", refused, status=429, counts=False)
    return oidc_client(provider).authorize_redirect(request, callback_url(request, provider))


def _validated_claims(*, request, provider: OIDCProvider) -> tuple[dict, str]:
    """The ID token's claims (plus UserInfo's) after every check, and the raw ID token."""
    metadata = _metadata(provider)
    client = oidc_client(provider)
    issuer = metadata["issuer"]
    claims_options = {
        "iss": {"essential": True, "values": [issuer]},
        "aud": {"essential": True, "values": [provider.client_id]},
    }
    try:
        token = client.authorize_access_token(
            request, claims_options=claims_options, leeway=settings.OIDC_CLOCK_SKEW_SECONDS
        )
    except MismatchingStateError:
        raise SignInRefused(
            "bad_state",
            "This sign-in link was already used or has expired. Start again from the log-in page.",
            status=400,
        ) from None
    except OAuthError as exc:
        # E.g. the person cancelled at the provider: not a guess, so not counted. Only a short
        # error code from the provider is shown, never its free text.
        code = exc.error if re.fullmatch(r"[a-z_]{1,40}", exc.error or "") else "error"
        raise SignInRefused(
            "provider_refused",
            f"{provider.label} did not complete the sign-in ({code}). " + ASK_ADMIN,
            counts=False,
        ) from None
    except BadSignatureError:
        raise SignInRefused(
            "bad_signature",
            f"The answer from {provider.label} failed its signature check. " + ASK_ADMIN,
        ) from None
    except ExpiredTokenError:
        raise SignInRefused(
            "expired_token",
            f"The sign-in from {provider.label} has expired (check the server's clock). "
            + ASK_ADMIN,
        ) from None
    except (InvalidClaimError, MissingClaimError) as exc:
        claim = getattr(exc, "claim", "") or str(exc)
        reason = "wrong_audience" if "aud" in claim else "invalid_token"
        raise SignInRefused(
            reason,
            f"The sign-in from {provider.label} was not issued for this app ({claim}). "
            + ASK_ADMIN,
        ) from None
    except JoseError as exc:
        raise SignInRefused(
            "invalid_token",
            f"The sign-in from {provider.label} could not be verified ({exc.error}). " + ASK_ADMIN,
        ) from None
    except requests.RequestException as exc:
        log.warning("identity provider %s failed during sign-in: %s", provider.slug, exc)
        raise SignInRefused(
            "provider_unreachable",
            f"{provider.label} could not be reached. Try again in a minute.",
            status=502,
            counts=False,
        ) from None
    userinfo = token.get("userinfo")
    if not userinfo or not token.get("id_token"):
        raise SignInRefused("invalid_token", f"{provider.label} sent no ID token. " + ASK_ADMIN)
    claims = dict(userinfo)
    if metadata.get("userinfo_endpoint"):
        # Many providers put e-mail and groups only in UserInfo (with an access token); its
        # `sub` must be the ID token's. The ID token's claims win where both have one.
        try:
            response = client.get(metadata["userinfo_endpoint"], token=token)
            response.raise_for_status()
            extra = response.json()
        except (requests.RequestException, ValueError) as exc:
            log.warning("userinfo of %s failed: %s", provider.slug, exc)
            extra = {}
        if extra.get("sub") == claims.get("sub"):
            claims = {**extra, **claims}
    return claims, token["id_token"]


def _groups(provider: OIDCProvider, claims: dict) -> list[str]:
    value = claims.get(provider.groups_claim) or []
    if isinstance(value, str):
        value = [value]
    return sorted({str(group) for group in value if str(group)})


def identity_check(*, provider: OIDCProvider, claims: dict) -> tuple[str, list[str]]:
    """The e-mail and groups of a person the provider's allow rule lets in, else SignInRefused."""
    email = str(claims.get("email") or "").strip().lower()
    groups = _groups(provider, claims)
    who = email or str(claims.get("sub"))
    if claims.get("email_verified") is False or claims.get("email_verified") == "false":
        raise SignInRefused(
            "email_unverified",
            f"Your e-mail address is not verified at {provider.label}. " + ASK_ADMIN,
            username=who,
        )
    domains = {d.lower().lstrip("@") for d in split_list(provider.allowed_domains)}
    if domains and email.rpartition("@")[2] not in domains:
        raise SignInRefused(
            "not_allowed",
            f"Your account at {provider.label} ({who}) may not use this chat. " + ASK_ADMIN,
            username=who,
        )
    required = set(split_list(provider.required_groups))
    if required and not required & set(groups):
        raise SignInRefused(
            "not_allowed",
            f"Your account at {provider.label} ({who}) is not in a group that may use this chat. "
            + ASK_ADMIN,
            username=who,
        )
    return email, groups


def _new_username(email: str, claims: dict) -> str:
    User = get_user_model()
    base = (email or str(claims.get("preferred_username") or "") or f"sso-{claims['sub']}")[:140]
    candidate, n = base, 1
    while User.objects.filter(username__iexact=candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def user_for_identity(*, provider: OIDCProvider, claims: dict, email: str, groups, request):
    """The linked user, an existing account with this e-mail (then linked), or a new account."""
    User = get_user_model()
    subject = str(claims["sub"])
    identity = (
        OIDCIdentity.objects.select_for_update()
        .select_related("user")
        .filter(provider=provider, subject=subject)
        .first()
    )
    if identity is not None:
        user = identity.user
    else:
        matches = list(User.objects.filter(email__iexact=email)[:2]) if email else []
        if len(matches) == 1:
            user = matches[0]
            action = "oidc.account_linked"
        elif len(matches) > 1:
            raise SignInRefused(
                "ambiguous_email",
                f"Several accounts here use {email}, so it cannot be chosen for you. " + ASK_ADMIN,
                username=email,
            )
        else:
            user = User(
                username=_new_username(email, claims),
                email=email,
                first_name=str(claims.get("given_name") or "")[:150],
                last_name=str(claims.get("family_name") or "")[:150],
            )
            user.set_unusable_password()
            user.save()
            action = "oidc.account_created"
        identity = OIDCIdentity.objects.create(
            provider=provider, subject=subject, user=user, email=email
        )
        if user.is_active:
            _audit(
                action=action,
                actor=user,
                obj=user,
                changes={"provider": provider.label, "subject": subject, "email": email},
                request=request,
            )
    if not user.is_active:
        raise SignInRefused("deactivated", accounts.DEACTIVATED, username=user.get_username())
    identity.email = email
    identity.groups = groups
    identity.last_login_at = teams.now()
    identity.save(update_fields=["email", "groups", "last_login_at"])
    return user


def memberships_sync(*, user, provider: OIDCProvider, groups: list[str], request=None) -> list:
    """Bring the memberships this provider manages in line with `groups`. -> the changes made.

    A team mapped from several of the user's groups gets the highest role among them. A manual
    membership in a mapped team stays as it is (manual wins); a synced one whose group is gone
    is removed. If the current team was removed, the oldest remaining one becomes current.
    """
    wanted: dict[int, str] = {}
    for mapping in OIDCGroupMapping.objects.filter(provider=provider, group__in=groups):
        if wanted.get(mapping.team_id) != Membership.Role.ADMIN:
            wanted[mapping.team_id] = mapping.role
    existing = {m.team_id: m for m in Membership.objects.filter(user=user).select_related("team")}
    changes = []
    for team_id, role in wanted.items():
        membership = existing.get(team_id)
        if membership is None:
            team = Team.objects.get(pk=team_id)
            membership = teams.membership_set(user=user, team=team, role=role)
            Membership.objects.filter(pk=membership.pk).update(synced_by=provider)
            changes.append(("oidc.membership_added", team, {"role": [None, role]}))
        elif membership.synced_by_id == provider.pk and membership.role != role:
            changes.append(
                ("oidc.membership_changed", membership.team, {"role": [membership.role, role]})
            )
            membership.role = role
            membership.save(update_fields=["role"])
    for team_id, membership in existing.items():
        if membership.synced_by_id == provider.pk and team_id not in wanted:
            membership.delete()
            changes.append(
                ("oidc.membership_removed", membership.team, {"role": [membership.role, None]})
            )
    remaining = Membership.objects.filter(user=user)
    if remaining.exists() and not remaining.filter(is_current=True).exists():
        first = remaining.order_by("created_at", "id").first()
        teams.team_choose(user=user, team=first.team)
    for action, team, change in changes:
        _audit(
            action=action,
            actor=None,
            actor_name=f"sync from {provider.label}",
            obj=team,
            changes={"user": user.get_username(), **change, "groups": groups},
            request=request,
        )
    return changes


def login_complete(*, request, provider: OIDCProvider):
    """Check the provider's answer, find or make the user, sync teams. -> (user, id_token)

    Raises SignInRefused (already audited and counted) when anything is wrong.
    """
    ip = accounts.client_ip(request)
    refused = accounts.login_lock_message(username=None, ip=ip)
    if refused:
        raise SignInRefused("locked", refused, status=429, counts=False)
    try:
        claims, id_token = _validated_claims(request=request, provider=provider)
        email, groups = identity_check(provider=provider, claims=claims)
        locked = accounts.login_lock_message(username=email or str(claims["sub"]), ip=ip)
        if locked:
            raise SignInRefused("locked", locked, status=429, counts=False)
        with transaction.atomic():
            user = user_for_identity(
                provider=provider, claims=claims, email=email, groups=groups, request=request
            )
            memberships_sync(user=user, provider=provider, groups=groups, request=request)
            _audit(
                action="oidc.login",
                actor=user,
                obj=user,
                changes={"provider": provider.label, "groups": groups},
                request=request,
            )
    except SignInRefused as refusal:
        login_refused(request=request, provider=provider, refusal=refusal)
        raise
    accounts.login_succeeded(username=user.get_username())
    return user, id_token


def login_refused(*, request, provider: OIDCProvider | None, refusal: SignInRefused) -> None:
    """Audit a refused sign-in and count it against the log-in throttle (unless it is not the
    person's doing, e.g. the provider is down)."""
    accounts.login_failed_record(
        username=refusal.username,
        reason=refusal.reason,
        request=request,
        action="oidc.login_refused",
        count=refusal.counts,
        provider=provider.label if provider else "",
    )


# ---- sign-out -----------------------------------------------------------------------------------


def end_session_url(*, provider_id, id_token: str, after: str) -> tuple[str, str] | None:
    """(label, the provider's end-session URL) when it has one, else None."""
    provider = OIDCProvider.objects.filter(pk=provider_id, enabled=True).first()
    if provider is None:
        return None
    try:
        endpoint = oidc_client(provider).load_server_metadata().get("end_session_endpoint")
    except (requests.RequestException, ValueError):
        return None
    if not endpoint:
        return None
    query = {"client_id": provider.client_id, "post_logout_redirect_uri": after}
    if id_token:
        query["id_token_hint"] = id_token
    separator = "&" if "?" in endpoint else "?"
    return provider.label, endpoint + separator + urlencode(query)
