"""Batch workers for real: `manage.py batch_worker` processes on the test PostgreSQL and Redis.

Two workers (the production shape's `worker` service scaled to 2) share a batch's job queue; the
one running the batch is killed with SIGKILL mid-batch and another is started: every item is
answered exactly once (one saved answer and one usage record each), none lost.
"""

import re
import threading
import time
from pathlib import Path

import pytest

from chatapp import tasks
from chatapp.models import Batch, BatchItem, ModelConfig, UsageRecord
from tests.conftest import CHANNEL_LAYER_PREFIX
from tests.factories import user_create
from tests.fake_upstream import stream_reply
from tests.servers import AppProcess, app_env, require_services
from tests.test_batches import _index_by_image, _item_index, _png

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True)]

LEASE = 3.0


class Worker(AppProcess):
    def __init__(self, name: str, env: dict) -> None:
        super().__init__(f"worker-{name}", ["manage.py", "batch_worker", "--interval", "0.2"], env)

    def stop(self, timeout: float = 20.0) -> None:
        super().stop(timeout)


def _wait(condition, timeout: float, what: str, workers=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {w.name}\n{w.output()}" for w in workers)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def test_kill_the_worker_mid_batch_every_item_answered_exactly_once(fake_upstream, settings):
    require_services()
    from chatapp.attachments import attachment_create
    from chatapp.images import process_upload

    env = app_env(
        upstream_url=fake_upstream.base_url,
        channel_prefix=CHANNEL_LAYER_PREFIX,
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        BATCH_LEASE_SECONDS=str(LEASE),
        BATCH_CONCURRENCY="3",
        UPSTREAM_RETRY_BASE_DELAY="0.01",
    )
    user = user_create()
    model = ModelConfig.objects.select_related("provider").get(model_id="fake-model")
    ids = [
        attachment_create(
            owner=user, conversation=None, filename=f"{i}.png", processed=process_upload(_png(i))
        ).pk
        for i in range(40)
    ]
    index = {}
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def responder(request):
        position = _item_index(request, index)
        with lock:
            counts[position] = counts.get(position, 0) + 1
        return stream_reply([f"answer {position}"], delay=1.0)

    fake_upstream.responder = responder
    workers = [Worker("a", env), Worker("b", env)]
    try:
        batch = tasks.batch_start(
            user=user, model=model, question="Q?", fields_raw=[], attachment_ids=ids
        )
        index.update(_index_by_image(batch))
        done = BatchItem.objects.filter(batch=batch, status="done")
        running_items = BatchItem.objects.filter(batch=batch, status="running")
        _wait(
            lambda: done.count() >= 6 and running_items.exists(),
            90,
            "the first answers with more in flight",
            workers,
        )
        # The worker running the batch: its job's worker id names its pid.
        from django_tasks_db.models import DBTaskResult

        running = DBTaskResult.objects.filter(task_path=tasks.TASK_PATH, status="RUNNING").first()
        assert running is not None
        pid = int(re.search(r":(\d+):", running.worker_ids[-1]).group(1))
        victim = next(w for w in workers if w.proc.pid == pid)
        victim.kill()
        answered_before = done.count()
        assert answered_before < 40
        workers.append(Worker("c", env))  # and start another
        _wait(
            lambda: Batch.objects.get(pk=batch.pk).status == Batch.Status.COMPLETE,
            90,
            "the batch to complete",
            workers,
        )
    finally:
        logs = "\n".join(f"--- {w.name}\n{w.output()}" for w in workers)
        for worker in workers:
            worker.stop()
    Path("/tmp/batch-workers-15.log").write_text(logs)
    items = list(BatchItem.objects.filter(batch=batch))
    assert {i.status for i in items} == {"done"}
    assert all(i.answer == f"answer {i.position}" for i in items)
    per_item = {}
    for item_id in UsageRecord.objects.filter(batch=batch).values_list("batch_item_id", flat=True):
        per_item[item_id] = per_item.get(item_id, 0) + 1
    assert per_item == {i.pk: 1 for i in items}  # one usage record each: answered once
    # Only the items in flight when the worker died (3 lanes) were asked twice.
    asked_twice = [p for p, n in counts.items() if n > 1]
    assert len(asked_twice) <= 3, counts
    assert all(n <= 2 for n in counts.values()), counts


class _Finished:
    """The end of one fake reply (the fake waits on it like a Gate's event): counts the
    requests in flight at the provider across every worker process."""

    def __init__(self, counter: dict, lock: threading.Lock) -> None:
        self.counter, self.lock = counter, lock

    def wait(self, timeout=None) -> bool:
        with self.lock:
            self.counter["now"] -= 1
        return True


def test_two_workers_share_the_providers_concurrency_limit(fake_upstream, settings):
    """The `worker` service scaled to 2, each running its own batch, provider limit 2: the
    provider never has more than 2 of their requests at once (the gate is shared through
    Redis, as chat's is), and both batches progress side by side."""
    require_services()
    from chatapp.attachments import attachment_create
    from chatapp.images import process_upload
    from tests.fake_upstream import Gate

    env = app_env(
        upstream_url=fake_upstream.base_url,
        channel_prefix=CHANNEL_LAYER_PREFIX,
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        BATCH_LEASE_SECONDS=str(LEASE),
        BATCH_CONCURRENCY="4",
    )
    user = user_create()
    model = ModelConfig.objects.select_related("provider").get(model_id="fake-model")
    model.provider.max_concurrency = 2
    model.provider.save()
    counter = {"now": 0, "max": 0, "total": 0}
    lock = threading.Lock()

    def responder(request):
        with lock:
            counter["now"] += 1
            counter["total"] += 1
            counter["max"] = max(counter["max"], counter["now"])
        reply = stream_reply(["ok"], delay=0.3)
        reply.parts.insert(-1, Gate(_Finished(counter, lock)))  # before [DONE]
        return reply

    fake_upstream.responder = responder
    workers = [Worker("a", env), Worker("b", env)]
    try:
        started = []
        for name in ("first", "second"):
            ids = [
                attachment_create(
                    owner=user,
                    conversation=None,
                    filename=f"{name}{i}.png",
                    processed=process_upload(_png(i)),
                ).pk
                for i in range(8)
            ]
            started.append(
                tasks.batch_start(
                    user=user, model=model, question="Q?", fields_raw=[], attachment_ids=ids
                )
            )
        _wait(
            lambda: (
                Batch.objects.filter(
                    pk__in=[b.pk for b in started], status=Batch.Status.COMPLETE
                ).count()
                == 2
            ),
            120,
            "both batches to complete",
            workers,
        )
    finally:
        for worker in workers:
            worker.stop()
    assert counter["total"] == 16
    assert counter["max"] <= 2, counter
    # Both workers ran a batch, at the same time (each batch's answers interleave).
    from django_tasks_db.models import DBTaskResult

    runs = DBTaskResult.objects.filter(task_path=tasks.TASK_PATH, status="SUCCESSFUL")
    assert len({r.worker_ids[-1] for r in runs}) == 2
    first, second = (
        sorted(BatchItem.objects.filter(batch=b).values_list("finished_at", flat=True))
        for b in started
    )
    assert first[0] < second[-1] and second[0] < first[-1]
