"""Settings: every value comes from the environment, with the embedded default when unset.

Nothing set gives a working single-process install: SQLite in ./var, the in-memory channel layer
and the offline demo model. DATABASE_URL / REDIS_URL switch to PostgreSQL / channels_redis.
Every variable is listed, with its default, in the README.
"""

import ipaddress
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name)
    if not raw:
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = env_str(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}") from None


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def database_from_url(url: str) -> dict:
    """postgres://user:pass@host:port/name?sslmode=require -> a Django DATABASES entry."""
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgres:// URL, not {parsed.scheme}://"
        )
    options: dict = dict(parse_qsl(parsed.query))
    conn_max_age = env_int("CONN_MAX_AGE", 0)
    if conn_max_age == 0:
        # psycopg's pool hands each database call an open connection: without it every call
        # started a PostgreSQL backend (measured, production shape at 200 streams: time to
        # first token over the upstream's 28 s with a connection per call, 7.7 s reused).
        options.setdefault("pool", {"min_size": 1, "max_size": 8, "timeout": 30})
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "OPTIONS": options,
        # A connection PostgreSQL has dropped (failover, pg_terminate_backend, a restarted
        # pooler) is replaced before use instead of failing the request: with the pool this is
        # psycopg_pool's check on every checkout, without it Django's per-request check.
        "CONN_HEALTH_CHECKS": True,
        # Under ASGI every request may run in a fresh thread: keep connections per request
        # unless a pooler is configured.
        "CONN_MAX_AGE": conn_max_age,
    }


DATA_DIR = Path(env_str("DATA_DIR") or BASE_DIR / "var")


def _embedded_secret_key() -> str:
    """A random key made once per install and kept in DATA_DIR (never a shared default)."""
    path = DATA_DIR / "secret-key"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY") or _embedded_secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")


def _trusted_proxies(raw: str) -> int | list[str]:
    """TRUSTED_PROXIES: empty = no proxy (the TCP peer is the client); a number = that many
    proxies in front of the app; else comma-separated addresses / networks of the proxies."""
    if not raw:
        return 0
    if raw.isdigit():
        return int(raw)
    entries = [item.strip() for item in raw.split(",") if item.strip()]
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"TRUSTED_PROXIES must be a number or addresses / networks, not {entry!r}"
            ) from None
    return entries


# Who may say where a request came from (X-Forwarded-For / X-Forwarded-Proto): chatapp/guards.py.
TRUSTED_PROXIES = _trusted_proxies(env_str("TRUSTED_PROXIES"))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    # Content-Security-Policy header on every response (guards.ContentSecurityPolicyMiddleware).
    "csp",
    # Background jobs (batches): Django's Tasks framework backported to 5.2, database backend.
    "django_tasks",
    "django_tasks_db",
    "chatapp",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chatapp.guards.ContentSecurityPolicyMiddleware",
    # Last: the chain above runs in one thread per request (see its docstring).
    "chatapp.guards.OneThreadPerRequest",
]

ROOT_URLCONF = "chatapp.urls"
ASGI_APPLICATION = "chatapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": database_from_url(DATABASE_URL)}
else:
    SQLITE_PATH = Path(env_str("SQLITE_PATH") or DATA_DIR / "db.sqlite3")
    SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            "OPTIONS": {
                # WAL + a busy timeout + IMMEDIATE transactions keep SQLite usable with many
                # concurrent replies (the default setup fails with "database is locked").
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # Keep the file open: closing the last connection to a WAL database checkpoints
            # and deletes the WAL, and with per-call connections that was most of the database
            # thread's time under load (measured: 200 streams).
            "CONN_MAX_AGE": None,
            # Tests on a file too, not SQLite's shared-cache memory database, whose table locks
            # refuse a read beside a write at once: the socket reads run on threads of their
            # own beside the writer (chatapp/dbreads.py), which WAL allows on a file.
            "TEST": {"NAME": str(SQLITE_PATH.with_name("test-" + SQLITE_PATH.name))},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
# Keys and group names in Redis start with this: lets several installs (or test runs) share one
# Redis, whose pub/sub and keys are not separated by the db index alone.
CHANNEL_LAYER_PREFIX = env_str("CHANNEL_LAYER_PREFIX") or "chat"
if REDIS_URL:
    # Pub/sub, not the list-based layer: that one pops every message of a process from one
    # shared Redis key, and a cancelled receive (any socket closing) can drop a message meant
    # for another socket. Pub/sub delivers to every live subscriber and loses nothing on a
    # healthy connection; the one race it has (a SUBSCRIBE not yet active when the next message
    # is published) is closed by events.socket_join's round trip.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chatapp.events.redis_layer.RedisLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": CHANNEL_LAYER_PREFIX},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "chatapp.events.memory_layer.LocalInMemoryChannelLayer"}
    }

