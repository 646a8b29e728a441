"""Run the app as a real daphne process, with a database statement counter for the benchmark.

`python -m bench.appserver PORT COUNTS_FILE` serves chatapp.asgi:application with daphne's own
command line. Every SQL statement any connection runs goes through a Django execute wrapper that
counts it (total, and INSERT/UPDATE/DELETE as writes); on SIGUSR1 the counts are written to
COUNTS_FILE as JSON. The app itself is unchanged: this is how `manage.py start` serves it, plus
one counter per statement.
"""

import json
import os
import signal
import sys
import threading

from django.db.backends.signals import connection_created

from bench.util import raise_fd_limit

COUNTS = {"statements": 0, "writes": 0}
_lock = threading.Lock()
WRITES = ("INSERT", "UPDATE", "DELETE")


# BENCH_SQL_LOG=path: every statement's first line is appended there too (to see what a send runs).
_SQL_LOG = open(os.environ["BENCH_SQL_LOG"], "a") if os.environ.get("BENCH_SQL_LOG") else None  # noqa: SIM115


def count_statement(execute, sql, params, many, context):
    head = sql.lstrip()[:6].upper()
    rows = len(params) if many else 1  # a batched statement counts once per row it writes
    with _lock:
        COUNTS["statements"] += rows
        if head in WRITES:
            COUNTS["writes"] += rows
        if _SQL_LOG is not None:
            _SQL_LOG.write(f"{threading.current_thread().name}\t{rows}\t{sql[:160]}\n")
            _SQL_LOG.flush()
    return execute(sql, params, many, context)


def _on_connection(sender, connection, **kwargs) -> None:
    # The wrapper object outlives reconnections (CONN_MAX_AGE=0): add the counter once.
    if count_statement not in connection.execute_wrappers:
        connection.execute_wrappers.append(count_statement)


def main() -> None:
    port, counts_file = sys.argv[1], sys.argv[2]
    raise_fd_limit()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    connection_created.connect(_on_connection)

    def dump(signum, frame) -> None:
        with _lock:
            data = json.dumps(COUNTS)
        tmp = counts_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, counts_file)

    signal.signal(signal.SIGUSR1, dump)
    if os.environ.get("BENCH_UVLOOP") == "1":  # before daphne makes its loop
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from daphne.cli import CommandLineInterface

    from chatapp.serving import daphne_args

    CommandLineInterface().run(["--verbosity", "0", *daphne_args("127.0.0.1", int(port))])


if __name__ == "__main__":
    main()
