from functools import partial

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpResponseRedirect
from django.urls import path, reverse

from . import accounts, audit, model_catalog, teams
from .models import (
    AuditEntry,
    Conversation,
    ConversationShare,
    Membership,
    Message,
    ModelConfig,
    OIDCGroupMapping,
    OIDCIdentity,
    OIDCProvider,
    Provider,
    Team,
    UsageRecord,
)

User = get_user_model()


class AuditedAdmin(admin.ModelAdmin):
    """Every add, change and delete made here is written to the audit log, before -> after.

    The admin runs add/change/delete views in one transaction, so the entry commits with the
    change. The "before" is read from the database in save_model (the form has already set the
    new values on `obj`), the "after" once the many-to-many fields and inlines are saved.
    """

    def _audit_action(self, obj, verb: str) -> str:
        return f"{obj._meta.model_name}.{verb}"

    def save_model(self, request, obj, form, change) -> None:
        before = {}
        if change:
            before = audit.snapshot(type(obj)._default_manager.get(pk=obj.pk))
        request._audit_before = before  # read back in save_related
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change) -> None:
        super().save_related(request, form, formsets, change)
        obj = form.instance
        before = getattr(request, "_audit_before", {})
        after = audit.snapshot(type(obj)._default_manager.get(pk=obj.pk))
        changes = audit.diff(before, after)
        changes.update(self.audit_extra_changes(form, before))
        if change and not changes:
            return
        audit.audit_record(
            actor=request.user,
            action=self._audit_action(obj, "changed" if change else "created"),
            obj=obj,
            changes=changes,
            request=request,
        )

    def audit_extra_changes(self, form, before: dict) -> dict:
        """Changes the snapshot cannot see (a replaced secret)."""
        return {}

    def delete_model(self, request, obj) -> None:
        self._audit_delete(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic():
            for obj in queryset:
                self._audit_delete(request, obj)
            super().delete_queryset(request, queryset)

    def _audit_delete(self, request, obj) -> None:
        audit.audit_record(
            actor=request.user,
            action=self._audit_action(obj, "deleted"),
            obj=obj,
            changes=audit.diff(audit.snapshot(obj), {}),
            request=request,
        )


class ProviderForm(forms.ModelForm):
    """The API key is write-only: the field is always empty, a blank submit keeps the key."""

    new_api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: leave empty to keep the current key. Stored encrypted.",
    )
    clear_api_key = forms.BooleanField(label="Remove the key", required=False)

    class Meta:
        model = Provider
        fields = ("name", "kind", "base_url", "enabled", "max_concurrency")
        # Provider endpoints are https; say so instead of relying on Django's changing default.
        field_classes = {"base_url": partial(forms.URLField, assume_scheme="https")}

    def save(self, commit=True):
        provider = super().save(commit=False)
        if self.cleaned_data.get("clear_api_key"):
            provider.api_key = ""
        elif self.cleaned_data.get("new_api_key"):
            provider.api_key = self.cleaned_data["new_api_key"]
        if commit:
            provider.save()
        return provider


@admin.register(Provider)
class ProviderAdmin(AuditedAdmin):
    form = ProviderForm
    list_display = ("name", "kind", "base_url", "key_set", "max_concurrency", "enabled")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "base_url")
    readonly_fields = ("key_set", "managed_by_env")
    fields = (
        "name",
        "kind",
        "base_url",
        "new_api_key",
        "clear_api_key",
        "key_set",
        "max_concurrency",
        "enabled",
        "managed_by_env",
    )

    @admin.display(boolean=True, description="key set")
    def key_set(self, provider: Provider) -> bool:
        return bool(provider.api_key)

    def audit_extra_changes(self, form, before: dict) -> dict:
        # A new key over an old one leaves "set" -> "set": say it was replaced (never the key).
        data = form.cleaned_data
        if before.get("api_key") and data.get("new_api_key") and not data.get("clear_api_key"):
            return {"api_key": ["set", "replaced"]}
        return {}


