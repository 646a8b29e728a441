"""The doors in front of Django and Channels: client address, socket Origin, request body size,
and the Content-Security-Policy of every page.

- Client address (TRUSTED_PROXIES): daphne's scope["client"] is the TCP peer. Behind proxies the
  client is the last hop of X-Forwarded-For that is not a trusted proxy: with a count N, the peer
  and the N-1 hops before it are proxies; with a list of addresses / networks, every hop in it
  is. `proxy_guard` rewrites scope["client"] (Django's REMOTE_ADDR, audit.client_ip, the log-in
  throttle) and drops X-Forwarded-For / X-Forwarded-Proto unless the peer is a trusted proxy, so
  SECURE_PROXY_SSL_HEADER cannot be forged by a client talking to daphne directly. daphne's own
  `--proxy-headers` takes the first (client-chosen) X-Forwarded-For value: never use it.
- Socket Origin: the same rule as Django's CSRF check of an Origin header (scheme, host and
  port): the request's own origin (Host header, checked against ALLOWED_HOSTS, and the scheme,
  honouring SECURE_PROXY_SSL_HEADER) or one of CSRF_TRUSTED_ORIGINS. A missing Origin is refused.
- Body size: daphne (Twisted) reads a whole request body into a file before the application
  sees any of it, so a size check in Django or an ASGI middleware comes after the bytes were
  read. `install_daphne_body_limit` gives daphne a request class that counts the body as it
  arrives (Content-Length or chunked) and answers 413 and stops reading at the route's limit
  (`body_limit`). `body_limit_guard` does the same at the ASGI level for servers that stream
  the body to the application (and answers a declared oversize Content-Length at once).
- CSP: django-csp's middleware with the policy in settings.CONTENT_SECURITY_POLICY, plus the
  page's own websocket origin (ws:// or wss:// of its host) in connect-src.
"""

from __future__ import annotations

import ipaddress
import logging
from functools import lru_cache
from urllib.parse import unquote, urlsplit

import orjson
from channels.auth import AuthMiddleware, get_user
from channels.sessions import CookieMiddleware, SessionMiddleware
from csp.middleware import CSPMiddleware
from daphne import http_protocol
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.utils.http import is_same_domain

from .dbreads import read_off_loop

log = logging.getLogger(__name__)

# ---- client address ------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _normal(address: str) -> str:
    address = address.strip().strip('"')
    if address.startswith("[") and "]" in address:  # [v6]:port
        address = address[1 : address.index("]")]
    elif address.count(":") == 1:  # v4:port
        address = address.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address[:64]


