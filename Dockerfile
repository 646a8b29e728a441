# The production image: daphne serving chatapp, one process per container (scale with replicas).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    STATIC_ROOT=/app/staticfiles \
    HOST=0.0.0.0 \
    PORT=8000

RUN groupadd --system app && useradd --system --gid app --home-dir /app app \
    && mkdir -p /app /data && chown app:app /app /data
WORKDIR /app

# Dependencies first (from pyproject.toml at the exact versions of constraints.txt, the package
# itself dropped again), so a code change does not reinstall them; the app runs from /app.
COPY pyproject.toml README.md constraints.txt ./
COPY chatapp/__init__.py chatapp/__init__.py
RUN pip install --no-compile -c constraints.txt . && pip uninstall -y kimichat \
    && rm -rf build ./*.egg-info

COPY --chown=app:app . .

USER app
# Static files are part of the image; a throwaway key is enough for collectstatic.
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8000\")}/healthz', timeout=4)"

ENTRYPOINT ["/app/docker/entrypoint.sh"]
# No --proxy-headers: daphne would take the first X-Forwarded-For value, which the client chooses.
# The app reads the client address itself, trusting only TRUSTED_PROXIES hops (chatapp/guards.py).
# A listen backlog of 1024 and 30 s for a websocket handshake, not daphne's 50 and 5 s
# (chatapp/serving.py says why). An IPv6 HOST needs its colons escaped here (\:\:).
CMD ["sh", "-c", "exec daphne -e \"tcp:port=$PORT:interface=$HOST:backlog=1024\" --websocket_connect_timeout 30 chatapp.asgi:application"]
