#!/bin/sh
# Container start: prepare the database (migrate under a lock, seed providers, make sure an
# administrator exists, reap replies a previous run left streaming), then become the command
# (daphne by default) so it gets the signals. A failed step stops the container loudly.
set -eu

if [ "${SKIP_PREPARE:-}" != "1" ]; then
    echo "entrypoint: preparing the database" >&2
    python manage.py prepare
fi

echo "entrypoint: starting: $*" >&2
exec "$@"
