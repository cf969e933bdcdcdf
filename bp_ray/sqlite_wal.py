"""One SQLite file that several processes use at once (the reward cache, the endpoint's candidate store): WAL so
that readers run beside the one writer, SQLite's busy timeout so that writers queue instead of failing, and every
write one transaction retried as a whole, so a killed writer leaves all or none of it behind."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def _is_busy(err: sqlite3.OperationalError) -> bool:
    message = str(err).lower()
    return "locked" in message or "busy" in message


class WalConnection:
    """One connection to `path` in WAL mode, shared by the threads of one object under a reentrant lock (Serve and
    threaded actors call from several threads)."""

    def __init__(self, path: str | Path, timeout_s: float):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # timeout= is SQLite's busy timeout; isolation_level=None: transactions are begun and ended explicitly here.
        self.conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        try:
            # The journal mode is stored in the file; switching takes a brief exclusive lock without waiting on the
            # busy handler, and a concurrent creator may hold it: hence the retry.
            mode = self.retry(lambda: self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                logger.warning("%s: journal mode is %s, not wal; readers will wait for writers", self.path, mode)
            # NORMAL in WAL mode survives a killed process (only power loss can drop the last commits), at far
            # less fsync.
            self.conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            self.conn.close()
            raise

    def retry(self, op: Callable[[], _T]) -> _T:
        """op(), again after a short randomised backoff while SQLite says busy/locked, until timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        delay_s = 0.005
        while True:
            try:
                return op()
            except sqlite3.OperationalError as err:
                if not _is_busy(err) or time.monotonic() + delay_s > deadline:
                    raise
                logger.debug("%s busy (%s); retrying in %.3f s", self.path, err, delay_s)
                time.sleep(delay_s * (0.5 + random.random()))
                delay_s = min(2 * delay_s, 0.25)

    def read(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """op(conn) in autocommit mode: one statement is its own snapshot, which in WAL mode never waits for
        writers."""
        with self.lock:
            return self.retry(lambda: op(self.conn))

    def transaction(self, body: Callable[[sqlite3.Connection], _T], begin: str = "BEGIN IMMEDIATE") -> _T:
        """body(conn) inside one transaction, retried as a whole. IMMEDIATE takes the write lock up front, so the
        busy timeout applies (a read that later upgrades to a write can fail at once with SQLITE_BUSY in WAL
        mode); "BEGIN" gives a read snapshot across several statements."""

        def attempt() -> _T:
            self.conn.execute(begin)
            try:
                result = body(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.rollback()
                raise
            return result

        with self.lock:
            return self.retry(attempt)

    def close(self) -> None:
        """Safe to call twice."""
        with self.lock:
            self.conn.close()


class WalStore:
    """Base of the objects that keep their WalConnection in `self._db`: close() and the context manager."""

    _db: WalConnection

    def close(self) -> None:
        """Closes the connection; safe to call twice."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
