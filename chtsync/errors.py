"""Every failure chtsync can name, as a type, so callers decide by kind and never by message text.

    ChtsyncError                  something failed; the message is one line, without secrets
     ├── ConfigError              a setting, a file or the environment is wrong; the message
     │    │                       names the setting and the fix (found before anything is written)
     │    ├── ModelsFileError     models.yaml or a model's SQL is wrong (never retried as-is)
     │    ├── PrivilegeError      the Postgres role lacks a privilege chtsync needs
     │    └── NotMigrated         the schema has no chtsync tables yet: run `chtsync migrate`
     ├── PostgresUnavailable      cannot connect to Postgres; .permanent (wrong password, no such
     │                            database) is reported, a server not up yet is waited for
     ├── CouchError               a CouchDB call failed; .transient ones are retried
     │    ├── CouchAuthError      wrong credentials / no access (401, 403)
     │    ├── CouchNotFound       no such database (404)
     │    └── CouchBadSince       `since` means nothing to this database (400: recreated?)
     ├── PlanConflict             models apply would replace objects chtsync did not create
     ├── ModelBuildError          Postgres refused a model while building it
     └── AdoptError               CHT Sync's tables cannot be taken over as they are

Only the command line (chtsync/cli/) turns them into exit codes, with `exit_code`. `Stopped` is
not among them: it is how a follower or a verify learns that the service is shutting down.
"""

from __future__ import annotations


class ChtsyncError(Exception):
    """A failure chtsync can describe in one line."""

    exit_code = 1


class ConfigError(ChtsyncError):
    """A setting is missing or wrong; the message names the key and the fix."""

    exit_code = 2


class ModelsFileError(ConfigError):
    """The models file, or a model in it, is wrong: nothing changes until the file is fixed."""


class PrivilegeError(ConfigError):
    """The Postgres role may not do what chtsync needs (create the schema, its tables...)."""


class NotMigrated(ConfigError):
    """The schema has no chtsync tables: the command needs `chtsync migrate` first."""


class PostgresUnavailable(ChtsyncError):
    """Postgres cannot be reached. `permanent`: waiting will not help (authentication failed,
    the database does not exist, no pg_hba.conf entry)."""

    exit_code = 2

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class CouchError(ChtsyncError):
    """A CouchDB call failed. `transient` errors are retried; the others need a person."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


class CouchAuthError(CouchError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status=status, transient=False)


class CouchNotFound(CouchError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=404, transient=False)


class CouchBadSince(CouchError):
    """HTTP 400 on `since`: the stored seq means nothing to this database (recreated?)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=400, transient=False)


class PlanConflict(ChtsyncError):
    """models apply found objects of the models' names that chtsync did not create."""

    exit_code = 2


class ModelBuildError(ChtsyncError):
    """Postgres refused to build a model (its SQL failed, or a dependent view cannot be kept)."""

    exit_code = 2


class AdoptError(ChtsyncError):
    """The database cannot be adopted as it is; the message says why and what to do."""

    exit_code = 2


class Stopped(Exception):
    """The service is shutting down: the work in hand is abandoned (nothing half-written).
    Never shown to anyone, so not a ChtsyncError."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (Postgres adds DETAIL/HINT lines), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