class ModelConfigForm(forms.ModelForm):
    """Adding a model needs only its provider and id: every fact left empty comes from the
    catalog (chatapp/providers/kimi_catalog.json); what staff do set is kept as their decision."""

    class Meta:
        model = ModelConfig
        fields = (
            "provider",
            "model_id",
            "display_name",
            "description",
            "enabled",
            "family",
            "context_window",
            "max_output_tokens",
            "max_output_limit",
            "vision",
            "video",
            "max_image_edge",
            "reasoning",
            "contract",
            "price_input",
            "price_cached_input",
            "price_output",
            "price_batch_input",
            "price_batch_output",
            "status",
            "status_date",
            "status_note",
            "successor",
            "sort_order",
        )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk is None:
            self.fields["display_name"].required = False
            self.fields["display_name"].help_text = "Empty = the catalog's name for this id."


@admin.register(ModelConfig)
class ModelConfigAdmin(AuditedAdmin):
    form = ModelConfigForm
    change_list_template = "admin/chatapp/modelconfig/change_list.html"
    list_display = (
        "display_name",
        "model_id",
        "provider",
        "availability",
        "vision",
        "video",
        "reasoning",
        "context_window",
        "max_output_tokens",
        "price_input",
        "price_cached_input",
        "price_output",
        "enabled",
        "staff_decided",
    )
    list_filter = ("provider", "status", "family", "vision", "video", "reasoning", "enabled")
    search_fields = ("display_name", "model_id")
    readonly_fields = ("origin", "staff_decided")
    actions = ["use_catalog_facts"]

    @admin.action(description="Forget staff decisions (use the catalog's facts again)")
    def use_catalog_facts(self, request, queryset) -> None:
        for model in queryset.select_related("provider"):
            before = audit.snapshot(model)
            model.staff_overrides = []
            model_catalog.model_fill_from_catalog(model)
            model.save()
            audit.audit_record(
                actor=request.user,
                action="modelconfig.catalog_facts_restored",
                obj=model,
                changes=audit.diff(before, audit.snapshot(model)),
                request=request,
            )
        self.message_user(request, f"{queryset.count()} model(s) follow the catalog again.")

    @admin.display(description="availability")
    def availability(self, model: ModelConfig) -> str:
        if model.status == ModelConfig.Status.AVAILABLE:
            return "available"
        parts = [model.get_status_display()]
        if model.status_date:
            parts.append(f"since {model.status_date:%Y-%m-%d}")
        if model.successor:
            parts.append(f"→ {model.successor}")
        return " ".join(parts)

    @admin.display(description="staff decided")
    def staff_decided(self, model: ModelConfig) -> str:
        return ", ".join(model.staff_overrides or ()) or "–"

    def save_model(self, request, obj, form, change) -> None:
        # Every fact staff changed is their decision: the catalog sync never writes it again.
        decided = set(obj.staff_overrides or ())
        for name in form.changed_data:
            if name not in model_catalog.STAFF_FIELDS:
                continue
            before = (
                form.initial.get(name)
                if change
                else ModelConfig._meta.get_field(name).get_default()
            )
            if before != form.cleaned_data.get(name):  # a real change, not a re-rendering
                decided.add(name)
        decided.discard("model_id")
        obj.staff_overrides = sorted(decided)
        if not change:
            model_catalog.model_fill_from_catalog(obj)
        super().save_model(request, obj, form, change)

    def get_urls(self):
        urls = [
            path(
                "refresh/",
                self.admin_site.admin_view(self.refresh_view),
                name="chatapp_modelconfig_refresh",
            )
        ]
        return urls + super().get_urls()

    def refresh_view(self, request):
        """ "Refresh models": read every provider's model list now and merge it with the
        catalog (the same sync as at start; staff decisions are kept)."""
        if request.method != "POST" or not self.has_change_permission(request):
            raise PermissionDenied
        report = model_catalog.catalog_sync(discover=True)
        audit.audit_record(
            actor=request.user,
            action="model.catalog_refreshed",
            changes={"result": report.summary()},
            request=request,
        )
        level = messages.WARNING if report.unreachable else messages.SUCCESS
        self.message_user(request, f"Models refreshed: {report.summary()}.", level)
        return HttpResponseRedirect(reverse("admin:chatapp_modelconfig_changelist"))

    def changelist_view(self, request, extra_context=None):
        gone = ModelConfig.objects.select_related("provider").exclude(
            status=ModelConfig.Status.AVAILABLE
        )
        notices = []
        for model in gone:
            when = f" since {model.status_date:%Y-%m-%d}" if model.status_date else ""
            successor = f"; successor: {model.successor}" if model.successor else ""
            notices.append(
                f"{model.display_name} ({model.provider.name}) is "
                f"{model.get_status_display().lower()}{when}{successor}. {model.status_note}"
            )
        extra_context = {**(extra_context or {}), "model_notices": notices}
        return super().changelist_view(request, extra_context)


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "status", "content", "prompt_tokens", "cached_tokens", "completion_tokens")
    readonly_fields = fields
    show_change_link = True


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("__str__", "owner", "team", "model", "created_at", "updated_at")
    list_filter = ("model", "team")
    search_fields = ("title", "owner__username", "affinity_id", "messages__content")
    readonly_fields = ("affinity_id", "created_at", "updated_at")
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "conversation",
        "role",
        "status",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "finish_reason",
        "served_model",
        "created_at",
    )
    list_filter = ("role", "status")
    search_fields = ("content", "reasoning", "error", "conversation__title")
    readonly_fields = ("created_at", "updated_at")


