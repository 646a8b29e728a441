"""A real OpenID Connect provider for the tests: tests/oidc_idp/server.mjs (panva's certified
`oidc-provider` from npm) run with the machine's node on a free port.

Its packages are installed from the checked-in lockfile (`npm ci` in tests/oidc_idp) the first
time a test needs them (.ci/run does it up front); the app itself never needs node or npm.
Without node the tests using it are skipped locally and fail when CI is set.

`sign_in_with_http` walks the provider's own sign-in pages with httpx (the browser tests do the
same in Chromium) and hands the callback back to the app's Django test client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

IDP_DIR = Path(__file__).resolve().parent / "oidc_idp"
SECRET = "test-client-secret-0123456789-abcdefghij"
PASSWORD = "any-password"  # the provider's development sign-in page takes any password


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing(message: str):
    if os.environ.get("CI"):
        pytest.fail(message + "; CI is set, so the single sign-on tests must run.", pytrace=False)
    pytest.skip(message + "; single sign-on tests skipped locally (set CI=true to fail).")


def npm_install() -> str:
    """The node binary, after `npm ci` made tests/oidc_idp/node_modules match the lockfile."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _missing("node and npm are needed to run the test identity provider (Debian: nodejs npm)")
    stamp = IDP_DIR / "node_modules" / ".package-lock.json"
    lock = IDP_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=IDP_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci in {IDP_DIR} failed:\n{result.stderr[-3000:]}", pytrace=False)
    return node


class IdentityProvider:
    """One running provider. `clients`: [(client_id, [redirect URIs])]; accounts are set with
    `account(login, email=..., groups=[...])` and read by the provider at every sign-in."""

    def __init__(self, clients: list[tuple[str, list[str]]], *, post_logout: list[str] = ()):
        node = npm_install()
        self.port = _free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="kimichat-idp-"))
        self._accounts_file = self._dir / "accounts.json"
        self._accounts: dict[str, dict] = {}
        self._write()
        env = {
            **os.environ,
            "IDP_PORT": str(self.port),
            "IDP_ACCOUNTS": str(self._accounts_file),
            "IDP_CLIENTS": json.dumps(
                [
                    {
                        "client_id": client_id,
                        "client_secret": SECRET,
                        "redirect_uris": uris,
                        "post_logout_redirect_uris": list(post_logout),
                    }
                    for client_id, uris in clients
                ]
            ),
        }
        self.log_path = self._dir / "idp.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open for the process's life)
        self.process = subprocess.Popen(
            [node, "server.mjs"], cwd=IDP_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=2)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("the test identity provider did not start:\n" + self.log())
            time.sleep(0.2)

    def _write(self) -> None:
        tmp = self._accounts_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._accounts))
        tmp.replace(self._accounts_file)

    def account(self, login: str, *, email: str, groups=(), email_verified=True, **claims) -> None:
        self._accounts[login] = {
            "email": email,
            "email_verified": email_verified,
            "groups": list(groups),
            **claims,
        }
        self._write()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


_FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
_INPUT = re.compile(r'<input[^>]*name="([^"]+)"(?:[^>]*value="([^"]*)")?', re.S)


def provider_pages(start_url: str, *, login: str, stop_at: str) -> str:
    """Follow the provider's redirects and sign in as `login` on its page, until a redirect
    leaves for `stop_at` (the app). -> that URL (the callback, with code and state)."""
    with httpx.Client(follow_redirects=False, timeout=15) as browser:
        url, method, data = start_url, "GET", None
        for _ in range(20):
            response = browser.request(method, url, data=data)
            if response.is_redirect:
                target = urljoin(url, response.headers["location"])
                if target.startswith(stop_at):
                    return target
                url, method, data = target, "GET", None
                continue
            assert response.status_code == 200, (response.status_code, response.text[:500])
            form = _FORM.search(response.text)
            assert form, f"no form on the provider's page: {response.text[:500]}"
            fields = {name: value or "" for name, value in _INPUT.findall(form.group(2))}
            if "login" in fields:
                fields.update(login=login, password=PASSWORD)
            url, method, data = urljoin(url, form.group(1)), "POST", fields
        raise AssertionError("too many steps at the identity provider")


def sign_in_with_http(client, slug: str, *, login: str):
    """Start at the app, sign in at the provider, return the app's answer to the callback."""
    start = client.get(f"/login/oidc/{slug}/")
    assert start.status_code == 302, start.content[:500]
    callback = provider_pages(start["Location"], login=login, stop_at="http://testserver/")
    parts = urlsplit(callback)
    return client.get(f"{parts.path}?{parts.query}"), callback
