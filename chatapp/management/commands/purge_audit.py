"""`manage.py purge_audit`: delete audit entries older than AUDIT_RETENTION_DAYS (run from cron;
`manage.py prepare` runs it at every start)."""

from django.core.management.base import BaseCommand

from chatapp.audit import audit_purge


class Command(BaseCommand):
    help = "Delete audit log entries older than AUDIT_RETENTION_DAYS (0 keeps them forever)."

    def handle(self, *args, **options):
        deleted = audit_purge()
        self.stdout.write(f"Deleted {deleted} audit entr{'y' if deleted == 1 else 'ies'}.")
