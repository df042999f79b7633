# chtsync: follow CHT CouchDB databases into PostgreSQL and keep SQL models fresh.
#
#   docker build -t chtsync .
#   docker run --rm --env-file .env -p 127.0.0.1:9090:9090 chtsync            # = chtsync run
#   docker run --rm --env-file .env chtsync status                            # any other command
#
# Configuration: environment variables (CHT Sync's names, see .env.example) win over
# /app/config.yaml. Mount your own config.yaml or models over the baked-in ones:
#   -v ./config.yaml:/app/config.yaml:ro   -v ./my-models:/app/sql:ro   (or CHTSYNC_MODELS=/path)
# See docs/docker.md.

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The service runs as this unprivileged user; the files under /app stay root-owned, read-only to it.
RUN groupadd --system --gid 10001 chtsync \
    && useradd --system --uid 10001 --gid chtsync --create-home --home-dir /home/chtsync \
        --shell /usr/sbin/nologin chtsync

# The package and its runtime dependencies only (no test extras): the same `pip install` of this
# project that .ci/run proves (there as an editable install with [test]). The sources are
# removed afterwards; the wheel built from them is in site-packages.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chtsync/ chtsync/
RUN pip install --no-cache-dir . \
    && cd / && rm -rf /src

# CHTSYNC_HOME: where chtsync finds its migrations, the base models, the Superset bundle and
# config.yaml (chtsync/paths.py). A non-editable install does not carry them, so they live here.
WORKDIR /app
COPY migrations/ /app/migrations/
COPY sql/ /app/sql/
COPY superset/ /app/superset/
COPY config.yaml /app/config.yaml
COPY docker/couchdb_init.py /app/docker/couchdb_init.py

# Metrics and health endpoints on by default in the container (chtsync leaves them off when
# METRICS_PORT is unset); the HEALTHCHECK below needs them.
ENV CHTSYNC_HOME=/app \
    CHTSYNC_CONFIG=/app/config.yaml \
    METRICS_PORT=9090 \
    METRICS_HOST=0.0.0.0

USER 10001:10001
EXPOSE 9090

# /healthz answers once migrations and the model plan are applied (the first start against a big
# CHT Sync database can take minutes: hence the long start period). No curl in a slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('METRICS_PORT') or '9090'), timeout=4)"]

ENTRYPOINT ["chtsync"]
CMD ["run"]
