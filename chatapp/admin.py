from django import forms
from django.contrib import admin

from .models import Conversation, Message, ModelConfig, Provider


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
class ProviderAdmin(admin.ModelAdmin):
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


@admin.register(ModelConfig)
class ModelConfigAdmin(admin.ModelAdmin):
    list_display = (
        "display_name",
        "model_id",
        "provider",
        "vision",
        "reasoning",
        "context_window",
        "max_output_tokens",
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
