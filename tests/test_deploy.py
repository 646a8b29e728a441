"""The production shape's start-up: the container entrypoint script and the deploy checks.

No Docker engine runs here, so the entrypoint script (docker/entrypoint.sh) is run directly, as the
container would run it, against a fresh SQLite database of its own.
"""

import os
import re
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
# Each subprocess starts Django from scratch; generous for a loaded machine.
TIMEOUT = 300


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG", "SQLITE_PATH"}
    }
    # The venv's python first on PATH, as in the image.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DATA_DIR=str(tmp_path), PYTHONUNBUFFERED="1", **extra)
    return env


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_entrypoint_prepares_the_database_then_becomes_the_command(tmp_path):
    env = clean_env(
        tmp_path, DJANGO_SUPERUSER_USERNAME="boss", DJANGO_SUPERUSER_PASSWORD="a-long-pass-123"
    )
    command = [str(ENTRYPOINT), sys.executable, "-c", "import os; print('serving as', os.getpid())"]
    result = run(command, env)
    assert result.returncode == 0, result.stderr
    assert "serving as" in result.stdout

    database = sqlite3.connect(tmp_path / "db.sqlite3")
    applied = {row[0] for row in database.execute("SELECT name FROM django_migrations")}
    expected = {p.stem for p in (ROOT / "chatapp" / "migrations").glob("0*.py")}
    assert expected <= applied
    admins = database.execute("SELECT username FROM auth_user WHERE is_superuser").fetchall()
    assert admins == [("boss",)]
    database.close()

    # A restart runs the same steps again without harm (and does not make a second admin).
    again = run(command, env)
    assert again.returncode == 0, again.stderr
    database = sqlite3.connect(tmp_path / "db.sqlite3")
    assert database.execute("SELECT count(*) FROM auth_user").fetchone() == (1,)
    database.close()


def test_entrypoint_stops_loudly_when_the_database_is_unreachable(tmp_path):
    env = clean_env(tmp_path, DATABASE_URL="postgres://nobody@127.0.0.1:1/nothing")
    result = run([str(ENTRYPOINT), sys.executable, "-c", "print('must not start')"], env)
    assert result.returncode != 0
    assert "must not start" not in result.stdout
    assert "connection" in result.stderr.lower()


def test_entrypoint_reaps_a_reply_a_previous_run_left_streaming(tmp_path):
    env = clean_env(tmp_path, DJANGO_SUPERUSER_PASSWORD="a-long-pass-123")
    assert run([str(ENTRYPOINT), "true"], env).returncode == 0
    database = sqlite3.connect(tmp_path / "db.sqlite3")
    with database:
        owner = database.execute("SELECT id FROM auth_user").fetchone()[0]
        conversation = insert(
            database,
            "chatapp_conversation",
            owner_id=owner,
            affinity_id="ses_x",
            created_at="2026-01-01 00:00:00",
            updated_at="2026-01-01 00:00:00",
        )
        insert(
            database,
            "chatapp_message",
            conversation_id=conversation,
            role="assistant",
            content="half",
            status="streaming",
            lease_expires_at="2026-01-01 00:00:00",
            created_at="2026-01-01 00:00:00",
            updated_at="2026-01-01 00:00:00",
        )
    database.close()

    result = run([str(ENTRYPOINT), "true"], env)
    assert result.returncode == 0, result.stderr
    assert "1 interrupted reply reaped" in result.stdout
    database = sqlite3.connect(tmp_path / "db.sqlite3")
    assert database.execute("SELECT status, content FROM chatapp_message").fetchall() == [
        ("interrupted", "half")
    ]
    database.close()


def insert(database, table: str, **values) -> int:
    """A row written as a previous run left it; other NOT NULL columns get an empty value."""
    for _, name, kind, notnull, default, pk in database.execute(f"PRAGMA table_info({table})"):
        if notnull and not pk and name not in values and default is None:
            values[name] = 0 if kind.lower() in {"integer", "bigint", "bool", "real"} else ""
    names = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    cursor = database.execute(
        f"INSERT INTO {table} ({names}) VALUES ({marks})", list(values.values())
    )
    return cursor.lastrowid


def test_check_deploy_is_clean_in_the_production_shape(tmp_path):
    env = clean_env(
        tmp_path,
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="chat.example.com",
        DATABASE_URL="postgres://chat:pw@db.example.com:5432/chat",
        REDIS_URL="redis://127.0.0.1:6379/0",
    )
    result = run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_about_the_in_memory_layer_with_debug_off(tmp_path):
    env = clean_env(
        tmp_path, DEBUG="false", SECRET_KEY=secrets.token_urlsafe(50), ALLOWED_HOSTS="x.example"
    )
    result = run([sys.executable, "manage.py", "check", "--deploy"], env)
    assert "chatapp.W001" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "compose.yaml", "docker/nginx.conf"])
def test_production_files_exist_and_name_their_pieces(name):
    text = (ROOT / name).read_text()
    needles = {
        "Dockerfile": ["-slim", "USER app", "collectstatic", "PYTHONUNBUFFERED=1", "HEALTHCHECK"],
        "compose.yaml": [
            "app1:",
            "app2:",
            "postgres",
            "redis",
            "nginx",
            "REDIS_URL",
            # The batch workers: their own service, two of them, no worker inside them twice.
            "  worker:\n",
            '["python", "manage.py", "batch_worker"]',
            "replicas: 2",
            "BATCH_WORKER: external",
        ],
        "docker/nginx.conf": ["Upgrade $http_upgrade", "app1:8000", "app2:8000"],
    }[name]
    missing = [needle for needle in needles if needle not in text]
    assert not missing


