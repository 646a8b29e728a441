"""Database reads a new socket waits on, run beside the thread that writes.

Channels' `database_sync_to_async` runs every call in one thread, in arrival order. Under a
burst (a team opening the app at nine) a new socket's session lookup, access check and state
would queue behind every send and reply-end of the process, and the socket would wait seconds
to be accepted. Reads that write nothing run instead on a few threads of their own, each with
its own database connection (SQLite's WAL lets them read beside the writer; PostgreSQL takes
them from the pool), so opening a socket never waits for other sockets' traffic. Everything
that writes stays on Channels' one thread.
"""

from concurrent.futures import ThreadPoolExecutor

from channels.db import DatabaseSyncToAsync

READ_THREADS = 4
_executor = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="db-read")


def read_off_loop(func):
    """`func` (sync, read-only) as a coroutine function run on the read threads."""
    return DatabaseSyncToAsync(func, thread_sensitive=False, executor=_executor)
