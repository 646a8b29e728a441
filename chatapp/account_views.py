"""HTTP transport for accounts and teams: settings page, team page, staff usage report, log-in
and set-password pages. Thin: the rules live in teams.py, accounts.py and usage.py.

Statuses: anonymous users are redirected to the log-in page (302); a logged-in user without the
right role gets 403 for a page and 404 for a member they may not manage.
"""

from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.views.decorators.http import require_GET, require_POST

from . import access, accounts, audit, oidc, teams, usage
from .models import Membership, Team


def staff_required(view):
    @wraps(view)
    @login_required
    def wrapped(request, *args, **kwargs):
        if not request.user.is_staff:
            raise PermissionDenied("Staff only")
        return view(request, *args, **kwargs)

    return wrapped


class LoginView(auth_views.LoginView):
    """Single sign-on buttons above the password form; with PASSWORD_LOGIN=false the form is
    only shown at ?break-glass=1 (and only the break-glass account gets in with it)."""

    form_class = accounts.ThrottledAuthenticationForm
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context["oidc_providers"] = oidc.providers_for_login()
        context["password_login"] = settings.PASSWORD_LOGIN
        context["break_glass"] = not settings.PASSWORD_LOGIN and (
            "break-glass" in self.request.GET or self.request.method == "POST"
        )
        return context


class LogoutView(auth_views.LogoutView):
    """Django's log-out (POST only), written to the audit log first (the app's and the admin's)."""

    def post(self, request, *args, **kwargs):
        if request.user.is_authenticated:
            accounts.logged_out(user=request.user, request=request)
        return super().post(request, *args, **kwargs)


class SetPasswordView(auth_views.PasswordResetConfirmView):
    template_name = "registration/set_password.html"
    success_url = reverse_lazy("set-password-done")

    @transaction.atomic
    def form_valid(self, form):
        response = super().form_valid(form)
        accounts.set_password_link_used(user=form.user, request=self.request)
        return response


class SetPasswordDoneView(auth_views.PasswordResetCompleteView):
    template_name = "registration/set_password_done.html"


@login_required
@require_GET
def settings_page(request: HttpRequest) -> HttpResponse:
    user = request.user
    memberships = teams.memberships_for(user)
    current = teams.current_membership(user)
    start, end = teams.month_bounds()
    context = {
        "memberships": memberships,
        "current": current,
        "month_label": start.strftime("%B %Y"),
        "total": teams.spend(user=user),
        "by_team": [(m.team, teams.spend(user=user, team=m.team)) for m in memberships],
        "is_team_admin": any(m.role == Membership.Role.ADMIN for m in memberships),
    }
    return render(request, "chatapp/settings.html", context)


@login_required
@require_POST
def settings_team(request: HttpRequest) -> HttpResponse:
    try:
        team = Team.objects.get(pk=request.POST.get("team"), memberships__user=request.user)
    except (Team.DoesNotExist, ValueError, TypeError):
        raise Http404("Not a team of yours") from None
    teams.team_choose(user=request.user, team=team)
    messages.success(request, f"New chats are now charged to {team.name}.")
    return redirect("settings")


@login_required
@require_GET
def team_page(request: HttpRequest) -> HttpResponse:
    administered = teams.teams_administered_by(request.user)
    if not administered:
        raise PermissionDenied("Team admins only")
    summaries = [teams.team_summary(team) for team in administered]
    admin = request.user
    manageable = set(access.team_members_manageable_by(admin).values_list("pk", flat=True))
    for summary in summaries:
        for row in summary["members"]:
            member = row["user"]
            row["manageable"] = member.pk in manageable
            # Staff decisions win: a team admin cannot reactivate someone staff deactivated.
            row["staff_decision"] = (
                not member.is_active
                and not admin.is_staff
                and accounts.deactivated_by_staff(member)
            )
    start, _ = teams.month_bounds()
    return render(
        request,
        "chatapp/team.html",
        {"summaries": summaries, "month_label": start.strftime("%B %Y")},
    )


@login_required
@require_POST
def team_member_active(request: HttpRequest, user_id: int) -> HttpResponse:
    """Deactivate (active=0) or reactivate (active=1) a member of a team the requester runs.
    A team admin manages plain members only, and cannot undo a deactivation staff made."""
    admin = request.user
    if not teams.teams_administered_by(admin):
        raise PermissionDenied("Team admins only")
    member = access.team_member_get_for_admin(admin, user_id)
    if request.POST.get("active") == "1":
        if not admin.is_staff and accounts.deactivated_by_staff(member):
            messages.error(
                request,
                f"{member.get_username()} was deactivated by staff; only staff can reactivate "
                "this account.",
            )
            return redirect("team")
        accounts.user_reactivate(user=member, actor=admin, request=request)
        messages.success(request, f"{member.get_username()} can log in again.")
    else:
        accounts.user_deactivate(user=member, actor=admin, request=request)
        messages.success(request, f"{member.get_username()} was deactivated and logged out.")
    return redirect("team")


@staff_required
@require_GET
def usage_report(request: HttpRequest) -> HttpResponse:
    report = usage.usage_report(month=teams.parse_month(request.GET.get("month")))
    return render(request, "chatapp/usage.html", {"report": report})


@staff_required
@require_GET
def usage_csv(request: HttpRequest) -> HttpResponse:
    report = usage.usage_report(month=teams.parse_month(request.GET.get("month")))
    audit.audit_record(
        actor=request.user,
        action="export.usage_csv",
        changes={"month": str(report["month"])},
        request=request,
    )
    response = HttpResponse(usage.csv_text(report), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{report["month"]}.csv"'
    return response


AUDIT_PAGE_SIZE = 100


def _audit_entries(request: HttpRequest):
    return audit.audit_search(
        query=request.GET.get("q", "").strip(),
        action=request.GET.get("action", "").strip(),
        actor=request.GET.get("actor", "").strip(),
    )


@staff_required
@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    page = Paginator(_audit_entries(request), AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [(entry, audit.change_text(entry.changes)) for entry in page.object_list]
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "chatapp/audit.html",
        {
            "page": page,
            "rows": rows,
            "query": query.urlencode(),
            "q": request.GET.get("q", ""),
            "action": request.GET.get("action", ""),
            "actor": request.GET.get("actor", ""),
        },
    )


@staff_required
@require_GET
def audit_csv(request: HttpRequest) -> HttpResponse:
    entries = _audit_entries(request)
    with transaction.atomic():
        audit.audit_record(
            actor=request.user,
            action="export.audit_csv",
            changes={
                key: request.GET[key] for key in ("q", "action", "actor") if key in request.GET
            },
            request=request,
        )
        text = audit.csv_text(entries)
    response = HttpResponse(text, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="audit-{teams.now():%Y%m%d-%H%M}.csv"'
    return response