# Login throttling counts in the cache, so it must be shared by every process: Redis when
# REDIS_URL is set, else a table in the database, made by `migrate` (the cache_table migration
# runs `createcachetable`; `start` / `prepare` run it again, for a cache configured after that
# migration ran). The per-user send rate limit counts on every send: Redis too in production;
# in the embedded default (one process: its channel layer is in memory as well) it counts in
# the process's memory, not in twelve statements of the database cache per send.
if REDIS_URL:
    _redis_cache = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    CACHES = {"default": _redis_cache, "rate": _redis_cache}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "chatapp_cache",
        },
        "rate": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "chatapp-rate",
            "OPTIONS": {"MAX_ENTRIES": 100_000},
        },
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
    # Not a rule: Django's password-changed hook, closing the user's other sessions' sockets.
    {"NAME": "chatapp.accounts.SocketsClosedOnPasswordChange"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# Accounts (chatapp/accounts.py): log-in guessing limits, set-password links, rate limits.
LOGIN_MAX_FAILURES_PER_ACCOUNT = env_int("LOGIN_MAX_FAILURES_PER_ACCOUNT", 5)
LOGIN_MAX_FAILURES_PER_IP = env_int("LOGIN_MAX_FAILURES_PER_IP", 20)
LOGIN_LOCK_SECONDS = env_int("LOGIN_LOCK_SECONDS", 900)
# A set-password link stays valid this long (and only until it is used).
PASSWORD_RESET_TIMEOUT = env_int("SET_PASSWORD_LINK_HOURS", 72) * 3600
# Single sign-on (chatapp/oidc.py): the first OpenID Connect provider can come from OIDC_*;
# more are added by staff in the admin. PASSWORD_LOGIN=false hides the password form from
# everyone but the break-glass staff account (BREAK_GLASS_USERNAME).
OIDC_ISSUER = env_str("OIDC_ISSUER")
OIDC_CLIENT_ID = env_str("OIDC_CLIENT_ID")
OIDC_CLIENT_SECRET = env_str("OIDC_CLIENT_SECRET")
OIDC_SCOPES = env_str("OIDC_SCOPES", "openid email profile")
OIDC_GROUPS_CLAIM = env_str("OIDC_GROUPS_CLAIM", "groups")
OIDC_LABEL = env_str("OIDC_LABEL", "your company account")
OIDC_ALLOWED_DOMAINS = env_str("OIDC_ALLOWED_DOMAINS")
OIDC_REQUIRED_GROUPS = env_str("OIDC_REQUIRED_GROUPS")
OIDC_TIMEOUT = env_float("OIDC_TIMEOUT", 10.0)
OIDC_CLOCK_SKEW_SECONDS = env_int("OIDC_CLOCK_SKEW_SECONDS", 60)
PASSWORD_LOGIN = env_bool("PASSWORD_LOGIN", True)
BREAK_GLASS_USERNAME = env_str("BREAK_GLASS_USERNAME", "admin")
# Sends (and regenerations) per user per minute; 0 = no limit.
USER_REQUESTS_PER_MINUTE = env_int("USER_REQUESTS_PER_MINUTE", 20)
# Audit log (chatapp/audit.py): entries older than this many days are deleted by
# `manage.py prepare` and `manage.py purge_audit`; 0 keeps them forever.
AUDIT_RETENTION_DAYS = env_int("AUDIT_RETENTION_DAYS", 365)

# Mail is optional: set-password links are also e-mailed when EMAIL_HOST is set.
EMAIL_HOST = env_str("EMAIL_HOST")
EMAIL_PORT = env_int("EMAIL_PORT", 587)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL") or "kimichat@localhost"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT") or BASE_DIR / "staticfiles")
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "chatapp.static_storage.ModuleManifestStorage"},
}
MEDIA_ROOT = Path(env_str("MEDIA_ROOT") or DATA_DIR / "media")  # never served by URL

