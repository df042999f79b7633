"""Where chtsync finds the files it ships beside the package (migrations, base models)."""

import os
from pathlib import Path


def home() -> Path:
    """The project folder: CHTSYNC_HOME (the Docker image sets it), else the source checkout."""
    env = os.environ.get("CHTSYNC_HOME")
    return Path(env) if env else Path(__file__).resolve().parent.parent


def migrations_dir() -> Path:
    return home() / "migrations"


def default_models() -> Path:
    return home() / "sql" / "models.yaml"
