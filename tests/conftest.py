import asyncio
import os
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.core.cache import cache, caches
from django.test import Client

from chatapp import generation, reaper
from chatapp.asgi import application
from chatapp.model_catalog import catalog_sync, reset_catalog_cache
from tests.fake_upstream import FakeUpstream

# A page served by http://127.0.0.1 (port 80) opening its socket: Origin and Host agree.
ORIGIN = (b"origin", b"http://127.0.0.1")
HOST = (b"host", b"127.0.0.1")

# Redis pub/sub and keys are shared by every database index and every test run on the machine:
# each run gets its own channel-layer prefix (daphne subprocesses are given the same one).
CHANNEL_LAYER_PREFIX = f"test{os.getpid()}x{uuid.uuid4().hex[:6]}"


@pytest.fixture(autouse=True)
def _test_settings(settings, request, tmp_path):
    # Plain storage: tests do not need collectstatic's hashed manifest.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    # The production hasher is slow on purpose; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.MEDIA_ROOT = tmp_path / "media"  # uploaded images never land in ./var
    settings.STATIC_ROOT = tmp_path / "static"  # whitenoise wants the folder to exist
    settings.STATIC_ROOT.mkdir()
    settings.STREAM_CHECKPOINT_INTERVAL = 0.05
    settings.UPSTREAM_RETRY_BASE_DELAY = 0.01
    settings.UPSTREAM_STALL_TIMEOUT = 5.0
    settings.DEMO_TOKENS_PER_SECOND = 2000
    settings.MOONSHOT_API_KEY = ""
    settings.OPENAI_COMPAT_BASE_URL = ""
    settings.OPENAI_COMPAT_MODELS = []
    reset_catalog_cache()
    layer = settings.CHANNEL_LAYERS["default"]
    if layer["BACKEND"].startswith("channels_redis"):
        settings.CHANNEL_LAYERS = {
            "default": {**layer, "CONFIG": {**layer["CONFIG"], "prefix": CHANNEL_LAYER_PREFIX}}
        }
    channel_layers.backends.clear()  # a fresh layer per test (and per event loop)
    if request.node.get_closest_marker("django_db") or {"db", "transactional_db"} & set(
        request.fixturenames
    ):
        cache.clear()  # login throttling counts in the (database) cache
        caches["rate"].clear()  # and the send rate limit in memory (embedded) or Redis
    yield
    for running in list(generation.RUNNING.values()):
        if running.task:
            running.task.cancel()
    generation.RUNNING.clear()
    for task in list(reaper._tasks.values()):
        task.cancel()
    reset_catalog_cache()


# Single sign-on: slug at the app -> client id at the test identity provider (tests/idp.py);
# all but the first get a doctored ID token there (see tests/oidc_idp/server.mjs).
OIDC_CLIENTS = {
    "company": "kimichat",
    "wrongaud": "kimichat-wrong-aud",
    "expired": "kimichat-expired",
    "badsig": "kimichat-bad-sig",
    "badnonce": "kimichat-bad-nonce",
    "wrongiss": "kimichat-wrong-iss",
}


@pytest.fixture(scope="session")
def idp():
    """A real OpenID Connect provider (node + oidc-provider), started once when first needed."""
    from tests.idp import IdentityProvider

    server = IdentityProvider(
        [
            (client_id, [f"http://testserver/login/oidc/{slug}/callback/"])
            for slug, client_id in OIDC_CLIENTS.items()
        ],
        post_logout=["http://testserver/login/"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _upstream_server():
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
def fake_upstream(_upstream_server, settings):
    """The fake upstream, configured as the OpenAI-compatible provider."""
    _upstream_server.reset()
    settings.OPENAI_COMPAT_BASE_URL = _upstream_server.base_url
    settings.OPENAI_COMPAT_API_KEY = "test-key"
    settings.OPENAI_COMPAT_MODELS = ["fake-model"]
    reset_catalog_cache()
    catalog_sync()
    return _upstream_server


def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def open_socket(user, conversation_id, *, origin=ORIGIN):
    """-> (connected, close code, communicator), through the real ASGI stack."""
    headers = [HOST, origin]
    if user is not None:
        headers.append((b"cookie", await database_sync_to_async(session_cookie)(user)))
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation_id}/", headers=headers
    )
    connected, code = await communicator.connect()
    return connected, code, communicator


async def connect(user, conversation_id, *, origin=ORIGIN) -> WebsocketCommunicator:
    """A websocket through the real ASGI stack (Origin check, session auth, routing)."""
    headers = [HOST, origin]
    if user is not None:
        headers.append((b"cookie", await database_sync_to_async(session_cookie)(user)))
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation_id}/", headers=headers
    )
    # Channels' default is 1 s: the join's round trip through Redis takes longer on a busy machine.
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return communicator


async def receive_until(communicator, frame_type: str, timeout: float = 5.0) -> list[dict]:
    """Every frame up to and including the first of `frame_type`."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await communicator.receive_json_from(timeout=timeout)
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI's production-shape run (REQUIRE_SERVICES=1) a production test may not skip: a
    missing PostgreSQL or Redis is a failure there, not a quiet pass."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("REQUIRE_SERVICES")
        and item.get_closest_marker("production")
    ):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"REQUIRE_SERVICES=1, but this production-shape test skipped: {reason}"
