"""The candidates the beautifier has returned, by id, in one SQLite file: a later request names one (`edit_of`) to
score the user's edit of it against the original ("your edit scores X vs Y").

Why SQLite: the state is a plain file a person can open (`sqlite3 candidates.sqlite 'SELECT * FROM candidates'`),
and every ingress replica on a node shares it without another service to run: WAL lets readers run beside the one
writer and the busy timeout queues writers. Replicas on several nodes see one another's candidates only when the
path is on storage they all mount; otherwise an `edit_of` that lands on another node finds nothing (`get` is None).
No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bp_ray.sqlite_wal import WalConnection, WalStore

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Stored in the file's `PRAGMA user_version`; 0 means a new file."""

_ID_PREFIX = "cand_"
_ID_RE = re.compile(r"cand_[0-9a-f]{24}")


@dataclass(frozen=True)
class Candidate:
    """One returned rewrite, as stored."""

    id: str
    prompt: str
    """The user's prompt (their intent)."""
    text: str
    """The rewrite shown to the user."""
    model: str
    """Served model name / checkpoint id."""
    scores: dict[str, float]
    """e.g. {"reward": .., "pickscore": .., "aesthetic": ..}; empty when the response was not ranked."""
    edit_of: str | None
    """The candidate this one is a user edit of."""
    created: float
    """Unix time of the last add of this id."""


def candidate_id(model: str, prompt: str, text: str) -> str:
    """Stable id: "cand_" + the first 24 hex chars (96 bits) of sha256(json.dumps([model, prompt, text]))."""
    # A JSON list is an unambiguous join (no texts can make two different triples serialise alike), and its default
    # ASCII escaping encodes any str, lone surrogates included, so the id never fails.
    digest = hashlib.sha256(json.dumps([model, prompt, text]).encode("ascii")).hexdigest()
    return _ID_PREFIX + digest[:24]


