"""The real app in real headless Chromium.

A session starts daphne on a free port as a subprocess, after `migrate` into a temporary SQLite
file and `collectstatic` into a temporary STATIC_ROOT, with the OpenAI-compatible provider
pointed at the fake upstream that runs in this process (tests script it per scenario). Tests
drive the page only through what a person sees: roles, labels and text. Each scenario saves a
screenshot under test-artifacts/.

Without /usr/bin/chromium the tests are skipped locally, but fail when CI is set.
"""

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

from chatapp.serving import daphne_args

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "browser-test-pw-123"
USERS = 80  # one fresh account per scenario (and per helper account), made in one go at start-up
# Generous: two cores shared with other jobs; never a statement about speed.
TIMEOUT_MS = 20_000

_next_user = itertools.count(1)
# The running server's environment, for tests that prepare data with `manage.py shell`.
SERVER_ENV: dict = {}
# Where the running app keeps its files (tests read the stored media to prove what was kept).
SERVER: dict[str, Path] = {}


def _is_browser_test(item) -> bool:
    return "tests/browser/" in str(item.fspath).replace(os.sep, "/")


def pytest_collection_modifyitems(items):
    # Last: sync Playwright keeps an event loop running in this thread while it is open, which
    # async tests cannot share; it is closed when the browser module ends (module scope).
    for item in items:
        if _is_browser_test(item):
            item.add_marker(pytest.mark.browser)
    items.sort(key=_is_browser_test)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not CHROMIUM.exists():
        message = f"Chromium not found at {CHROMIUM} (install the Debian package `chromium`)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so browser tests must run.", pytrace=False)
        pytest.skip(message + "; browser tests skipped locally (set CI=true to make this fail).")
    return str(CHROMIUM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manage(env: dict, *args: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )


@contextlib.contextmanager
def running_app(extra_env: dict, *, port: int | None = None, setup: str = "", name="daphne"):
    """Serve the app with daphne on `port` (free if None), on a fresh SQLite file and static
    root, after `migrate`, `collectstatic` and the Python `setup` code (run by `manage.py
    shell`). Yields the base URL; the server's log is copied to test-artifacts/<name>.log."""
    tmp = Path(tempfile.mkdtemp(prefix="kimichat-browser-"))
    # A test module's own server (single sign-on) runs while the session's server lives on:
    # when it ends, the session's environment and data dir are what app_shell and media_root
    # must point at again, not the deleted files of the server that ended.
    outer_env, outer_server = dict(SERVER_ENV), dict(SERVER)
    SERVER["data_dir"] = tmp / "data"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "MOONSHOT_API_KEY")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="chatapp.settings",
        DATA_DIR=str(tmp / "data"),
        SQLITE_PATH=str(tmp / "data" / "db.sqlite3"),
        STATIC_ROOT=str(tmp / "static"),
        DEBUG="false",
        SECURE_HTTPS="false",
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    SERVER_ENV.clear()
    SERVER_ENV.update(env)
    _manage(env, "migrate", "--noinput")
    _manage(env, "createcachetable")  # the database cache (no REDIS_URL here)
    _manage(env, "collectstatic", "--noinput")
    if setup:
        _manage(env, "shell", "-c", setup)
    port = port or _free_port()
    log = open(tmp / "daphne.log", "wb")  # noqa: SIM115 (kept open for the server's life)
    server = subprocess.Popen(
        [sys.executable, "-m", "daphne", *daphne_args("127.0.0.1", port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("daphne did not start:\n" + (tmp / "daphne.log").read_text()[-3000:])
        time.sleep(0.3)
    try:
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(tmp / "daphne.log", ARTIFACTS / f"{name}.log")  # for reading after a failure
        shutil.rmtree(tmp, ignore_errors=True)
        if SERVER_ENV.get("DATA_DIR") == env["DATA_DIR"]:  # still ours: hand back the outer one
            SERVER_ENV.clear()
            SERVER_ENV.update(outer_env)
            SERVER.clear()
            SERVER.update(outer_server)


@pytest.fixture(scope="session")
def app_server(_upstream_server, chromium_path):
    """Base URL of a real daphne serving the app, its provider being the fake upstream."""
    make_users = (
        "from django.contrib.auth import get_user_model\n"
        "U = get_user_model()\n"
        f"for i in range(1, {USERS + 1}):\n"
        f"    U.objects.create_user(username=f'person{{i}}', password={PASSWORD!r})\n"
    )
    extra = {
        "OPENAI_COMPAT_BASE_URL": _upstream_server.base_url,
        "OPENAI_COMPAT_API_KEY": "test-key",
        "OPENAI_COMPAT_MODELS": "fake-model",
        "UPSTREAM_MAX_RETRIES": "0",
        "STREAM_CHECKPOINT_INTERVAL": "0.2",
        # As `manage.py start` runs it: one batch worker thread inside the server process.
        "BATCH_WORKER": "embedded",
    }
    with running_app(extra, setup=make_users) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def upstream(_upstream_server):
    _upstream_server.reset()
    yield _upstream_server
    _upstream_server.reset()


@pytest.fixture
def context_options() -> dict:
    return {}


@pytest.fixture
def context(browser, app_server, context_options):
    context = browser.new_context(
        base_url=app_server,
        viewport={"width": 1280, "height": 820},
        **context_options,
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app_server)
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


CSP_REPORTER = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error(`CSP violation: ${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`
    + ` at ${event.sourceFile}:${event.lineNumber}`);
});
"""


def _is_csp_message(text: str) -> bool:
    return "CSP violation" in text or "Content Security Policy" in text


def watch_page(page):
    """Collect the page's JavaScript errors (page.js_errors) and Content-Security-Policy
    violations (page.csp_violations: the app's policy is on, Playwright does not bypass it, and
    each violation is logged to the console by CSP_REPORTER and by Chromium itself)."""
    page.add_init_script(CSP_REPORTER)
    page.js_errors = []
    page.csp_violations = []  # a test that provokes one on purpose clears it
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: page.csp_violations.append(msg.text) if _is_csp_message(msg.text) else None,
    )
    return page


def assert_page_clean(page, *, js_errors: bool = True) -> None:
    if js_errors:
        assert not page.js_errors, f"JavaScript errors on the page: {page.js_errors}"
    assert not page.csp_violations, (
        f"Content-Security-Policy violations on the page: {page.csp_violations}"
    )


@pytest.fixture
def page(context):
    page = watch_page(context.new_page())
    yield page
    assert_page_clean(page)


@pytest.fixture
def media_root(app_server) -> Path:
    """The running app's MEDIA_ROOT (every stored image file is under it)."""
    return SERVER["data_dir"] / "media"


def log_in(page, username: str | None = None):
    """Log in through the form, as a person would; returns the username."""
    username = username or f"person{next(_next_user)}"
    page.goto("/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()  # the page has started
    return username


@pytest.fixture
def person(page, upstream):
    """A fresh account, logged in, on an empty chat page."""
    return log_in(page)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False, animations="disabled")
    return path