def test_a_plain_migrate_then_daphne_serves_a_login(tmp_path):
    """The standard Django deploy, with no custom command: collectstatic (the image build),
    `migrate` on a fresh SQLite, then daphne; the log-in (which counts failures in the database
    cache) works."""
    env = clean_env(
        tmp_path,
        SECRET_KEY=secrets.token_urlsafe(50),
        DEBUG="false",
        SECURE_HTTPS="false",
        STATIC_ROOT=str(tmp_path / "static"),
    )
    collected = run([sys.executable, "manage.py", "collectstatic", "--noinput"], env)
    assert collected.returncode == 0, collected.stderr
    migrated = run([sys.executable, "manage.py", "migrate", "--noinput"], env)
    assert migrated.returncode == 0, migrated.stderr
    database = sqlite3.connect(tmp_path / "db.sqlite3")
    tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master")}
    assert "chatapp_cache" in tables
    database.close()
    script = (
        "from django.contrib.auth.models import User; "
        "User.objects.create_user('plain', password='a-long-pass-123')"
    )
    made = run([sys.executable, "manage.py", "shell", "-c", script], env)
    assert made.returncode == 0, made.stderr

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "daphne.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
            + ["chatapp.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert server.poll() is None, log.read_text()
            try:
                status = httpx.get(f"{base}/login/", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status is not None:
                assert status == 200, log.read_text()
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=30) as client:
            page = client.get("/login/")
            token = client.cookies["csrftoken"]
            wrong = client.post(
                "/login/",
                data={"username": "plain", "password": "wrong", "csrfmiddlewaretoken": token},
                headers={"Referer": f"{base}/login/"},
            )
            assert wrong.status_code == 200, wrong.text[-2000:]  # refused, not a 500
            response = client.post(
                "/login/",
                data={
                    "username": "plain",
                    "password": "a-long-pass-123",
                    "csrfmiddlewaretoken": token,
                },
                headers={"Referer": f"{base}/login/"},
            )
            assert page.status_code == 200
            assert response.status_code == 302, response.text[-2000:]
            assert client.get("/").status_code == 200
    finally:
        server.terminate()
        server.wait(30)
    assert "no such table" not in log.read_text()


# ---- supply chain: one pinned set of packages, installed the same way everywhere --------------


def _readme_command(number: int) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"**{number}. ", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not an exact pin: {line}"
        assert re.fullmatch(r"[A-Za-z0-9.+!_-]+", version), f"not an exact pin: {line}"
        pins[canonicalize_name(name)] = version
    return pins


def test_readme_ci_and_dockerfile_install_through_the_constraints():
    install = '.venv/bin/pip install -q -c constraints.txt -e ".[test]"'
    first, second = _readme_command(1), _readme_command(2)
    assert first == f"python3 -m venv .venv && {install} && .venv/bin/python manage.py start"
    assert second == f"python3 -m venv .venv && {install} && .venv/bin/python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    body = ci.split("readme_tests() {", 1)[1].split("\n}", 1)[0]
    commands = [line.strip() for line in body.splitlines() if not line.strip().startswith("#")]
    assert [c for c in commands if c] == [second]  # the README's second command, verbatim
    assert f"python3 -m venv .venv && {install}\n.venv/bin/ruff check" in ci  # the lint run
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile.split("COPY . .")[0]
    assert "pip install --no-compile -c constraints.txt ." in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "constraints:" in makefile and "pip freeze --exclude-editable" in makefile


def test_constraints_pin_every_dependency_and_extra_and_the_install_matches():
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    missing = []
    for line in declared:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name not in pins:
            missing.append(name)
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            missing.append(f"{name}=={pins[name]} outside {requirement.specifier}")
    assert not missing, missing
    assert "redis" in {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}

    # What this environment runs is what the constraints say (the README's commands install
    # through them): every pinned package that is installed has the pinned version.
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (installed[n], v) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not wrong, f"installed != constraints.txt: {wrong}"
    # ...and nothing the app or its tests use is left unpinned.
    for name in ("django", "channels", "daphne", "redis", "pytest", "playwright"):
        assert name in pins


def test_the_proxy_sets_the_client_address_and_the_image_trusts_only_configured_hops():
    """nginx replaces X-Forwarded-For (a client cannot add hops of its own) and daphne does not
    read it (--proxy-headers takes the first, client-chosen value): the app trusts
    TRUSTED_PROXIES hops only, and compose sets it to its one proxy."""
    nginx = (ROOT / "docker/nginx.conf").read_text()
    forwarded = [line.strip() for line in nginx.splitlines() if "X-Forwarded-For" in line]
    header_lines = [line for line in forwarded if line.startswith("proxy_set_header")]
    assert header_lines and all(line.endswith("$remote_addr;") for line in header_lines)
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    command = [line for line in dockerfile if line.startswith("CMD")]
    assert command and "daphne" in command[0] and "--proxy-headers" not in command[0]
    assert "TRUSTED_PROXIES: ${TRUSTED_PROXIES:-1}" in (ROOT / "compose.yaml").read_text()
