"""HTTP transport for single sign-on (the rules live in oidc.py): start, callback, log-out.

Statuses: an unknown or disabled provider is 404; a refused sign-in renders the "ask your
administrator" page with 403 (400 for a used or expired sign-in link, 429 when locked, 502 when
the provider cannot be reached).
"""

from django.conf import settings
from django.contrib.auth import login as auth_login
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET

from . import account_views, oidc
from .models import OIDCProvider

SESSION_NEXT = "oidc_next"


def _provider(slug: str) -> OIDCProvider:
    try:
        return oidc.provider_get(slug)
    except OIDCProvider.DoesNotExist:
        raise Http404("No such identity provider") from None


def _refused_page(request, provider, refusal: oidc.SignInRefused) -> HttpResponse:
    return render(
        request,
        "registration/oidc_refused.html",
        {"provider": provider, "message": refusal.message, "reason": refusal.reason},
        status=refusal.status,
    )


@require_GET
def oidc_login(request: HttpRequest, slug: str) -> HttpResponse:
    provider = _provider(slug)
    wanted = request.GET.get("next", "")
    if url_has_allowed_host_and_scheme(
        wanted, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        request.session[SESSION_NEXT] = wanted
    try:
        return oidc.login_begin(request=request, provider=provider)
    except oidc.SignInRefused as refusal:
        oidc.login_refused(request=request, provider=provider, refusal=refusal)
        return _refused_page(request, provider, refusal)


@require_GET
def oidc_callback(request: HttpRequest, slug: str) -> HttpResponse:
    provider = _provider(slug)
    try:
        user, id_token = oidc.login_complete(request=request, provider=provider)
    except oidc.SignInRefused as refusal:
        return _refused_page(request, provider, refusal)
    wanted = request.session.pop(SESSION_NEXT, "") or reverse(settings.LOGIN_REDIRECT_URL)
    auth_login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    request.session[oidc.SESSION_PROVIDER] = provider.pk
    request.session[oidc.SESSION_ID_TOKEN] = id_token
    return redirect(wanted)


class LogoutView(account_views.LogoutView):
    """End this app's session (audited by the parent); after a single sign-on, offer the
    provider's own sign-out too, where it has an end-session endpoint."""

    def post(self, request, *args, **kwargs):
        provider_id = request.session.get(oidc.SESSION_PROVIDER)
        id_token = request.session.get(oidc.SESSION_ID_TOKEN, "")
        response = super().post(request, *args, **kwargs)
        if provider_id is None:
            return response
        after = request.build_absolute_uri(reverse("login"))
        offer = oidc.end_session_url(provider_id=provider_id, id_token=id_token, after=after)
        if offer is None:
            return response
        label, url = offer
        return render(
            request, "registration/signed_out.html", {"label": label, "end_session_url": url}
        )
