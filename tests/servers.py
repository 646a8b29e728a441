"""Real app processes for the production-shape tests: daphne servers and batch workers on the
test PostgreSQL database and Redis, each with its own log, started and stopped by the tests."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from django.conf import settings as django_settings
from django.db import connection

from chatapp.serving import daphne_args

ROOT = Path(__file__).resolve().parent.parent


def require_services() -> None:
    missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not os.environ.get(name)]
    if missing:
        reason = f"multi-process tests need PostgreSQL and Redis: set {' and '.join(missing)}"
        if os.environ.get("REQUIRE_SERVICES"):
            pytest.fail(f"REQUIRE_SERVICES is set but {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def database_url() -> str:
    db = connection.settings_dict  # the test database pytest-django created
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def app_env(*, upstream_url: str, channel_prefix: str, **overrides: str) -> dict[str, str]:
    """The environment of an app process: the test database, this run's Redis prefix, the
    session key the tests sign cookies with, and the fake upstream as the only provider."""
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CHANNEL_LAYER_PREFIX": channel_prefix,
        "SECRET_KEY": django_settings.SECRET_KEY,  # the sessions made here must verify there
        "DEBUG": "false",
        "SECURE_HTTPS": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "OPENAI_COMPAT_BASE_URL": upstream_url,
        "OPENAI_COMPAT_API_KEY": "test-key",
        "OPENAI_COMPAT_MODELS": "fake-model",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


class AppProcess:
    """One process of the app (`argv` after the interpreter), its output kept in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        # Lives as long as the process (closed in stop()).
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class Server(AppProcess):
    """One daphne process serving the app."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.port = free_port()
        argv = ["-m", "daphne", *daphne_args("127.0.0.1", self.port)]
        super().__init__(f"daphne-{name}", argv, env)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                # /healthz checks the database and the channel layer, and starts the reaper.
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"{self.name} did not become healthy:\n{self.output()}")


@contextlib.contextmanager
def server_factory(env: dict[str, str]):
    """Yields start(name) -> a ready Server; every server started is stopped at the end."""
    servers: list[Server] = []

    def start(name: str) -> Server:
        server = Server(name, env)
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
