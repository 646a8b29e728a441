"""Background jobs on Django's Tasks framework (the django-tasks backport, database backend).

One job per batch run: `batch_run_task(batch_id)` runs the batch's items until none is left,
the batch is paused or cancelled, or the budget is reached (chatapp/batch_runner.py). Restart
safety does not depend on the job: items carry claims with leases (chatapp/batches.py), and a
batch whose runner died is queued again by `batches.batches_recover`, run when a worker starts
and every BATCH_LEASE_SECONDS by every worker and server process.

Workers: `manage.py batch_worker` (django_tasks_db's own Worker, plus the recovery sweep); the
production shape runs it as its own service. With BATCH_WORKER=embedded (what `manage.py start`
sets) the server process runs that same Worker in a thread, started by its first request like
the reaper, and hands each job's coroutine to the server's event loop: the in-process provider
gate and the in-memory channel layer are then the very ones chat uses.
"""

import asyncio
import logging
import threading

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import close_old_connections, transaction

from . import batches
from .batch_runner import batch_run
from .models import Batch
from .reaper import PROCESS_ID

try:  # Django 6.0+ has the framework built in; 5.2 uses the backport.
    from django.tasks import task
except ImportError:  # pragma: no cover - depends on the Django version
    from django_tasks import task

log = logging.getLogger(__name__)

QUEUE = "batches"
TASK_PATH = "chatapp.tasks.batch_run_task"

# The server's event loop when this process runs the embedded worker.
_server_loop: asyncio.AbstractEventLoop | None = None
_embedded: threading.Thread | None = None
_embedded_lock = threading.Lock()


@task(queue_name=QUEUE)
def batch_run_task(batch_id: int) -> None:
    loop = _server_loop
    if loop is not None and loop.is_running():
        asyncio.run_coroutine_threadsafe(batch_run(batch_id=batch_id), loop).result()
    else:
        async_to_sync(batch_run)(batch_id=batch_id)


def batch_enqueue(*, batch_id: int) -> None:
    batch_run_task.enqueue(batch_id=batch_id)


def batch_start(**kwargs) -> Batch:
    """batches.batch_create, then its job (queued once the batch is committed)."""
    with transaction.atomic():
        batch = batches.batch_create(**kwargs)
        transaction.on_commit(lambda: batch_enqueue(batch_id=batch.pk))
    return batch


def batch_control(*, batch: Batch, action: str, actor=None, address: str = "") -> Batch:
    """batches.batch_set_status, and a job when the batch runs again (resume, retry)."""
    with transaction.atomic():
        batch = batches.batch_set_status(batch=batch, action=action, actor=actor, address=address)
        # A second job beside a runner still finishing its last items is harmless (claims).
        if batch.status == Batch.Status.QUEUED:
            transaction.on_commit(lambda: batch_enqueue(batch_id=batch.pk))
    return batch


def _has_job(batch_ids: list[int]) -> set[int]:
    """Which of these batches have a job waiting or running."""
    from django_tasks_db.models import DBTaskResult

    found = set()
    for args in DBTaskResult.objects.filter(
        task_path=TASK_PATH, status__in=("READY", "RUNNING")
    ).values_list("args_kwargs", flat=True):
        batch_id = (args or {}).get("kwargs", {}).get("batch_id")
        if batch_id in batch_ids:
            found.add(batch_id)
    return found


def batches_recover() -> list[int]:
    """Queue a job for every batch whose runner died, and every queued batch without a job."""
    revived = batches.batches_stale(
        queued_ids_without_job=lambda ids: [pk for pk in ids if pk not in _has_job(ids)]
    )
    for pk in revived:
        batch_enqueue(batch_id=pk)
    return revived


# ---- workers ------------------------------------------------------------------------------------


def make_worker(*, worker_id: str, interval: float = 0.5):
    from django_tasks_db.management.commands.db_worker import Worker

    return Worker(
        queue_names=[QUEUE],
        interval=interval,
        batch=False,
        backend_name="default",
        startup_delay=False,
        max_tasks=None,
        worker_id=worker_id[:64],
        excluded_queue_names=[],
    )


def recover_quietly() -> None:
    try:
        revived = batches_recover()
        if revived:
            log.warning("batches queued again after their runner stopped: %s", revived)
    except Exception:  # a database blip: the next sweep tries again
        log.exception("batch recovery sweep failed")
    finally:
        close_old_connections()


def recovery_loop(stop: threading.Event) -> None:
    """The recovery sweep every BATCH_LEASE_SECONDS (a thread beside the worker)."""
    while not stop.wait(settings.BATCH_LEASE_SECONDS):
        recover_quietly()


def embedded_worker_ensure_started() -> None:
    """BATCH_WORKER=embedded: run one worker thread in this server process (cheap per request)."""
    global _server_loop, _embedded
    if settings.BATCH_WORKER != "embedded":
        return
    if _embedded is not None and _embedded.is_alive():
        return
    with _embedded_lock:
        if _embedded is not None and _embedded.is_alive():
            return
        _server_loop = asyncio.get_running_loop()

        def run() -> None:
            stop = threading.Event()
            threading.Thread(
                target=recovery_loop, args=(stop,), daemon=True, name="batch-recovery"
            ).start()
            recover_quietly()
            try:
                make_worker(worker_id=f"embedded:{PROCESS_ID}").run()
            finally:
                stop.set()

        _embedded = threading.Thread(target=run, daemon=True, name="batch-worker")
        _embedded.start()


def with_batch_worker(app):
    """ASGI wrapper: with BATCH_WORKER=embedded the first request starts the worker thread."""

    async def application(scope, receive, send):
        if scope["type"] in ("http", "websocket") and settings.BATCH_WORKER == "embedded":
            embedded_worker_ensure_started()
        return await app(scope, receive, send)

    return application
