from django.contrib import admin
from django.urls import path

from . import (
    account_views,
    batch_views,
    image_views,
    library_views,
    oidc_views,
    project_views,
    prompt_views,
    share_views,
    views,
)

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
    # ---- projects and the prompt library (project_views.py, prompt_views.py) ----
    path("projects/", project_views.projects_page, name="projects"),
    path("projects/new", project_views.project_create, name="project-create"),
    path("projects/<int:pk>/", project_views.project_page, name="project"),
    path("projects/<int:pk>/edit", project_views.project_update, name="project-update"),
    path("projects/<int:pk>/delete", project_views.project_delete, name="project-delete"),
    path(
        "projects/<int:pk>/new-chat",
        project_views.project_conversation_new,
        name="project-conversation-new",
    ),
    path(
        "projects/<int:pk>/pins/<int:attachment_pk>/remove",
        project_views.project_pin_remove,
        name="project-pin-remove",
    ),
    path("api/projects/", project_views.project_list, name="project-list"),
    path("api/projects/<int:pk>/pins", project_views.project_pins, name="project-pins"),
    path(
        "api/conversations/<int:pk>/project",
        project_views.conversation_project,
        name="conversation-project",
    ),
    path("prompts/", prompt_views.prompts_page, name="prompts"),
    path("prompts/new", prompt_views.prompt_create, name="prompt-create"),
    path("prompts/<int:pk>/edit", prompt_views.prompt_update, name="prompt-update"),
    path("prompts/<int:pk>/delete", prompt_views.prompt_delete, name="prompt-delete"),
    path("prompts/export.json", prompt_views.prompts_export, name="prompts-export"),
    path("prompts/import", prompt_views.prompts_import, name="prompts-import"),
    path("api/prompts/", prompt_views.prompt_list, name="prompt-list"),
    # ---- sharing (issue 16) ----
    path(
        "api/conversations/<int:pk>/shares",
        share_views.conversation_shares,
        name="conversation-shares",
    ),
    path("api/shares/<int:pk>/revoke", share_views.share_revoke, name="share-revoke"),
    path("shared/<int:pk>/", share_views.shared_page, name="shared"),
    path("api/shared/<int:pk>/fork", share_views.share_fork, name="share-fork"),
    # ---- end sharing ----
    path("healthz", views.healthz, name="healthz"),
    # The admin's log-out, through the app's view so it is audited too (matched before admin's).
    path(
        "admin/logout/",
        account_views.LogoutView.as_view(next_page="admin:login"),
        name="admin-logout",
    ),
    path("admin/", admin.site.urls),
]
