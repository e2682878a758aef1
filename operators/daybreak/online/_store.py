"""Where the online state lives: the OnlineStore protocol and its embedded backend (SQLite).

The state is a set of *entries*: (area, part, key, score, payload).

* area: a materialized generation (``g<id>``: written whole, then made current by one pointer
  switch) or a live day (``d<YYYYMMDD>``: events pushed for that day, read only while the
  current generation is of an earlier date, so an event already in the staged data never counts
  twice);
* part: what the entry serves (``w0``: window 0, ``a0``: as-of join 0, ``l0``: lookup 0);
* key: the entity, the JSON list of the part's ``by`` values (``[]``: a single series);
* score: the time a read selects on (a window entry's known-at, an as-of row's time, in
  microseconds since the epoch; 0 for snapshot rows);
* payload: a JSON object (what the entry holds; ``q``, its sequence number, orders ties).

A backend only stores and ranges; what entries mean is ``daybreak.online._online``'s.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeGuard, runtime_checkable

Entry = tuple[str, str, int, str]
"""(part, key, score, payload)"""
Query = tuple[str, str, str, float, float]
"""(area, part, key, lowest score, highest score), both ends included"""

URL_ENV = "DAYBREAK_ONLINE_URL"
"""Where the online store is (a Redis URL); unset: the embedded SQLite file. Never in a spec."""


def is_redis(url: str | None) -> TypeGuard[str]:
    """Whether an online store URL names a Redis server (else a SQLite file)."""
    return bool(url and url.startswith(("redis://", "rediss://", "unix://")))


_READ_CHUNK = 200
"""Queries read by one SQLite statement at most (4 parameters each: under SQLite's limit)."""

PUSH_SEQ_START = 1 << 40
"""Pushed entries are numbered from here: after any materialized entry (numbered from 0 per part)."""


@runtime_checkable
class OnlineStore(Protocol):
    """The operations materialize, push and features_for need; each backend makes the marked
    ones atomic, so a reader sees a generation whole or not at all, and a push whole or not at all."""

    def current(self) -> dict[str, Any] | None:
        """The current generation's metadata (``area``, ``date``, ``horizon_us``, ...), or None."""

    def write(self, area: str, entries: Iterable[Entry]) -> None:
        """Add entries to an area that is not current yet (a generation being built)."""

    def push(self, area: str, entries: Sequence[Entry], newest_us: int | None) -> None:
        """Add entries to a live area and raise the newest pushed event time (if given): atomically."""

    def switch(self, meta: dict[str, Any]) -> None:
        """Make generation ``meta['area']`` current: atomically."""

    def areas(self) -> list[str]:
        """Every area with entries (generations and live days)."""

    def drop(self, area: str) -> None:
        """Delete an area's entries."""

    def read(self, queries: Sequence[Query]) -> list[list[tuple[float, str]]]:
        """Each query's (score, payload) pairs."""

    def newest_us(self) -> int | None:
        """The latest event time of any pushed event (snapshot rows have none)."""

    def next_seq(self, n: int) -> int:
        """Reserve n sequence numbers for pushed entries; returns the first (>= PUSH_SEQ_START)."""

    def close(self) -> None:
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (area TEXT NOT NULL, part TEXT NOT NULL, key TEXT NOT NULL,
                                    score INTEGER NOT NULL, payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_key ON entries (area, part, key, score);
CREATE TABLE IF NOT EXISTS areas (area TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SQLiteStore:
    """The embedded store: one SQLite file (WAL: readers never wait for the writer, and see the
    last committed pointer). A connection per thread; a generation is written in batches, then
    made current by one transaction that rewrites the pointer."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _meta(self, db: sqlite3.Connection, name: str) -> Any:
        row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def current(self) -> dict[str, Any] | None:
        value = self._meta(self._db(), "current")
        return dict(value) if value is not None else None

    def _insert(self, db: sqlite3.Connection, area: str, entries: Iterable[Entry]) -> None:
        db.execute("INSERT OR IGNORE INTO areas VALUES (?)", (area,))
        db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                       ((area, part, key, score, payload) for part, key, score, payload in entries))

    def write(self, area: str, entries: Iterable[Entry]) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN")
            self._insert(db, area, entries)

    def push(self, area: str, entries: Sequence[Entry], newest_us: int | None) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            self._insert(db, area, entries)
            old = self._meta(db, "newest_us")
            if newest_us is not None and (old is None or newest_us > old):
                db.execute("INSERT OR REPLACE INTO meta VALUES ('newest_us', ?)", (json.dumps(newest_us),))

    def switch(self, meta: dict[str, Any]) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('current', ?)", (json.dumps(meta),))

    def areas(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT area FROM areas ORDER BY area")]

    def drop(self, area: str) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM entries WHERE area = ?", (area,))
            db.execute("DELETE FROM areas WHERE area = ?", (area,))

    def read(self, queries: Sequence[Query]) -> list[list[tuple[float, str]]]:
        """One statement per area and part for up to _READ_CHUNK queries (their keys and ranges
        joined to the index), not one per query."""
        db = self._db()
        out: list[list[tuple[float, str]]] = [[] for _ in queries]
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (area, part, _, _, _) in enumerate(queries):
            groups.setdefault((area, part), []).append(i)
        for (area, part), members in groups.items():
            for c in range(0, len(members), _READ_CHUNK):
                chunk = members[c:c + _READ_CHUNK]
                params: list[Any] = []
                for i in chunk:
                    _, _, key, lo, hi = queries[i]
                    params += (i, key, int(lo) if lo != float("-inf") else -(2**63),
                               int(hi) if hi != float("inf") else 2**63 - 1)
                values = ",".join(["(?, ?, ?, ?)"] * len(chunk))
                for i, score, payload in db.execute(
                        f"WITH q(i, key, lo, hi) AS (VALUES {values}) SELECT q.i, e.score, e.payload FROM q "
                        "JOIN entries e ON e.area = ? AND e.part = ? AND e.key = q.key "
                        "AND e.score BETWEEN q.lo AND q.hi",
                        (*params, area, part)):
                    out[i].append((float(score), payload))
        return out

    def newest_us(self) -> int | None:
        value = self._meta(self._db(), "newest_us")
        return None if value is None else int(value)

    def next_seq(self, n: int) -> int:
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            first = self._meta(db, "seq") or PUSH_SEQ_START
            db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (json.dumps(first + n),))
        return int(first)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
