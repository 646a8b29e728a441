"""`manage.py reap_replies`: mark replies whose process died (lease expired) as interrupted.

Every daphne process already does this periodically (chatapp/reaper.py); this runs one sweep by
hand, from cron, or as a start step.
"""

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand

from chatapp.reaper import reap_once


class Command(BaseCommand):
    help = "Mark streaming replies whose lease expired as interrupted (keeping their text)."

    def handle(self, *args, **options):
        count = async_to_sync(reap_once)()
        self.stdout.write(f"{count} interrupted repl{'y' if count == 1 else 'ies'} reaped.")
