"""The doors in front of the app (chatapp/guards.py): the client address behind proxies, the
request body limit as daphne reads the body, and the Content-Security-Policy header."""

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatapp.asgi import application
from chatapp.guards import client_address
from chatapp.serving import daphne_args

ROOT = Path(__file__).resolve().parent.parent

# ---- client address ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trusted, peer, forwarded, expected",
    [
        (0, "203.0.113.7", ["1.2.3.4"], "203.0.113.7"),  # no proxy: the header is the client's word
        (1, "10.0.0.2", ["203.0.113.7"], "203.0.113.7"),  # nginx set it
        (1, "10.0.0.2", ["1.2.3.4", "203.0.113.7"], "203.0.113.7"),  # a proxy that appends
        (1, "10.0.0.2", [], "10.0.0.2"),  # nothing forwarded: the peer
        (2, "10.0.0.2", ["1.2.3.4", "203.0.113.7", "10.0.0.9"], "203.0.113.7"),
        (["10.0.0.0/8"], "10.0.0.2", ["1.2.3.4", "203.0.113.7", "10.0.0.9"], "203.0.113.7"),
        (["10.0.0.0/8"], "198.51.100.1", ["1.2.3.4"], "198.51.100.1"),  # peer not a proxy
        (["10.0.0.0/8", "::1"], "::1", ["2001:db8::5"], "2001:db8::5"),
    ],
)
def test_the_client_is_the_last_untrusted_hop(settings, trusted, peer, forwarded, expected):
    settings.TRUSTED_PROXIES = trusted
    assert client_address(peer, forwarded) == expected


async def _login_attempts(*, peer: str, forwarded: list[str]) -> list[str]:
    """One failed log-in per X-Forwarded-For value (each as a new user name, so only the address
    counter can lock), through the real ASGI stack from `peer`; -> each page's text."""
    transport = httpx.ASGITransport(app=application, client=(peer, 40000))
    pages = []
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        form = await client.get("/login/")
        token = form.text.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
        for i, hop in enumerate(forwarded):
            response = await client.post(
                "/login/",
                data={
                    "username": f"guess{i}-{hop}",
                    "password": "wrong",
                    "csrfmiddlewaretoken": token,
                },
                headers={"X-Forwarded-For": hop},
            )
            assert response.status_code == 200
            pages.append(response.text)
    return pages


@pytest.mark.django_db(transaction=True)
async def test_a_forged_forwarded_for_does_not_change_the_address_login_throttling_counts(
    settings,
):
    """Behind one proxy that appends the real address to whatever the client sent, a client
    choosing a new first hop per try is still one address to the per-address lock."""
    settings.TRUSTED_PROXIES = 1
    settings.LOGIN_MAX_FAILURES_PER_IP = 3
    locked = "Too many failed log-ins for your network address"
    forged = [f"198.51.100.{i}, 203.0.113.7" for i in range(1, 5)]
    pages = await _login_attempts(peer="10.0.0.2", forwarded=forged)
    assert [locked in page for page in pages] == [False, False, False, True]
    # Another client behind the same proxy is not locked out by that one.
    other = await _login_attempts(peer="10.0.0.2", forwarded=["198.51.100.1, 203.0.113.99"])
    assert locked not in other[0]


@pytest.mark.django_db(transaction=True)
async def test_without_trusted_proxies_the_header_is_ignored(settings):
    settings.TRUSTED_PROXIES = 0
    settings.LOGIN_MAX_FAILURES_PER_IP = 2
    pages = await _login_attempts(peer="203.0.113.7", forwarded=["1.1.1.1", "2.2.2.2", "3.3.3.3"])
    assert "for your network address" in pages[-1]


# ---- request body limits, measured on a real daphne socket ---------------------------------

