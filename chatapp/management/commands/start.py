"""`manage.py start`: migrate, make the cache table, collect static files, seed providers, make sure an administrator
exists, then serve with daphne, with one batch worker inside it (BATCH_WORKER=embedded). The
README's first command ends with it."""

import os
import secrets
import sys

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from chatapp.model_catalog import catalog_sync
from chatapp.oidc import provider_seed_from_env
from chatapp.serving import daphne_args


class Command(BaseCommand):
    help = "Prepare the database and static files, then serve the app with daphne."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-serve", action="store_true", help="Prepare only.")

    def handle(self, *args, host: str, port: int, no_serve: bool, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("createcachetable", verbosity=0)  # the DB cache (when REDIS_URL is unset)
        call_command("collectstatic", interactive=False, verbosity=0)
        catalog_sync()
        provider_seed_from_env()
        self.ensure_admin()
        if no_serve:
            return
        url = f"http://{host}:{port}/"
        self.stdout.write(self.style.SUCCESS(f"Serving on {url} (Ctrl+C to stop)"))
        sys.stdout.flush()
        # One batch worker inside this server process (chatapp/tasks.py), unless a separate
        # `manage.py batch_worker` is run instead (BATCH_WORKER=external).
        os.environ.setdefault("BATCH_WORKER", "embedded")
        argv = [sys.executable, "-m", "daphne", *daphne_args(host, port)]
        os.execv(sys.executable, argv)

    def ensure_admin(self) -> None:
        User = get_user_model()
        admins = User.objects.filter(is_superuser=True, is_active=True)
        if admins.exists():
            names = ", ".join(admins.values_list("username", flat=True)[:3])
            self.stdout.write(
                f"Log in as an existing administrator ({names}). Forgot the password? Run:\n"
                f"  .venv/bin/python manage.py changepassword {admins.first().username}"
            )
            return
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME") or "admin"
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL", "")
        generated = not password
        password = password or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email=email, password=password)
        bar = "=" * 64
        self.stdout.write(self.style.SUCCESS(bar))
        self.stdout.write(
            self.style.SUCCESS(f"Administrator created. Log in with:\n  username: {username}")
        )
        if generated:
            self.stdout.write(self.style.SUCCESS(f"  password: {password}"))
            self.stdout.write("This password is shown only once. Change it any time with:")
            self.stdout.write(f"  .venv/bin/python manage.py changepassword {username}")
        else:
            self.stdout.write("  password: the one in DJANGO_SUPERUSER_PASSWORD")
        self.stdout.write(self.style.SUCCESS(bar))
