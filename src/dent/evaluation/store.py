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
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from dent.errors import CorruptFileError, DentError, OutputError
from dent.outputs import output_dir

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
    """A SQLite file of :class:`UnitRecord` rows. Use as a context manager or call :meth:`close`.

    ``create=False`` opens an existing store read-only: nothing is written (no tables, no journal mode
    change), so a store in a directory without write access can still be reported.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        self.writable = create
        if self.path.is_dir():
            raise CorruptFileError(f"{self.path} is a directory; expected a results store file ({STORE_NAME})")
        if not create and not self.path.is_file():
            raise CorruptFileError(f"{self.path} is not a results store (file not found)")
        if create:
            output_dir(self.path.parent, "directory of the results store")
        target, uri = (self.path, False) if create else (readonly_uri(self.path), True)
        with self._faults():
            self._db = sqlite3.connect(target, uri=uri, timeout=60.0, isolation_level=None)
        try:
            with self._faults():
                self._prepare()
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        """Check that the file is dent's store (or new, when writable) and set it up for durable writes."""
        check_tables(self._db, self.path, allow_empty=self.writable)
        if self.writable:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    @contextmanager
    def _faults(self) -> Iterator[None]:
        """Turn a SQLite error that the file system or the file explains into a :class:`DentError`."""
        try:
            yield
        except sqlite3.Error as exc:
            fault = store_fault(exc, self.path, self.writable)
            if fault is None:
                raise
            raise fault from None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- metadata -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Optional[Any]:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: Any) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- units ----------------------------------------------------------------------------------
    def done_keys(self) -> set[str]:
        return {row[0] for row in self._query("SELECT key FROM units")}

    def __contains__(self, key: object) -> bool:
        return bool(self._query("SELECT 1 FROM units WHERE key = ?", (key,)))

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM units")[0][0]

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
        rows = self._query(
            "SELECT key, config_hash, kind, defense, attack, batch_size, batch_index, spec, result, seconds,"
            " device, host, finished FROM units ORDER BY rowid"
        )
        for row in rows:
            yield UnitRecord(
                key=row[0], config_hash=row[1], kind=row[2], defense=row[3], attack=row[4], batch_size=row[5],
                batch_index=row[6], spec=json.loads(row[7]), result=json.loads(row[8]), seconds=row[9],
                device=row[10], host=row[11], finished=row[12],
            )

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._faults():
            return self._db.execute(sql, params).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._faults():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite has already rolled back after e.g. a full disk
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def readonly_uri(path: Path) -> str:
    """The SQLite URI that opens ``path`` for reading only, leaving its directory as it was.

    A reader of a WAL database creates the ``-shm`` index (and an empty ``-wal``) beside it and, being
    read-only, cannot remove them on closing; in a directory without write access it cannot open at all.
    So when no ``-wal`` file exists (no connection has the store open, every commit is in the main file),
    the store is opened as immutable, which reads it without locks or side files. A writer starting during
    such a read appends to its own new ``-wal`` and changes the main file only at a later checkpoint. With a
    ``-wal`` present (a run in progress, or one killed), the normal read-only mode reads it.
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    return uri if path.with_name(path.name + "-wal").exists() else uri + "&immutable=1"


def _columns(db: sqlite3.Connection) -> dict[str, set[str]]:
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: {row[0] for row in db.execute("SELECT name FROM pragma_table_info(?)", (t,))} for t in tables}


def _expected_columns() -> dict[str, set[str]]:
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(_SCHEMA)
        return _columns(db)


def check_tables(db: sqlite3.Connection, path: Path, *, allow_empty: bool) -> None:
    """Refuse a SQLite file that is not a dent results store (other tables, or ours with other columns).

    An empty database is a new store when ``allow_empty`` (opening to write), else an error.
    """
    found = _columns(db)
    if not found and allow_empty:
        return
    expected = _expected_columns()
    if not found:
        problem = "it is an empty SQLite database"
    elif not expected.keys() <= found.keys():
        problem = f"it is a SQLite database with the tables {', '.join(sorted(found))}"
    else:
        lacking = {t: sorted(cols - found[t]) for t, cols in expected.items() if cols - found[t]}
        if not lacking:
            return
        problem = "; ".join(f"its table {t!r} lacks the columns {', '.join(c)}" for t, c in lacking.items())
    raise CorruptFileError(
        f"{path} is not a dent results store: {problem} (expected the tables {', '.join(sorted(expected))} "
        "written by `dent evaluate`)"
    )


#: SQLite primary result codes (https://sqlite.org/rescode.html) that a file or the file system explains.
_READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 8, 10, 11, 13, 14, 26
_READONLY_DIRECTORY = _READONLY | 6 << 8  # extended: a side file (-shm) cannot be created in the directory
#: Their messages, for Python 3.10, whose sqlite3 errors carry no code.
_CODE_BY_MESSAGE = {
    "attempt to write a readonly database": _READONLY, "disk I/O error": _IOERR,
    "database disk image is malformed": _CORRUPT, "database or disk is full": _FULL,
    "unable to open database file": _CANTOPEN, "file is not a database": _NOTADB,
}


def store_fault(exc: sqlite3.Error, path: Path, writing: bool) -> Optional[DentError]:
    """The user-facing error for a SQLite error on the store at ``path``; ``None`` when it is none of those."""
    extended = getattr(exc, "sqlite_errorcode", None)
    code = _CODE_BY_MESSAGE.get(str(exc)) if extended is None else extended & 0xFF
    if code == _NOTADB:
        return CorruptFileError(f"{path} is not a dent results store: {exc} (expected a SQLite file written by "
                                "`dent evaluate`)")
    if code == _CORRUPT:
        return CorruptFileError(f"results store {path} is damaged: {exc}")
    if extended == _READONLY_DIRECTORY and not writing:  # a reader cannot create the -shm index of a WAL
        return CorruptFileError(
            f"cannot read results store {path}: its directory is read-only and it holds the write-ahead log of "
            "an interrupted run; copy the run directory somewhere writable and read the copy"
        )
    if code == _READONLY:
        return OutputError(f"results store {path} is read-only ({exc}); expected a writable file in a writable "
                           "directory: choose another output.root or output.name, or copy the run directory")
    if code == _FULL:
        return OutputError(f"cannot write results store {path}: the disk is full ({exc}); the units finished "
                           "before are kept in it: free space and run the same command again to resume")
    if code in (_CANTOPEN, _IOERR):
        action = "write" if writing else "read"
        error = OutputError if writing else CorruptFileError
        return error(f"cannot {action} results store {path}: {exc}")
    return None


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