MB = 1024 * 1024
LIMIT = 1 * MB  # DATA_UPLOAD_MAX_MEMORY_SIZE given to the server below
UPLOAD_LIMIT = 2 * MB  # IMAGE_, PDF_ and VIDEO_MAX_UPLOAD_BYTES given to it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def daphne_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bodylimit")
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="chatapp.settings",
        DATA_DIR=str(tmp),
        SQLITE_PATH=str(tmp / "db.sqlite3"),
        STATIC_ROOT=str(tmp / "static"),
        DATA_UPLOAD_MAX_MEMORY_SIZE=str(LIMIT),
        IMAGE_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        PDF_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        VIDEO_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
    )
    log = open(tmp / "daphne.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "daphne", *daphne_args("127.0.0.1", port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("daphne did not start:\n" + (tmp / "daphne.log").read_text()[-3000:])
            time.sleep(0.3)
    yield port
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def _chunked_post(port: int, path: str, total: int, *, chunk: int = 64 * 1024) -> tuple[int, int]:
    """POST `total` bytes as a chunked body, as fast as the server takes them, stopping as soon
    as the server answers. -> (status, body bytes sent before the answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    piece = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    sent = 0
    answered = False
    try:
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                answered = True
                break
            if writable:
                sock.sendall(piece)
                sent += chunk
        if not answered:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = b""
    try:
        while b"\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
    return status, sent


def test_a_chunked_upload_over_the_limit_is_refused_before_it_is_read(daphne_server):
    """60 MB, chunked (no Content-Length to refuse up front), to an ordinary route: the server
    answers 413 once it has counted past the limit, and the client had sent a small part."""
    status, sent = _chunked_post(daphne_server, "/api/conversations/", 60 * MB)
    assert status == 413
    # What was sent is the limit plus what the two sockets' kernel buffers held.
    assert sent < 20 * MB, f"{sent / MB:.1f} MB were sent before the refusal"


def test_upload_routes_keep_their_own_larger_limit(daphne_server):
    status, sent = _chunked_post(daphne_server, "/api/attachments/", 60 * MB)
    assert status == 413 and sent < 20 * MB
    # Over the ordinary limit but under the upload limit: passes the body limit and reaches
    # Django (which refuses it for the missing CSRF token, not for its size).
    status, _ = _chunked_post(daphne_server, "/api/attachments/", int(1.5 * MB))
    assert status == 403
    status, _ = _chunked_post(daphne_server, "/api/conversations/", int(1.5 * MB))
    assert status == 413


def test_a_declared_oversize_body_is_refused_before_any_byte_of_it(daphne_server):
    sock = socket.create_connection(("127.0.0.1", daphne_server), timeout=30)
    sock.sendall(
        f"POST /api/conversations/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {60 * MB}\r\n\r\n".encode()
    )
    response = sock.recv(65536)
    sock.close()
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"too_large"' in response


# ---- Content-Security-Policy ---------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/login/", "/", "/settings/", "/batches/", "/admin/"])
def test_every_page_carries_the_strict_policy(client, django_user_model, path):
    user = django_user_model.objects.create_user(username="p", password="pw-123-abc", is_staff=True)
    client.force_login(user)
    response = client.get(path, follow=True)
    assert response.status_code == 200
    policy = dict(
        (part.strip().split(" ", 1) + [""])[:2]
        for part in response["Content-Security-Policy"].split(";")
    )
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["object-src"] == "'none'"
    assert policy["base-uri"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self' ws://testserver"
    assert set(policy["img-src"].split()) == {"'self'", "data:", "blob:"}
    body = response.content.decode()
    assert "<script>" not in body and " style=" not in body


# ---- the socket's Origin behind a TLS proxy ------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("trusted, accepted", [(1, True), (0, False)])
async def test_https_origin_is_the_pages_own_only_when_a_trusted_proxy_says_https(
    settings, trusted, accepted
):
    """Behind a TLS proxy the page is https://host and the socket reaches daphne as ws://; the
    proxy's X-Forwarded-Proto makes the two the same origin, but only a trusted proxy's."""
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator

    from tests.conftest import session_cookie
    from tests.factories import conversation_create, user_create

    settings.TRUSTED_PROXIES = trusted
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    cookie = await database_sync_to_async(session_cookie)(user)
    ws = WebsocketCommunicator(
        application,
        f"/ws/conversations/{conversation.pk}/",
        headers=[
            (b"host", b"127.0.0.1"),
            (b"origin", b"https://127.0.0.1"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-for", b"203.0.113.7"),
            (b"cookie", cookie),
        ],
    )
    connected, _ = await ws.connect(timeout=10)
    assert connected is accepted
    if connected:
        await ws.disconnect()


def test_no_template_has_inline_script_handlers_or_styles():
    """The policy refuses them: an inline <script>, an on…= handler or a style= attribute in a
    template is dead (or a violation) in the browser. Script and style live in static files."""
    import re

    inline = re.compile(
        r"<script(?![^>]*\bsrc=)[^>]*>|\son[a-z]+\s*=|\sstyle\s*=|<style\b|javascript:", re.I
    )
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for path in (ROOT / "templates").rglob("*.html")
        for match in inline.finditer(path.read_text())
    ]
    assert not found
