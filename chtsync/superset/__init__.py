"""The "CHT overview" Superset dashboard: bundle.py builds its import bundle from the YAML in
`superset/`, client.py imports it over the REST API (docs/superset.md)."""

from chtsync.superset.bundle import (
    DATABASE_FILE,
    ZIP_ROOT,
    DatabaseURI,
    SupersetError,
    build_files,
    bundle_dir,
    substitute_schema,
    to_zip,
)
from chtsync.superset.client import ImportResult, Superset, import_bundle

__all__ = [
    "DATABASE_FILE", "ZIP_ROOT", "DatabaseURI", "ImportResult", "Superset", "SupersetError", "build_files",
    "bundle_dir", "import_bundle", "substitute_schema", "to_zip",
]