def is_candidate_id(value: object) -> bool:
    """True when value has the form of an id from `candidate_id` (whether or not it is stored)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _checked_scores(scores: Mapping[str, float] | None) -> dict[str, float]:
    """str -> finite float. NaN/inf are refused: strict JSON readers of the file (jq, sqlite's json_extract) and the
    "X vs Y" comparison would both choke on them."""
    checked = {}
    for name, value in (scores or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"score names are str, got {type(name).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"score {name!r} is {number}; only finite scores are stored")
        checked[name] = number
    return checked


class CandidateStore(WalStore):
    """Candidates by id in the table `candidates` of one SQLite file; one connection per object.

    Growth is bounded: every `prune_every` new rows (per object) the oldest rows beyond `max_rows`, by `created` and
    then insertion order, are deleted, so the file holds at most about max_rows + prune_every rows per writer
    between prunes. `created` is refreshed when an id is added again, so candidates still being shown stay longest.
    """

    def __init__(self, path: str | Path, max_rows: int = 100_000, *, busy_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        """clock: the unix-time source for `created` (tests pass a fake one)."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.busy_timeout_s = busy_timeout_s
        # The prune walks max_rows index entries, so it runs every ~1/16 of max_rows new rows (capped at 256 so the
        # overshoot stays small), not on every insert.
        self.prune_every = max(1, min(256, max_rows // 16))
        self._clock = clock
        # Starts due: the first write after opening trims a file left over from a larger max_rows.
        self._new_since_prune = self.prune_every
        self._db = WalConnection(self.path, busy_timeout_s)
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has candidate store schema version {version}, newer than the "
                                   f"{SCHEMA_VERSION} this bp-ray reads; upgrade bp-ray or point it at another file")
            if version == SCHEMA_VERSION:
                return
            # scores: a JSON object; created: unix time of the last add, indexed for pruning oldest first.
            conn.execute("CREATE TABLE IF NOT EXISTS candidates (id TEXT PRIMARY KEY, prompt TEXT NOT NULL, "
                         "text TEXT NOT NULL, model TEXT NOT NULL, scores TEXT NOT NULL, edit_of TEXT, "
                         "created REAL NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS candidates_by_created ON candidates (created)")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        self._db.transaction(create)

    def add_many(self, model: str, prompt: str, items: Sequence[tuple[str, Mapping[str, float]]],
                 edit_of: str | None = None) -> list[Candidate]:
        """Stores one response's candidates, items = (text, scores), in one transaction; returns them as stored, in
        order. An id already stored keeps its row (prompt, text, model and first edit_of); non-empty new scores are
        merged over its old ones (new keys win) and `created` is refreshed."""
        for name, value in (("model", model), ("prompt", prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be str, got {type(value).__name__}")
        if edit_of is not None and not isinstance(edit_of, str):
            raise TypeError(f"edit_of must be str or None, got {type(edit_of).__name__}")
        # Validate everything before the transaction, so a bad item stores none of the response.
        rows = []
        for text, scores in items:
            if not isinstance(text, str):
                raise TypeError(f"candidate text must be str, got {type(text).__name__}")
            rows.append((candidate_id(model, prompt, text), text, _checked_scores(scores)))
        if not rows:
            return []
        created = float(self._clock())

        def upsert(conn: sqlite3.Connection) -> tuple[dict[str, Candidate], int, bool]:
            stored: dict[str, Candidate] = {}
            new_rows = 0
            for cid, text, scores in rows:
                # An "edit" that leaves the text unchanged is the original itself, never an edit of itself.
                own_edit_of = None if edit_of == cid else edit_of
                old = stored.get(cid) or self._select(conn, cid)
                if old is None:
                    conn.execute("INSERT INTO candidates (id, prompt, text, model, scores, edit_of, created) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (cid, prompt, text, model, json.dumps(scores), own_edit_of, created))
                    stored[cid] = Candidate(cid, prompt, text, model, scores, own_edit_of, created)
                    new_rows += 1
                    continue
                merged = {**old.scores, **scores}
                kept_edit_of = old.edit_of if old.edit_of is not None else own_edit_of
                # UPDATE, not INSERT OR REPLACE: the row (and its rowid, the prune's tie-break) stays.
                conn.execute("UPDATE candidates SET scores = ?, edit_of = ?, created = ? WHERE id = ?",
                             (json.dumps(merged), kept_edit_of, created, cid))
                stored[cid] = Candidate(cid, old.prompt, old.text, old.model, merged, kept_edit_of, created)
            # Only new rows grow the table, so only they bring the next prune closer.
            prune = new_rows > 0 and self._new_since_prune + new_rows >= self.prune_every
            if prune:
                self._prune(conn)
            return stored, new_rows, prune

        # The lock (reentrant) spans the commit and the count, so threads neither race on the count nor count an
        # attempt that was rolled back and retried.
        with self._db.lock:
            stored, new_rows, pruned = self._db.transaction(upsert)
            self._new_since_prune = 0 if pruned else self._new_since_prune + new_rows
        # A text repeated within items appears once per occurrence, each time in its final stored state.
        return [stored[cid] for cid, _, _ in rows]

    def add(self, model: str, prompt: str, text: str, scores: Mapping[str, float] | None = None,
            edit_of: str | None = None) -> Candidate:
        """One candidate; see `add_many`."""
        return self.add_many(model, prompt, [(text, scores or {})], edit_of=edit_of)[0]

    def _prune(self, conn: sqlite3.Connection) -> None:
        # Walks the created index newest first and deletes whatever lies beyond the first max_rows entries.
        deleted = conn.execute("DELETE FROM candidates WHERE rowid IN (SELECT rowid FROM candidates "
                               "ORDER BY created DESC, rowid DESC LIMIT -1 OFFSET ?)", (self.max_rows,)).rowcount
        if deleted:
            logger.debug("%s: pruned %d candidates beyond max_rows=%d", self.path, deleted, self.max_rows)

    @staticmethod
    def _select(conn: sqlite3.Connection, cid: str) -> Candidate | None:
        row = conn.execute("SELECT id, prompt, text, model, scores, edit_of, created FROM candidates WHERE id = ?",
                           (cid,)).fetchone()
        if row is None:
            return None
        cid, prompt, text, model, scores, edit_of, created = row
        return Candidate(cid, prompt, text, model, json.loads(scores), edit_of, created)

    def get(self, candidate_id: Any) -> Candidate | None:
        """The stored candidate, or None for an unknown id or anything that is not an id (never raises on it)."""
        # Checking the form first keeps arbitrary user strings (huge, SQL-looking, unencodable) away from SQLite.
        if not is_candidate_id(candidate_id):
            return None
        return self._db.read(lambda conn: self._select(conn, candidate_id))
