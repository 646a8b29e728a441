"""`manage.py batch_worker`: run batch jobs (the production shape's `worker` service).

django_tasks_db's own Worker on the "batches" queue, after one recovery sweep (a batch whose
runner died is queued again), and with that sweep repeated every BATCH_LEASE_SECONDS beside it.
SIGTERM / SIGINT stop it gracefully once the job at hand ends; a killed worker's items are
claimed again by any runner once their leases run out.
"""

import threading

from django.core.management.base import BaseCommand

from chatapp.reaper import PROCESS_ID
from chatapp.tasks import make_worker, recover_quietly, recovery_loop


class Command(BaseCommand):
    help = "Run batch jobs (Django Tasks database worker on the 'batches' queue)."

    def add_arguments(self, parser):
        parser.add_argument("--interval", type=float, default=0.5, help="Seconds between polls.")

    def handle(self, *args, interval: float, **options):
        recover_quietly()
        stop = threading.Event()
        threading.Thread(
            target=recovery_loop, args=(stop,), daemon=True, name="batch-recovery"
        ).start()
        worker = make_worker(worker_id=f"worker:{PROCESS_ID}", interval=interval)
        worker.configure_signals()
        self.stdout.write(f"batch worker {PROCESS_ID} waiting for jobs")
        try:
            worker.run()
        finally:
            stop.set()
