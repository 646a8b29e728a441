from django.urls import path

from .consumers import BatchConsumer, ChatConsumer, SharedConsumer

websocket_urlpatterns = [
    path("ws/conversations/<int:conversation_id>/", ChatConsumer.as_asgi()),
    path("ws/batches/<int:batch_id>/", BatchConsumer.as_asgi()),
    # Sharing (issue 16): a read-only view through a share.
    path("ws/shared/<int:share_id>/", SharedConsumer.as_asgi()),
]
