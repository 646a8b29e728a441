from django.contrib import admin
from django.urls import path

from . import account_views, batch_views, image_views, library_views, oidc_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("c/<int:pk>/", views.conversation_page, name="conversation"),
    path("api/conversations/", views.conversation_new, name="conversation-new"),
    path("login/", account_views.LoginView.as_view(), name="login"),
    path("login/oidc/<slug:slug>/", oidc_views.oidc_login, name="oidc-login"),
    path("login/oidc/<slug:slug>/callback/", oidc_views.oidc_callback, name="oidc-callback"),
    path("api/attachments/", image_views.upload, name="attachment-upload"),
    path(
        "api/attachments/pdf-preview/",
        image_views.pdf_preview,
        name="attachment-pdf-preview",
    ),
    path("api/attachments/<int:pk>/", image_views.attachment_remove, name="attachment-remove"),
    path(
        "attachments/<int:pk>/thumbnail/",
        image_views.attachment_thumbnail,
        name="attachment-thumbnail",
    ),
    path(
        "attachments/<int:pk>/image/<int:part>/",
        image_views.attachment_image,
        name="attachment-image",
    ),
    path("api/conversations/search", library_views.conversation_search, name="conversation-search"),
    path(
        "api/conversations/<int:pk>/rename",
        library_views.conversation_rename,
        name="conversation-rename",
    ),
    path(
        "api/conversations/<int:pk>/settings",
        library_views.conversation_settings,
        name="conversation-settings",
    ),
    path(
        "api/conversations/<int:pk>/delete",
        library_views.conversation_delete,
        name="conversation-delete",
    ),
    path(
        "c/<int:pk>/export.md",
        library_views.conversation_export_markdown,
        name="conversation-export-md",
    ),
    path(
        "c/<int:pk>/export.json",
        library_views.conversation_export_json,
        name="conversation-export-json",
    ),
    path("logout/", oidc_views.LogoutView.as_view(), name="logout"),
    path(
        "set-password/<uidb64>/<token>/",
        account_views.SetPasswordView.as_view(),
        name="set-password",
    ),
    path(
        "set-password/done/", account_views.SetPasswordDoneView.as_view(), name="set-password-done"
    ),
    path("settings/", account_views.settings_page, name="settings"),
    path("settings/team/", account_views.settings_team, name="settings-team"),
    path("team/", account_views.team_page, name="team"),
    path(
        "team/members/<int:user_id>/active/",
        account_views.team_member_active,
        name="team-member-active",
    ),
    path("usage/", account_views.usage_report, name="usage"),
    path("usage.csv", account_views.usage_csv, name="usage-csv"),
    path("audit/", account_views.audit_log, name="audit"),
    path("audit.csv", account_views.audit_csv, name="audit-csv"),
    path("batches/", batch_views.batch_page, name="batches"),
    path("batches/<int:pk>/", batch_views.batch_page, name="batch"),
    path("api/batches/files", batch_views.batch_files, name="batch-files"),
    path("api/batches/estimate", batch_views.batch_estimate, name="batch-estimate"),
    path("api/batches/", batch_views.batch_create, name="batch-create"),
    path("api/batches/<int:pk>/delete", batch_views.batch_delete, name="batch-delete"),
    path("api/batches/<int:pk>/<str:action>", batch_views.batch_action, name="batch-action"),
    path(
        "api/batches/<int:pk>/items/<int:item_pk>/open",
        batch_views.batch_item_open,
        name="batch-item-open",
    ),
    path("batches/<int:pk>/export.csv", batch_views.batch_export_csv, name="batch-export-csv"),
    path(
        "batches/<int:pk>/export-excel.csv",
        batch_views.batch_export_excel,
        name="batch-export-excel",
    ),
    path(
        "batches/<int:pk>/export.jsonl", batch_views.batch_export_jsonl, name="batch-export-jsonl"
    ),
    path("healthz", views.healthz, name="healthz"),
    # The admin's log-out, through the app's view so it is audited too (matched before admin's).
    path(
        "admin/logout/",
        account_views.LogoutView.as_view(next_page="admin:login"),
        name="admin-logout",
    ),
    path("admin/", admin.site.urls),
]
