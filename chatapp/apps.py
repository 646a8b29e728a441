from django.apps import AppConfig

from .providers.scrub import install_log_scrubber


class ChatAppConfig(AppConfig):
    name = "chatapp"
    verbose_name = "Chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)

        # Provider keys never reach a log line, whoever logs the upstream's text.
        install_log_scrubber()
