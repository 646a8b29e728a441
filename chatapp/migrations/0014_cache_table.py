"""The database cache's table, made by `migrate`: a plain Django deploy (migrate, then the
server) must not need a custom command before a log-in works (log-in throttling counts in the
cache). Runs `createcachetable`, which makes the table of every configured database cache
(none when REDIS_URL selects the Redis cache) and skips tables that exist."""

from django.core.management import call_command
from django.db import migrations


def create_cache_tables(apps, schema_editor):
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("chatapp", "0013_sharing")]

    operations = [migrations.RunPython(create_cache_tables, migrations.RunPython.noop)]
