# chtsync: follow CHT CouchDB databases into PostgreSQL and keep SQL models fresh.
#
#   docker build -t chtsync .
#   docker run --rm --env-file .env -p 127.0.0.1:9090:9090 chtsync            # = chtsync run
#   docker run --rm --env-file .env chtsync status                            # any other command
#
# Configuration: environment variables (CHT Sync's names, see .env.example) win over
# /app/config.yaml. Mount your own config.yaml, or models beside the shipped ones:
#   -v ./config.yaml:/app/config.yaml:ro   -v ./my-models:/models:ro -e CHTSYNC_MODELS=/models/models.yaml
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

# The package and its runtime dependencies only (no test extras): pip builds the wheel from these
# sources (migrations, base models and the Superset bundle travel inside it as package resources,
# chtsync/paths.py) and installs it; the sources are removed afterwards.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chtsync/ chtsync/
COPY migrations/ migrations/
COPY sql/ sql/
COPY superset/ superset/
RUN pip install --no-cache-dir . \
    && cd / && rm -rf /src

# Your own config.yaml or models: mount them (docs/docker.md); CHTSYNC_MODELS points at a models file.
WORKDIR /app
COPY config.yaml /app/config.yaml
COPY docker/couchdb_init.py /app/docker/couchdb_init.py

# Metrics and health endpoints on by default in the container (chtsync leaves them off when
# METRICS_PORT is unset); the HEALTHCHECK below needs them.
ENV CHTSYNC_CONFIG=/app/config.yaml \
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
