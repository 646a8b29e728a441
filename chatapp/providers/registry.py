"""One pooled httpx.AsyncClient per provider (and per event loop: pooled connections are bound
to the loop that opened them)."""

import asyncio
import weakref

import httpx
from django.conf import settings

from .base import ProviderClient
from .demo import DemoClient
from .moonshot import MoonshotClient
from .openai_batches import OpenAIBatchClient
from .openai_compat import OpenAICompatClient
from .transport import transport as upstream_transport
from .workers_ai import WorkersAIBatchClient, WorkersAIClient

CLIENT_CLASSES: dict[str, type[OpenAICompatClient]] = {
    "moonshot": MoonshotClient,
    "workers_ai": WorkersAIClient,
    "openai_compat": OpenAICompatClient,
}

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, ProviderClient]]" = (
    weakref.WeakKeyDictionary()
)


def _http_client() -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.UPSTREAM_CONNECT_TIMEOUT,
        # httpx applies the read timeout to each socket read: no bytes for this long = stalled.
        read=settings.UPSTREAM_STALL_TIMEOUT,
        write=30.0,
        pool=30.0,
    )
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        follow_redirects=False,
        transport=upstream_transport(limits=limits),
    )


def client_for(*, kind: str, base_url: str, api_key: str, name: str = "") -> ProviderClient:
    if kind == "demo":
        return DemoClient(tokens_per_second=settings.DEMO_TOKENS_PER_SECOND)
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    key = (kind, base_url, api_key, name)
    client = per_loop.get(key)
    if client is None:
        client_class = CLIENT_CLASSES.get(kind, OpenAICompatClient)
        client = client_class(base_url=base_url, api_key=api_key, http=_http_client(), name=name)
        per_loop[key] = client
    return client


def batch_client_for(*, base_url: str, api_key: str) -> WorkersAIBatchClient:
    return WorkersAIBatchClient(base_url=base_url, api_key=api_key, http=_http_client())


def openai_batch_client_for(*, base_url: str, api_key: str) -> OpenAIBatchClient:
    return OpenAIBatchClient(base_url=base_url, api_key=api_key, http=_http_client())