def _in_networks(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def peer_is_proxy(peer: str) -> bool:
    trusted = settings.TRUSTED_PROXIES
    if isinstance(trusted, int):
        return trusted > 0
    return _in_networks(_normal(peer), _networks(tuple(trusted)))


def client_address(peer: str, forwarded_for: list[str]) -> str:
    """The client's address: the last hop (right to left) that is not a trusted proxy."""
    trusted = settings.TRUSTED_PROXIES
    if not peer_is_proxy(peer):
        return _normal(peer)
    chain = [_normal(hop) for hop in forwarded_for if hop.strip()] + [_normal(peer)]
    if isinstance(trusted, int):
        # The peer and the trusted-1 hops before it are ours; fewer hops than that means the
        # request skipped a proxy: the leftmost hop is all there is.
        return chain[max(len(chain) - 1 - trusted, 0)]
    networks = _networks(tuple(trusted))
    for hop in reversed(chain):
        if not _in_networks(hop, networks):
            return hop
    return chain[0]


def _forwarded_for(headers) -> list[str]:
    values = [value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for"]
    return [hop for value in values for hop in value.split(",")]


FORWARDED_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")


def proxy_guard(app):
    """ASGI wrapper: scope["client"] becomes the client as trusted per TRUSTED_PROXIES."""

    async def guarded(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = scope.get("headers") or []
            peer = (scope.get("client") or ("",))[0]
            if peer_is_proxy(peer):
                address = client_address(peer, _forwarded_for(headers))
                if address != peer:
                    scope = {**scope, "client": (address, 0)}
            elif any(name in FORWARDED_HEADERS for name, _ in headers):
                # A client talking to us directly may not claim an address or https.
                kept = [(name, value) for name, value in headers if name not in FORWARDED_HEADERS]
                scope = {**scope, "headers": kept}
        await app(scope, receive, send)

    return guarded


# ---- websocket Origin ----------------------------------------------------------------------


class _ScopeRequest(HttpRequest):
    """Just enough of a request for Django's own get_host() and is_secure() rules."""

    def __init__(self, scope) -> None:
        super().__init__()
        self._scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        for name, value in scope.get("headers") or []:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            self.META[key] = f"{self.META[key]},{text}" if key in self.META else text
        server = scope.get("server") or ("", "")
        self.META["SERVER_NAME"], self.META["SERVER_PORT"] = str(server[0]), str(server[1])

    def _get_scheme(self) -> str:
        return self._scheme


def origin_allowed(scope) -> bool:
    """Django's CsrfViewMiddleware._origin_verified, for a websocket handshake."""
    request = _ScopeRequest(scope)
    origin = request.META.get("HTTP_ORIGIN", "")
    if not origin or "HTTP_HOST" not in request.META:
        return False
    try:
        good = f"{'https' if request.is_secure() else 'http'}://{request.get_host()}"
    except DisallowedHost:
        good = None
    if good is not None and origin.lower() == good.lower():
        return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in {entry for entry in trusted if "*" not in entry}:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(
        is_same_domain(parsed.netloc, pattern.netloc.lstrip("*"))
        for pattern in (urlsplit(entry) for entry in trusted if "*" in entry)
        if pattern.scheme == parsed.scheme
    )


def websocket_origin_guard(app):
    """ASGI wrapper for websockets: a handshake from another origin is refused (HTTP 403)."""

    async def guarded(scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        await app(scope, receive, send)

    return guarded


class _SocketAuthMiddleware(AuthMiddleware):
    """Channels' AuthMiddleware, its session and user lookup on the read threads
    (chatapp/dbreads.py): a socket is authenticated without queueing behind the writes."""

    async def resolve_scope(self, scope):
        scope["user"]._wrapped = await read_off_loop(get_user.func)(scope)


def socket_auth_stack(app):
    """Channels' AuthMiddlewareStack (cookies, session, user), with _SocketAuthMiddleware."""
    return CookieMiddleware(SessionMiddleware(_SocketAuthMiddleware(app)))


# ---- request body size ---------------------------------------------------------------------

MB = 1024 * 1024
# Multipart framing around an uploaded file: boundary lines and part headers.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/api/attachments/", "/api/attachments/pdf-preview/")
BATCH_FILES_PATH = "/api/batches/files"


def is_upload(method: str, path: str) -> bool:
    return method == "POST" and (path in UPLOAD_PATHS or path == BATCH_FILES_PATH)


def body_limit(method: str, path: str) -> int:
    """The largest request body this route accepts, in bytes."""
    if method == "POST" and path in UPLOAD_PATHS:
        largest = max(
            settings.IMAGE_MAX_UPLOAD_BYTES,
            settings.PDF_MAX_UPLOAD_BYTES,
            settings.VIDEO_MAX_UPLOAD_BYTES,
        )
        return largest + MULTIPART_OVERHEAD
    if method == "POST" and path == BATCH_FILES_PATH:
        return settings.BATCH_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE + MULTIPART_OVERHEAD


def too_large_body(limit: int, *, upload: bool) -> bytes:
    """The 413's JSON, in the words the composer shows (the file limit, not the framing)."""
    size = limit - MULTIPART_OVERHEAD
    text = f"{max(1, round(size / 1024))} KB" if size < MB else f"{size / MB:.1f} MB"
    if upload:
        message = f"The file is too large; the upload limit is {text}."
    else:
        message = f"The request is too large; the limit is {text}."
    return orjson.dumps({"code": "too_large", "message": message})


def body_limit_guard(app):
    """ASGI wrapper: a body over its route's limit gets 413 as soon as it is declared or counted
    (daphne's own request class, below, has usually refused it before the app runs)."""

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        limit = body_limit(scope["method"], scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        refused = False
        started = False
        received = 0

        async def refuse() -> None:
            nonlocal refused
            refused = True
            if started:
                return
            body = too_large_body(limit, upload=is_upload(scope["method"], scope["path"]))
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

        if declared.isdigit() and int(declared) > limit:
            await refuse()
            return

        async def counted_receive():
            nonlocal received
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await refuse()
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await app(scope, counted_receive, guarded_send)

    return guarded


# After refusing, the connection stays open (not reading) this long so the client can read the
# 413 before the socket closes.
REFUSE_LINGER_SECONDS = 2.0


class BodyLimitedRequest(http_protocol.WebRequest):
    """daphne's request, counting the body as Twisted hands it over and refusing it at the
    route's limit, before the rest is read (the stock class spools all of it to a file)."""

    _limit: int | None = None
    _upload = False
    _received = 0
    _refused = False

    def gotLength(self, length):
        channel = self.channel
        method = (getattr(channel, "_command", b"") or b"").decode("latin-1")
        raw_path = (getattr(channel, "_path", b"") or b"").split(b"?", 1)[0]
        try:
            path = unquote(raw_path.decode("ascii"))
        except UnicodeDecodeError:
            path = ""
        self._limit = body_limit(method, path)
        self._upload = is_upload(method, path)
        if length is not None and length > self._limit:
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        # Imported here: importing the reactor installs one, and daphne installs its own first.
        from twisted.internet import reactor

        self._refused = True
        channel = self.channel
        transport = getattr(channel, "transport", None)
        if transport is None:
            return
        body = too_large_body(self._limit or 0, upload=self._upload)
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        transport.pauseProducing()  # read no more of the body
        log.info("request body over %s bytes refused", self._limit)
        reactor.callLater(REFUSE_LINGER_SECONDS, channel.loseConnection)

    def requestReceived(self, command, path, version):
        if self._refused:  # the body ended within what was already read: answered, done
            return
        super().requestReceived(command, path, version)


def install_daphne_body_limit() -> None:
    """daphne's HTTP factory builds each request from this module attribute."""
    http_protocol.WebRequest = BodyLimitedRequest


# ---- one thread per request -------------------------------------------------------------------


class OneThreadPerRequest:
    """Last in MIDDLEWARE, and sync only, so Django runs the whole (sync-capable) middleware
    chain as plain calls in one thread per request. Otherwise, under ASGI, each middleware
    method is its own trip between the event loop and that thread (about a dozen a request,
    each waking both), and the async half of the chain runs on the event loop that relays
    every stream (py-spy, 200 people opening chats at once: 7 % of the process)."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)


# ---- Content-Security-Policy -----------------------------------------------------------------


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    """settings.CONTENT_SECURITY_POLICY, with connect-src naming the page's websocket origin
    (`'self'` covers ws: in CSP 3, but not every browser shipped that)."""

    def process_response(self, request, response):
        try:
            host = request.get_host()
        except DisallowedHost:
            host = None
        if host:
            scheme = "wss" if request.is_secure() else "ws"
            update = dict(getattr(response, "_csp_update", None) or {})
            update["connect-src"] = [*update.get("connect-src", ()), f"{scheme}://{host}"]
            response._csp_update = update
        return super().process_response(request, response)
