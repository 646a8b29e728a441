"""ASGI entry point: HTTP through Django, websockets through Channels.

In front of both (chatapp/guards.py): the client address as trusted per TRUSTED_PROXIES, the
request body limit (also installed into daphne's request handling, which reads bodies before
any application code runs) and, for sockets, the Origin check (CSRF's rule: scheme, host, port).
"""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (after setup)

from .guards import (  # noqa: E402
    body_limit_guard,
    install_daphne_body_limit,
    proxy_guard,
    socket_auth_stack,
    websocket_origin_guard,
)
from .reaper import with_reaper  # noqa: E402
from .routing import websocket_urlpatterns  # noqa: E402
from .tasks import with_batch_worker  # noqa: E402

application = with_batch_worker(
    with_reaper(
        proxy_guard(
            ProtocolTypeRouter(
                {
                    "http": body_limit_guard(django_asgi_app),
                    "websocket": websocket_origin_guard(
                        socket_auth_stack(URLRouter(websocket_urlpatterns))
                    ),
                }
            )
        )
    )
)
install_daphne_body_limit()

# Start-up objects live for the whole process: keep them out of the collector's generations so
# a full collection does not pause every stream (measured: a 600 ms pause set the latency tail).
gc.collect()
gc.freeze()
