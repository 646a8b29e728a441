"""How the app's own launchers start daphne: `manage.py start`, the benchmark and the tests
(the container image's command says the same in its Dockerfile)."""

from daphne.endpoints import build_endpoint_description_strings

# Twisted listens with a backlog of 50 unless told otherwise. 500 people opening the app at once
# overflowed the kernel's accept queue while the process was busy relaying, and the overflow was
# reset: "Connection reset by peer" for 38-60 % of chats (benchmark, production shape, C=500).
LISTEN_BACKLOG = 1024
# daphne drops a websocket whose handshake the app has not answered in 5 s. A process relaying
# hundreds of streams can take longer than that to authenticate a new socket (production shape
# at C=500: accept p99 3.5-4.5 s, and the slowest ones were cut): a late accept beats a reset,
# and the page would only reconnect.
WEBSOCKET_CONNECT_TIMEOUT = 30


def daphne_args(host: str, port: int) -> list[str]:
    """daphne's command-line arguments to serve the app on host:port."""
    endpoint = build_endpoint_description_strings(host=host, port=port)[0]
    return [
        "-e",
        f"{endpoint}:backlog={LISTEN_BACKLOG}",
        "--websocket_connect_timeout",
        str(WEBSOCKET_CONNECT_TIMEOUT),
        "chatapp.asgi:application",
    ]
