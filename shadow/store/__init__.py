"""Where pair records go. `open_store` gives the store the settings name: `SqliteStore`
(`sqlite`, the embedded default) or `PostgresStore` (`postgres`, several gateway nodes sharing
one store); both implement `PairStore` and `ReviewStore` (`base`) over shared SQL (`sql`).
`PairWriter` (`writer`) batches records into a store and spills what it refuses."""

from __future__ import annotations

import os
from pathlib import Path

from shadow.config import ShadowSettings
from shadow.store.base import PairStore, Record, ReviewStore
from shadow.store.sqlite import SqliteStore
from shadow.store.writer import PairWriter

__all__ = ["PairStore", "PairWriter", "Record", "ReviewStore", "SqliteStore", "open_store"]


def open_store(settings: ShadowSettings, root: Path) -> PairStore:
    """The store `settings` names: SQLite at `store_path` (relative to `root`), or PostgreSQL
    at the DSN in the environment variable `postgres_dsn_env`."""
    if settings.store == "postgres":
        dsn = os.environ.get(settings.postgres_dsn_env, "")
        if not dsn:
            raise ValueError(f"shadow.store is postgres but ${settings.postgres_dsn_env} is not "
                             "set: export it as postgresql://USER:PASSWORD@HOST:PORT/DB")
        from shadow.store.postgres import PostgresStore  # psycopg loads only for this backend

        return PostgresStore(dsn)
    path = root / settings.store_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(path)
