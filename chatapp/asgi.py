"""ASGI entry point: HTTP through Django, websockets through Channels (session auth + Origin check)."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from .image_views import upload_size_guard  # noqa: E402
from .reaper import with_reaper  # noqa: E402
from .routing import websocket_urlpatterns  # noqa: E402
from .tasks import with_batch_worker  # noqa: E402

application = with_batch_worker(
    with_reaper(
        ProtocolTypeRouter(
            {
                "http": upload_size_guard(django_asgi_app),
                "websocket": AllowedHostsOriginValidator(
                    AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
                ),
            }
        )
    )
)

# Start-up objects live for the whole process: keep them out of the collector's generations so
# a full collection does not pause every stream (measured: a 600 ms pause set the latency tail).
gc.collect()
gc.freeze()
