"""Where chtsync finds the files it ships: migrations, the base models, the Superset bundle.

The repository keeps them at its top level (migrations/, sql/, superset/); the wheel and the sdist
carry them inside the package as `chtsync/_data/<folder>` (pyproject's package-dir), read here
through importlib.resources. A source checkout or an editable install has no `_data`: the
checkout's own folders are used. CHTSYNC_HOME, when set, replaces all three (the folders under it).
"""

import os
from importlib import resources
from pathlib import Path

import chtsync


def checkout() -> Path:
    """The source checkout this package was imported from (meaningless for a wheel install)."""
    return Path(chtsync.__file__).resolve().parent.parent


def home() -> Path:
    """CHTSYNC_HOME if set, else the source checkout (where node_modules lives for the demo)."""
    env = os.environ.get("CHTSYNC_HOME")
    return Path(env) if env else checkout()


def shipped(folder: str) -> Path:
    """migrations, sql or superset: under CHTSYNC_HOME, else in the package, else in the checkout."""
    env = os.environ.get("CHTSYNC_HOME")
    if env:
        return Path(env) / folder
    packaged = resources.files(chtsync) / "_data" / folder
    # A regular package on disk gives a real path (yoyo and the model loader need one).
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return checkout() / folder


def migrations_dir() -> Path:
    return shipped("migrations")


def default_models() -> Path:
    return shipped("sql") / "models.yaml"


def superset_dir() -> Path:
    return shipped("superset")
