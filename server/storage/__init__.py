"""Durable state behind the ``Store`` protocol; SQLite in the data directory by default."""

from server.settings import Settings
from server.storage.base import CalibrationRecord, LabelSet, Store
from server.storage.sqlite import SqliteStore

DATABASE_FILE = "ttaserve.db"


def open_store(settings: Settings) -> Store:
    """The store the settings name: today the SQLite file ``TTA_DATA_DIR/ttaserve.db``."""
    return SqliteStore(settings.data_dir / DATABASE_FILE)


__all__ = ["DATABASE_FILE", "CalibrationRecord", "LabelSet", "SqliteStore", "Store", "open_store"]
