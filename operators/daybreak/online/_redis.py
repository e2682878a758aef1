"""The production backend: Redis (the Feast default), through the ``redis`` client.

Layout, under a namespace ``ns`` (default ``daybreak:<feature table>``):

* ``ns:e:<area>:<part>:<key>``: a sorted set of one entity's entries, scored by time (microseconds:
  exact in a double until the year 2255); members are the JSON payloads (unique: each carries
  its sequence number ``q``);
* ``ns:k:<area>``: the set of an area's sorted sets (so an area is dropped without a scan);
* ``ns:areas``: the set of areas; ``ns:current``: the current generation's metadata (JSON);
* ``ns:newest``: a one-member sorted set holding the newest pushed time (``ZADD GT``: an atomic max);
* ``ns:seq``: the counter numbering pushed entries.

A generation is written with pipelines, then made current by one ``SET`` of ``ns:current``; a
push is one ``MULTI``/``EXEC`` transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from daybreak.online._store import PUSH_SEQ_START, Entry, Query

SOCKET_CONNECT_TIMEOUT = 5.0
SOCKET_TIMEOUT = 30.0
_BATCH = 5_000  # commands per pipeline round trip while writing a generation
_READ_CHUNK = 1_000  # sorted sets read by one script call
_READ_SCRIPT = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZRANGEBYSCORE', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i], 'WITHSCORES')
end
return out
"""


def _bound(x: float) -> str:
    """A score bound as Redis reads it (scores are whole microseconds, or infinite)."""
    if x == float("inf"):
        return "+inf"
    if x == float("-inf"):
        return "-inf"
    return str(int(x))


class RedisStore:
    """An OnlineStore on a Redis server (``redis://host:port/db``)."""

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self.url = url
        self.ns = namespace
        # bounded waits: a Redis that hangs must not hold a server's online thread for ever (options
        # in the URL's query, e.g. ?socket_timeout=60, take precedence)
        self.r = redis.Redis.from_url(url, socket_connect_timeout=SOCKET_CONNECT_TIMEOUT,
                                      socket_timeout=SOCKET_TIMEOUT)
        self._script_ok = True
        self._reader: Any = None

    def __repr__(self) -> str:  # the URL may hold a password: never shown
        return f"RedisStore(namespace={self.ns!r})"

    def _e(self, area: str, part: str, key: str) -> str:
        return f"{self.ns}:e:{area}:{part}:{key}"

    def current(self) -> dict[str, Any] | None:
        raw = self.r.get(f"{self.ns}:current")
        return None if raw is None else dict(json.loads(raw))

    def _add(self, pipe: Any, area: str, entries: Iterable[Entry]) -> int:
        n = 0
        pipe.sadd(f"{self.ns}:areas", area)
        for part, key, score, payload in entries:
            name = self._e(area, part, key)
            pipe.zadd(name, {payload: score})
            pipe.sadd(f"{self.ns}:k:{area}", name)
            n += 1
        return n

    def write(self, area: str, entries: Iterable[Entry]) -> None:
        batch: list[Entry] = []
        for e in entries:
            batch.append(e)
            if len(batch) >= _BATCH:
                self._flush(area, batch)
                batch = []
        self._flush(area, batch)

    def _flush(self, area: str, batch: list[Entry]) -> None:
        pipe = self.r.pipeline(transaction=False)
        self._add(pipe, area, batch)
        pipe.execute()

    def push(self, area: str, entries: Sequence[Entry], newest_us: int | None) -> None:
        pipe = self.r.pipeline(transaction=True)  # MULTI ... EXEC: all of the push or nothing
        self._add(pipe, area, entries)
        if newest_us is not None:
            pipe.zadd(f"{self.ns}:newest", {"t": newest_us}, gt=True)
        pipe.execute()

    def switch(self, meta: dict[str, Any]) -> None:
        self.r.set(f"{self.ns}:current", json.dumps(meta))

    def areas(self) -> list[str]:
        return sorted(a.decode() if isinstance(a, bytes) else str(a) for a in self.r.smembers(f"{self.ns}:areas"))

    def drop(self, area: str) -> None:
        index = f"{self.ns}:k:{area}"
        names = list(self.r.smembers(index))
        for i in range(0, len(names), _BATCH):
            self.r.unlink(*names[i:i + _BATCH])
        pipe = self.r.pipeline(transaction=True)
        pipe.unlink(index)
        pipe.srem(f"{self.ns}:areas", area)
        pipe.execute()

    def read(self, queries: Sequence[Query]) -> list[list[tuple[float, str]]]:
        """Every query in one script call per _READ_CHUNK (a pipeline of one command per query
        costs the client about as much per query as the whole script does; where scripts are
        refused, that pipeline)."""
        if self._script_ok:
            try:
                return self._read_script(queries)
            except Exception as e:
                import redis

                if not isinstance(e, redis.ResponseError):
                    raise
                self._script_ok = False  # scripting refused (disabled, say): the pipeline from now on
        pipe = self.r.pipeline(transaction=False)
        for area, part, key, lo, hi in queries:
            pipe.zrangebyscore(self._e(area, part, key), lo, hi, withscores=True)
        return [[(float(s), m.decode()) for m, s in res] for res in pipe.execute()]

    def _read_script(self, queries: Sequence[Query]) -> list[list[tuple[float, str]]]:
        if self._reader is None:
            self._reader = self.r.register_script(_READ_SCRIPT)
        out: list[list[tuple[float, str]]] = []
        for c in range(0, len(queries), _READ_CHUNK):
            chunk = queries[c:c + _READ_CHUNK]
            keys = [self._e(area, part, key) for area, part, key, _, _ in chunk]
            args = [_bound(x) for _, _, _, lo, hi in chunk for x in (lo, hi)]
            for res in self._reader(keys=keys, args=args):
                out.append([(float(res[j + 1]), res[j].decode()) for j in range(0, len(res), 2)])
        return out

    def newest_us(self) -> int | None:
        score = self.r.zscore(f"{self.ns}:newest", "t")
        return None if score is None else int(score)

    def next_seq(self, n: int) -> int:
        end = int(self.r.incrby(f"{self.ns}:seq", n))
        return PUSH_SEQ_START + end - n

    def close(self) -> None:
        self.r.close()
