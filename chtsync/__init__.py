"""chtsync: follow CHT CouchDB databases into PostgreSQL and keep SQL models fresh."""

__version__ = "0.1.0"
