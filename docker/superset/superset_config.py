"""Apache Superset settings for chtsync's `superset` compose profile.

Superset reads this file through SUPERSET_CONFIG_PATH (set by docker/superset/Dockerfile). Every
secret comes from the environment (or a file named by <NAME>_FILE); none has a default here.
Mount your own file over it, or point SUPERSET_CONFIG_PATH elsewhere, to change more.
"""

import os


def _env(name: str, default: str | None = None) -> str | None:
    """NAME from the environment, or the contents of the file named by NAME_FILE; '' = unset."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        with open(path) as f:
            return f.read().rstrip("\r\n")
    return os.environ.get(name) or default


SECRET_KEY = _env("SUPERSET_SECRET_KEY")
if not SECRET_KEY or len(SECRET_KEY) < 32:
    raise RuntimeError(
        "SUPERSET_SECRET_KEY is not set or shorter than 32 characters: put one in .env, e.g. the"
        " output of `openssl rand -base64 42`, and keep it (it encrypts the saved database password)"
    )

_home = os.environ.get("SUPERSET_HOME") or "/app/superset_home"
# Superset's own metadata (users, dashboards, charts). The default, SQLite on the superset_home
# volume, suits one Superset container; give a Postgres database here for anything bigger.
SQLALCHEMY_DATABASE_URI = _env("SUPERSET_METADATA_DB_URI") or f"sqlite:///{_home}/superset.db"

# Behind a reverse proxy that sets X-Forwarded-* headers (https termination).
ENABLE_PROXY_FIX = (_env("SUPERSET_ENABLE_PROXY_FIX", "false") or "").lower() in ("1", "true", "yes")

# Charts hit materialized views that chtsync refreshes every few seconds: do not cache results
# for long.
DATA_CACHE_CONFIG = {"CACHE_TYPE": "SimpleCache", "CACHE_DEFAULT_TIMEOUT": 60}

# No thumbnails or e-mail reports: they need Celery workers and a browser this setup has not.
FEATURE_FLAGS = {"THUMBNAILS": False, "ALERT_REPORTS": False}