# ---- accounts and teams ----------------------------------------------------------------------


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    # "synced from" empty = manual (left alone by the group sync); clear it to make a synced
    # membership manual.
    fields = ("user", "team", "role", "is_current", "synced_by")
    autocomplete_fields = ("user",)


# ---- single sign-on ---------------------------------------------------------------------------


class OIDCProviderForm(forms.ModelForm):
    """The client secret is write-only, like provider API keys: a blank submit keeps it."""

    new_client_secret = forms.CharField(
        label="Client secret",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only: leave empty to keep the current secret. Stored encrypted.",
    )

    class Meta:
        model = OIDCProvider
        fields = (
            "slug",
            "label",
            "issuer",
            "client_id",
            "scopes",
            "groups_claim",
            "allowed_domains",
            "required_groups",
            "enabled",
        )
        field_classes = {"issuer": partial(forms.URLField, assume_scheme="https")}

    def save(self, commit=True):
        provider = super().save(commit=False)
        if self.cleaned_data.get("new_client_secret"):
            provider.client_secret = self.cleaned_data["new_client_secret"]
        if commit:
            provider.save()
        return provider


class OIDCGroupMappingInline(admin.TabularInline):
    model = OIDCGroupMapping
    extra = 1
    fields = ("group", "team", "role")


def _mapping_rows(provider: OIDCProvider) -> list[str]:
    return sorted(str(m) for m in provider.group_mappings.select_related("team"))