# Image uploads (chatapp/attachments.py). Moonshot documents no numeric image limits; the
# defaults keep one message's images under ~10 MB raw (the largest request payload a Kimi host
# documents: Workers AI's 10 MB batch cap) and well under Baseten's 96 images per request.
IMAGE_MAX_UPLOAD_BYTES = env_int("IMAGE_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
IMAGE_MAX_PIXELS = env_int("IMAGE_MAX_PIXELS", 50_000_000)
IMAGE_MAX_OUTPUT_BYTES = env_int("IMAGE_MAX_OUTPUT_BYTES", 1_500_000)
IMAGE_MAX_TILES = env_int("IMAGE_MAX_TILES", 8)
IMAGE_MAX_PER_MESSAGE = env_int("IMAGE_MAX_PER_MESSAGE", 16)
IMAGE_MAX_BYTES_PER_MESSAGE = env_int("IMAGE_MAX_BYTES_PER_MESSAGE", 10 * 1024 * 1024)
# Threads that run Pillow (kept off the event loop and off Django's shared sync thread).
IMAGE_WORKERS = env_int("IMAGE_WORKERS", 2)
# Uploaded but never sent images are deleted after this many hours.
IMAGE_UNSENT_TTL_HOURS = env_int("IMAGE_UNSENT_TTL_HOURS", 24)

# PDF pages as images (chatapp/pdfs.py). The PDF is never stored; its picked pages are.
PDF_MAX_UPLOAD_BYTES = env_int("PDF_MAX_UPLOAD_BYTES", 50 * 1024 * 1024)
# A longer document is refused before any page is rendered (the count is in its page tree).
PDF_MAX_PAGES = env_int("PDF_MAX_PAGES", 200)
PDF_DEFAULT_PAGES = env_int("PDF_DEFAULT_PAGES", 3)
PDF_MAX_PICKED_PAGES = env_int("PDF_MAX_PICKED_PAGES", 10)
PDF_RENDER_DPI = env_int("PDF_RENDER_DPI", 200)
PDF_MAX_PAGE_PIXELS = env_int("PDF_MAX_PAGE_PIXELS", 40_000_000)
# Seconds one preview or one set of pages may take to render before the user gets an error.
PDF_RENDER_TIMEOUT = env_int("PDF_RENDER_TIMEOUT", 60)

# Screen recordings (chatapp/videos.py): normalised with PyAV, sent as video to models that take
# it and as key frames to the others. Longer recordings are trimmed to VIDEO_MAX_SECONDS.
VIDEO_MAX_UPLOAD_BYTES = env_int("VIDEO_MAX_UPLOAD_BYTES", 64 * 1024 * 1024)
VIDEO_MAX_SECONDS = env_int("VIDEO_MAX_SECONDS", 60)
VIDEO_FPS = env_int("VIDEO_FPS", 10)
VIDEO_MAX_EDGE = env_int("VIDEO_MAX_EDGE", 1280)
VIDEO_MAX_OUTPUT_BYTES = env_int("VIDEO_MAX_OUTPUT_BYTES", 8 * 1024 * 1024)
VIDEO_MAX_FRAMES = env_int("VIDEO_MAX_FRAMES", 8)
VIDEO_PROCESS_TIMEOUT = env_int("VIDEO_PROCESS_TIMEOUT", 180)

# Production hardening; harmless on http://127.0.0.1 because they only apply with HTTPS on.
SECURE_HTTPS = env_bool("SECURE_HTTPS", not DEBUG and bool(env_str("SECRET_KEY")))
SESSION_COOKIE_SECURE = SECURE_HTTPS
CSRF_COOKIE_SECURE = SECURE_HTTPS
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", SECURE_HTTPS)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if SECURE_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HTTPS
SECURE_HSTS_PRELOAD = SECURE_HTTPS
# Only a trusted proxy's X-Forwarded-Proto reaches Django (guards.proxy_guard drops it otherwise).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# Request bodies: every route but the uploads (images, PDFs, recordings: the largest of their
# limits; batch files: BATCH_MAX_UPLOAD_BYTES) takes at most this; the largest form or JSON the
# pages send (a batch of 500 items with its fields) is far below it. Counted as the body arrives,
# chunked too, and refused with 413 at the limit (guards.py).
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024)

# Content-Security-Policy on every response (django-csp). No inline script or style anywhere:
# model output is sanitised by DOMPurify and this is the second wall. KaTeX styles its output
# through the DOM (allowed); the editor and thumbnails draw data: and blob: images.
# guards.ContentSecurityPolicyMiddleware adds the page's ws:// or wss:// origin to connect-src.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", "blob:"],
        "media-src": ["'self'", "blob:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "worker-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
}
CSRF_FAILURE_VIEW = "chatapp.image_views.csrf_failure"  # JSON for /api/, Django's page otherwise

