from django.contrib import admin

from .models import Conversation, Message, ModelConfig, Provider


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "base_url", "enabled", "managed_by_env")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "base_url")
    exclude = ("api_key",)  # never shown back; set through the environment


@admin.register(ModelConfig)
class ModelConfigAdmin(admin.ModelAdmin):
    list_display = (
        "display_name",
        "model_id",
        "provider",
        "vision",
        "reasoning",
        "context_window",
        "price_input",
        "price_cached_input",
        "price_output",
        "enabled",
    )
    list_filter = ("provider", "vision", "reasoning", "enabled")
    search_fields = ("display_name", "model_id")


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "status", "content", "prompt_tokens", "cached_tokens", "completion_tokens")
    readonly_fields = fields
    show_change_link = True


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("__str__", "owner", "model", "created_at", "updated_at")
    list_filter = ("model",)
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
        "created_at",
    )
    list_filter = ("role", "status")
    search_fields = ("content", "reasoning", "error", "conversation__title")
    readonly_fields = ("created_at", "updated_at")
