"""Durable state behind the ``Store`` protocol; SQLite in the data directory by default, PostgreSQL for replicas."""

from server.errors import ConfigError
from server.settings import Settings, redact_url
from server.storage.base import CalibrationRecord, LabelSet, Store
from server.storage.postgres import PostgresStore
from server.storage.sqlite import SqliteStore

DATABASE_FILE = "ttaserve.db"
POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(settings: Settings) -> Store:
    """The store the settings name: PostgreSQL at ``TTA_DATABASE_URL`` when set, else the SQLite file
    ``TTA_DATA_DIR/ttaserve.db``. Raises ConfigError (the URL's password never in it) when it cannot open."""
    if settings.database_url is None:
        return SqliteStore(settings.data_dir / DATABASE_FILE)
    url = settings.database_url.get_secret_value().strip()
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            f"TTA_DATABASE_URL ({redact_url(url)}) must be a postgresql://USER:PASSWORD@HOST:PORT/DATABASE URL; "
            "unset it to keep the store in TTA_DATA_DIR"
        )
    return PostgresStore(url)


__all__ = [
    "DATABASE_FILE",
    "CalibrationRecord",
    "LabelSet",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "open_store",
]
