"""`manage.py prepare`: the container's start step, before daphne.

Migrate, make the cache table, seed providers from the environment, make sure an administrator exists and reap replies
left streaming by a previous run. Several app containers may start at once: on PostgreSQL the
whole step runs under an advisory lock, so only one migrates at a time and the others then find
nothing to do. Static files are collected at image build time, not here.
"""

from contextlib import contextmanager

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection

from chatapp.management.commands.start import Command as StartCommand
from chatapp.model_catalog import catalog_sync
from chatapp.oidc import provider_seed_from_env

# Any constant shared by every app process; chosen to not collide with other tools' locks.
ADVISORY_LOCK_ID = 0x6B696D69  # "kimi"


@contextmanager
def start_lock():
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [ADVISORY_LOCK_ID])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [ADVISORY_LOCK_ID])


class Command(BaseCommand):
    help = "Migrate, make the cache table, seed providers, ensure an administrator, reap dead replies (start step)."

    def handle(self, *args, **options):
        with start_lock():
            call_command("migrate", interactive=False, verbosity=1)
            call_command("createcachetable", verbosity=0)  # the DB cache when REDIS_URL is unset
            catalog_sync()
            provider_seed_from_env()
            starter = StartCommand(stdout=self.stdout, stderr=self.stderr)
            starter.ensure_admin()
        call_command("reap_replies", stdout=self.stdout)
        call_command("purge_audit", stdout=self.stdout)
