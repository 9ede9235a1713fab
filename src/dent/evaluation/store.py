"""Durable results: one SQLite row per finished unit of work.

Why SQLite (WAL journal, one transaction per unit) rather than JSON lines:

* a commit is atomic and durable: after ``kill -9`` (or a power cut, with ``synchronous=FULL``) a unit is
  either fully stored or absent; there is no torn last line to detect and repair;
* the unit key is the primary key, so a unit can never be stored twice, even when two shard processes on
  one machine write into the same store (SQLite locks; writers wait up to a minute);
* merging shards from other machines is a union of rows by key (:func:`read_records` over several files).

A store does not care which config produced a unit: every unit is keyed by the content hash of
everything that determines its result (see :mod:`dent.evaluation.units`), and carries the hash of the
run config it was computed under. The run directory (:mod:`dent.evaluation.rundir`) is what refuses to
mix configs. Do not put a store on a network file system (SQLite's WAL needs shared memory); give each
machine its own run directory and merge at report time.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from dent.errors import CorruptFileError

STORE_NAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    key TEXT PRIMARY KEY,          -- content hash of the unit's spec
    config_hash TEXT NOT NULL,     -- hash of the result-affecting run config
    kind TEXT NOT NULL,            -- clean | attack
    defense TEXT NOT NULL,
    attack TEXT,                   -- attack point label; NULL for clean units
    batch_size INTEGER NOT NULL,
    batch_index INTEGER NOT NULL,
    n_points INTEGER NOT NULL,
    spec TEXT NOT NULL,            -- JSON: everything the key hashes
    result TEXT NOT NULL,          -- JSON: per-point results
    seconds REAL NOT NULL,
    device TEXT NOT NULL,
    host TEXT NOT NULL,
    finished TEXT NOT NULL
);
"""


@dataclass
class UnitRecord:
    """One finished unit of work as stored."""

    key: str
    config_hash: str
    kind: str
    defense: str
    attack: Optional[str]
    batch_size: int
    batch_index: int
    spec: dict[str, Any]
    result: dict[str, Any]
    seconds: float
    device: str
    host: str = field(default_factory=socket.gethostname)
    finished: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def n_points(self) -> int:
        return len(self.result.get("positions", ()))


class ResultStore:
    """A SQLite file of :class:`UnitRecord` rows. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CorruptFileError(f"{self.path} is not a results store (file not found)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise CorruptFileError(f"{self.path} is not a readable results store: {exc}") from None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- metadata -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Optional[Any]:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- units ----------------------------------------------------------------------------------
    def done_keys(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT key FROM units")}

    def __contains__(self, key: object) -> bool:
        return self._db.execute("SELECT 1 FROM units WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM units").fetchone()[0]

    def put(self, record: UnitRecord) -> bool:
        """Store ``record`` durably in one transaction; ``False`` if its key was already stored."""
        with self._transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO units (key, config_hash, kind, defense, attack, batch_size, batch_index,"
                " n_points, spec, result, seconds, device, host, finished)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key, record.config_hash, record.kind, record.defense, record.attack,
                    record.batch_size, record.batch_index, record.n_points,
                    json.dumps(record.spec, sort_keys=True), json.dumps(record.result),
                    record.seconds, record.device, record.host, record.finished,
                ),
            )
            return cursor.rowcount == 1

    def records(self) -> Iterator[UnitRecord]:
        rows = self._db.execute(
            "SELECT key, config_hash, kind, defense, attack, batch_size, batch_index, spec, result, seconds,"
            " device, host, finished FROM units ORDER BY rowid"
        )
        for row in rows:
            yield UnitRecord(
                key=row[0], config_hash=row[1], kind=row[2], defense=row[3], attack=row[4], batch_size=row[5],
                batch_index=row[6], spec=json.loads(row[7]), result=json.loads(row[8]), seconds=row[9],
                device=row[10], host=row[11], finished=row[12],
            )

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def read_records(paths: Iterable[str | Path]) -> tuple[list[UnitRecord], int]:
    """The union of the records in several stores, by key; also the number of duplicate keys dropped.

    Duplicates arise when the same unit was computed in two places (e.g. a shard run twice); they are
    the same computation, so the first one read is kept.
    """
    seen: dict[str, UnitRecord] = {}
    duplicates = 0
    for path in paths:
        with ResultStore(path, create=False) as store:
            for record in store.records():
                if record.key in seen:
                    duplicates += 1
                else:
                    seen[record.key] = record
    return list(seen.values()), duplicates
