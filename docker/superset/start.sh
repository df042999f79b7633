#!/bin/sh
# Start Apache Superset for chtsync's `superset` compose profile: upgrade Superset's metadata
# database, make sure the admin user exists with the password from the environment (a changed
# SUPERSET_ADMIN_PASSWORD takes effect at the next start), register roles and permissions, serve.
# Every step is idempotent, so a restart does the same and changes nothing else.
#
# Environment: SUPERSET_SECRET_KEY (required; read by superset_config.py), SUPERSET_ADMIN_PASSWORD
# or SUPERSET_ADMIN_PASSWORD_FILE (required), SUPERSET_ADMIN_USER (admin), SUPERSET_ADMIN_EMAIL,
# SUPERSET_PORT (8088), SUPERSET_BIND_ADDRESS (0.0.0.0), SERVER_WORKER_AMOUNT (1),
# SERVER_THREADS_AMOUNT (20), GUNICORN_TIMEOUT (120). Arguments, if any, replace the web server.
set -eu

say() { echo "chtsync-superset: $*" >&2; }

if [ -n "${SUPERSET_ADMIN_PASSWORD_FILE:-}" ]; then
    SUPERSET_ADMIN_PASSWORD=$(cat "$SUPERSET_ADMIN_PASSWORD_FILE")
fi
if [ -z "${SUPERSET_ADMIN_PASSWORD:-}" ]; then
    say "SUPERSET_ADMIN_PASSWORD is not set: put it in .env (or SUPERSET_ADMIN_PASSWORD_FILE)"
    exit 2
fi
if [ -z "${SUPERSET_SECRET_KEY:-}" ] && [ -z "${SUPERSET_SECRET_KEY_FILE:-}" ]; then
    say "SUPERSET_SECRET_KEY is not set: put one in .env, e.g. the output of: openssl rand -base64 42"
    exit 2
fi
user="${SUPERSET_ADMIN_USER:-admin}"

say "upgrading the metadata database"
superset db upgrade
say "admin user '$user'"
# create-admin leaves an existing user alone (and exits 0); reset-password then applies the
# password from the environment either way.
superset fab create-admin --username "$user" --firstname Superset --lastname Admin \
    --email "${SUPERSET_ADMIN_EMAIL:-admin@example.org}" --password "$SUPERSET_ADMIN_PASSWORD"
superset fab reset-password --username "$user" --password "$SUPERSET_ADMIN_PASSWORD"
say "roles and permissions"
superset init

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
say "serving on ${SUPERSET_BIND_ADDRESS:-0.0.0.0}:${SUPERSET_PORT:-8088}"
exec gunicorn \
    --bind "${SUPERSET_BIND_ADDRESS:-0.0.0.0}:${SUPERSET_PORT:-8088}" \
    --access-logfile - --error-logfile - \
    --workers "${SERVER_WORKER_AMOUNT:-1}" \
    --worker-class gthread --threads "${SERVER_THREADS_AMOUNT:-20}" \
    --timeout "${GUNICORN_TIMEOUT:-120}" \
    --limit-request-line 0 --limit-request-field_size 0 \
    "superset.app:create_app()"
