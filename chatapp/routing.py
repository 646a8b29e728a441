from django.urls import path

from .consumers import BatchConsumer, ChatConsumer

websocket_urlpatterns = [
    path("ws/conversations/<int:conversation_id>/", ChatConsumer.as_asgi()),
    path("ws/batches/<int:batch_id>/", BatchConsumer.as_asgi()),
]