# Providers. Each one is enabled by its key; the real endpoints are the defaults.
OPENAI_COMPAT_BASE_URL = env_str("OPENAI_COMPAT_BASE_URL")
OPENAI_COMPAT_API_KEY = env_str("OPENAI_COMPAT_API_KEY")
OPENAI_COMPAT_MODELS = env_list("OPENAI_COMPAT_MODELS")
MOONSHOT_API_KEY = env_str("MOONSHOT_API_KEY")
MOONSHOT_BASE_URL = env_str("MOONSHOT_BASE_URL") or "https://api.moonshot.ai/v1"
CLOUDFLARE_ACCOUNT_ID = env_str("CLOUDFLARE_ACCOUNT_ID")
CLOUDFLARE_API_TOKEN = env_str("CLOUDFLARE_API_TOKEN")
CLOUDFLARE_API_BASE = env_str("CLOUDFLARE_API_BASE") or "https://api.cloudflare.com/client/v4"
# Concurrent requests per provider (0 = unlimited); extra sends wait in a fair queue.
MOONSHOT_MAX_CONCURRENCY = env_int("MOONSHOT_MAX_CONCURRENCY", 0)
CLOUDFLARE_MAX_CONCURRENCY = env_int("CLOUDFLARE_MAX_CONCURRENCY", 0)
OPENAI_COMPAT_MAX_CONCURRENCY = env_int("OPENAI_COMPAT_MAX_CONCURRENCY", 0)
# Fernet key(s) for provider API keys at rest; unset = derived from SECRET_KEY.
PROVIDER_KEY_ENCRYPTION_KEY = env_str("PROVIDER_KEY_ENCRYPTION_KEY")
# The output budget of a reply when the conversation sets none (clamped to the window).
DEFAULT_MAX_OUTPUT_TOKENS = env_int("DEFAULT_MAX_OUTPUT_TOKENS", 32_768)

# Streaming.
UPSTREAM_CONNECT_TIMEOUT = env_float("UPSTREAM_CONNECT_TIMEOUT", 10.0)
# No bytes for this long ends a reply as an error instead of hanging forever.
UPSTREAM_STALL_TIMEOUT = env_float("UPSTREAM_STALL_TIMEOUT", 120.0)
# aiohttp (httpx's API over aiohttp's parser: chatapp/providers/transport.py) or httpx.
UPSTREAM_HTTP_TRANSPORT = env_str("UPSTREAM_HTTP_TRANSPORT", "aiohttp")
# Deltas are coalesced into one websocket frame per slice (seconds).
STREAM_FLUSH_INTERVAL = env_float("STREAM_FLUSH_INTERVAL", 0.05)
# Partial replies are written to the database at most this often (seconds), never per token.
STREAM_CHECKPOINT_INTERVAL = env_float("STREAM_CHECKPOINT_INTERVAL", 1.0)
# Retries of a 429 / 5xx that came before the first token: count and base of the backoff.
UPSTREAM_MAX_RETRIES = env_int("UPSTREAM_MAX_RETRIES", 3)
UPSTREAM_RETRY_BASE_DELAY = env_float("UPSTREAM_RETRY_BASE_DELAY", 0.5)
DEMO_TOKENS_PER_SECOND = env_float("DEMO_TOKENS_PER_SECOND", 45.0)
# A running reply renews its lease (owner process + expiry) on the message this often-ish; once
# the lease has expired, any process's reaper marks the reply interrupted, keeping its text.
STREAM_LEASE_SECONDS = env_float("STREAM_LEASE_SECONDS", 30.0)
REAPER_INTERVAL = env_float("REAPER_INTERVAL", 10.0)
# How long a socket waits for another process to answer "what is this reply's text so far".
STREAM_STATE_TIMEOUT = env_float("STREAM_STATE_TIMEOUT", 3.0)
# How often a process with open sockets checks its channel layer (Redis) is up, so its sockets
# can show "reconnecting…" during an outage (seconds).
LAYER_WATCH_INTERVAL = env_float("LAYER_WATCH_INTERVAL", 1.0)
# A reply's final save (text, status, usage record) is retried this long through a database
# outage before the reply is left to the reaper (seconds).
STREAM_FINAL_SAVE_RETRY_SECONDS = env_float("STREAM_FINAL_SAVE_RETRY_SECONDS", 300.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}

# ---- batches (chatapp/batches.py) ----------------------------------------------------------------
# Jobs run on Django's Tasks framework (the django-tasks backport) with its database backend: the
# queue lives in the app's own database (SQLite or PostgreSQL), so the embedded default needs no
# broker. Workers are `manage.py batch_worker` processes; `manage.py start` runs one inside the
# server process (BATCH_WORKER=embedded).
TASKS = {
    "default": {
        "BACKEND": "django_tasks_db.DatabaseBackend",
        "QUEUES": ["default", "batches"],
    }
}
BATCH_WORKER = env_str("BATCH_WORKER", "external")  # "embedded": a worker thread in the server
BATCH_MAX_ITEMS = env_int("BATCH_MAX_ITEMS", 500)
BATCH_MAX_UPLOAD_BYTES = env_int("BATCH_MAX_UPLOAD_BYTES", 200 * 1024 * 1024)
BATCH_CONCURRENCY = env_int("BATCH_CONCURRENCY", 4)
BATCH_LEASE_SECONDS = env_float("BATCH_LEASE_SECONDS", 30.0)
BATCH_ITEM_SECONDS = env_float("BATCH_ITEM_SECONDS", 10.0)
BATCH_POLL_INTERVAL = env_float("BATCH_POLL_INTERVAL", 5.0)