@admin.register(OIDCProvider)
class OIDCProviderAdmin(AuditedAdmin):
    form = OIDCProviderForm
    list_display = ("label", "slug", "issuer", "client_id", "secret_set", "enabled")
    readonly_fields = ("secret_set", "callback_path", "managed_by_env")
    fields = (
        "label",
        "slug",
        "issuer",
        "client_id",
        "new_client_secret",
        "secret_set",
        "scopes",
        "groups_claim",
        "allowed_domains",
        "required_groups",
        "enabled",
        "callback_path",
        "managed_by_env",
    )
    inlines = [OIDCGroupMappingInline]

    @admin.display(boolean=True, description="secret set")
    def secret_set(self, provider: OIDCProvider) -> bool:
        return bool(provider.client_secret)

    @admin.display(description="redirect URI to register at the provider")
    def callback_path(self, provider: OIDCProvider) -> str:
        if provider.pk is None:
            return "shown after saving"
        return f"https://<this site>/login/oidc/{provider.slug}/callback/"

    def audit_extra_changes(self, form, before: dict) -> dict:
        if before.get("client_secret") and form.cleaned_data.get("new_client_secret"):
            return {"client_secret": ["set", "replaced"]}
        return {}

    def save_related(self, request, form, formsets, change):
        # The provider's own fields are audited by AuditedAdmin; its group mappings (an inline)
        # get an entry of their own, the whole list before -> after.
        provider = form.instance
        before = _mapping_rows(provider) if change else []
        super().save_related(request, form, formsets, change)
        after = _mapping_rows(provider)
        if before != after:
            audit.audit_record(
                actor=request.user,
                action="oidc.mapping_changed",
                obj=provider,
                changes={"group mappings": [before, after]},
                request=request,
            )


@admin.register(OIDCIdentity)
class OIDCIdentityAdmin(admin.ModelAdmin):
    list_display = ("user", "provider", "email", "subject", "last_login_at")
    list_filter = ("provider",)
    search_fields = ("user__username", "email", "subject")
    readonly_fields = (
        "provider",
        "subject",
        "user",
        "email",
        "groups",
        "created_at",
        "last_login_at",
    )

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Team)
class TeamAdmin(AuditedAdmin):
    list_display = ("name", "monthly_budget_usd", "member_monthly_cap_usd", "spent_this_month")
    search_fields = ("name",)
    filter_horizontal = ("allowed_models",)
    inlines = [MembershipInline]

    @admin.display(description="spent this month (USD)")
    def spent_this_month(self, team: Team) -> str:
        return f"{teams.spend(team=team).cost_usd:.2f}"


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "user",
        "team",
        "model_name",
        "provider_name",
        "served_model",
        "status",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_usd",
    )
    list_filter = ("team", "model_name", "status")
    search_fields = ("user__username", "model_name")
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class UserCreateForm(forms.ModelForm):
    """No password: the user sets one through the one-time link shown after saving."""

    team = forms.ModelChoiceField(Team.objects.all(), required=False)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)

    class Meta:
        model = User
        fields = ("username", "email", "first_name", "last_name")

    def save(self, commit=True):
        user = super().save(commit=False)
        user.set_unusable_password()
        if commit:
            user.save()
        return user


class UserActionForm(ActionForm):
    team = forms.ModelChoiceField(
        Team.objects.all(), required=False, label="Team (for “move to team”)"
    )


