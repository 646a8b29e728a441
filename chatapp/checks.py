"""Guard rails as Django system checks."""

from django.conf import settings
from django.core.checks import Warning, register


@register(deploy=True)
def in_memory_layer_in_production(app_configs, **kwargs):
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    if not settings.DEBUG and backend.endswith("InMemoryChannelLayer"):
        return [
            Warning(
                "The in-memory channel layer only works with a single process.",
                hint="Set REDIS_URL to run several daphne processes.",
                id="chatapp.W001",
            )
        ]
    return []