class AccountUserAdmin(AuditedAdmin, UserAdmin):
    add_form = UserCreateForm
    add_fieldsets = (
        (None, {"fields": ("username", "email", "first_name", "last_name", "team", "role")}),
    )
    action_form = UserActionForm
    list_display = ("username", "email", "team_names", "is_active", "is_staff", "last_login")
    list_filter = ("is_active", "is_staff", "memberships__team")
    inlines = [MembershipInline]
    actions = [
        "new_set_password_link",
        "deactivate_users",
        "reactivate_users",
        "move_to_team",
    ]

    @admin.display(description="teams")
    def team_names(self, user) -> str:
        return ", ".join(m.team.name for m in user.memberships.all())

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("memberships__team")

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []

    def save_model(self, request, obj, form, change) -> None:
        was_active = change and User.objects.filter(pk=obj.pk, is_active=True).exists()
        super().save_model(request, obj, form, change)
        if was_active and not obj.is_active:  # "Active" unticked: as the list action does
            accounts.user_access_end(user=obj)
        if not change and form.cleaned_data.get("team"):
            teams.membership_set(
                user=obj, team=form.cleaned_data["team"], role=form.cleaned_data["role"]
            )

    def user_change_password(self, request, id, form_url=""):
        with transaction.atomic(), accounts.password_change_from(request, user_id=unquote(id)):
            response = super().user_change_password(request, id, form_url)
            if request.method == "POST" and response.status_code == 302:
                audit.audit_record(
                    actor=request.user,
                    action="password.changed",
                    obj=self.get_object(request, unquote(id)),
                    request=request,
                )
        return response

    def response_add(self, request, obj, post_url_continue=None):
        self._announce_link(request, obj)
        return super().response_add(request, obj, post_url_continue)

    def _announce_link(self, request, user) -> None:
        link, mailed = accounts.set_password_link_issue(user=user, request=request)
        hours = settings.PASSWORD_RESET_TIMEOUT // 3600
        note = f" (also e-mailed to {user.email})" if mailed else ""
        self.message_user(
            request,
            f"One-time set-password link for {user.get_username()}, valid {hours} hours{note}: "
            f"{link}",
            messages.WARNING,
        )

    @admin.action(description="New set-password link")
    def new_set_password_link(self, request, queryset) -> None:
        for user in queryset:
            self._announce_link(request, user)

    @admin.action(description="Deactivate (log out everywhere)")
    def deactivate_users(self, request, queryset) -> None:
        users = [u for u in queryset if u.pk != request.user.pk]
        for user in users:
            accounts.user_deactivate(user=user, actor=request.user, request=request)
        self.message_user(request, f"Deactivated and logged out {len(users)} user(s).")

    @admin.action(description="Reactivate")
    def reactivate_users(self, request, queryset) -> None:
        for user in queryset:
            accounts.user_reactivate(user=user, actor=request.user, request=request)
        self.message_user(request, f"Reactivated {queryset.count()} user(s).")

    @admin.action(description="Move to team (choose it below the action)")
    def move_to_team(self, request, queryset) -> None:
        form = UserActionForm(request.POST)
        team = form.fields["team"].clean(request.POST.get("team")) if form else None
        if team is None:
            self.message_user(request, "Choose the team to move them to.", messages.ERROR)
            return
        for user in queryset:
            with transaction.atomic():
                before = audit.snapshot(user)
                teams.membership_move(user=user, team=team)
                audit.audit_record(
                    actor=request.user,
                    action="user.moved_team",
                    obj=user,
                    changes=audit.diff(before, audit.snapshot(user)),
                    request=request,
                )
        self.message_user(request, f"Moved {queryset.count()} user(s) to {team.name}.")


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """Read-only: entries are never added, edited or deleted from the admin (retention only)."""

    list_display = ("created_at", "actor_name", "action", "object_type", "object_repr", "address")
    list_filter = ("action",)
    search_fields = ("actor_name", "action", "object_repr", "address")
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# ---- sharing (issue 16) ----


@admin.register(ConversationShare)
class ConversationShareAdmin(admin.ModelAdmin):
    """Read-only: who shared which conversation with whom, and when it was revoked. Shares are
    made and revoked by conversation owners on the chat page (audited there)."""

    list_display = ("conversation", "shared_by", "team", "audience", "created_at", "revoked_at")
    list_filter = ("team", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("conversation__title", "shared_by__username", "team__name")
    date_hierarchy = "created_at"

    @admin.display(description="shared with")
    def audience(self, share: ConversationShare) -> str:
        names = sorted(u.get_username() for u in share.members.all())
        return ", ".join(names) if names else "the whole team"

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("conversation", "shared_by", "team")
            .prefetch_related("members")
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# ---- end sharing ----


admin.site.unregister(User)
admin.site.register(User, AccountUserAdmin)
admin.site.login_form = accounts.ThrottledAdminAuthenticationForm
_site_password_change = admin.site.password_change


def _password_change_own(request, extra_context=None):
    """The admin's "change my password": this browser's sockets stay, the others close."""
    with accounts.password_change_from(request, user_id=request.user.pk):
        return _site_password_change(request, extra_context)


admin.site.password_change = _password_change_own
