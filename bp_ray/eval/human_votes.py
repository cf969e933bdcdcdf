"""Human pairwise votes in one SQLite file (`<eval_dir>/human/votes.sqlite`): who rates, which pair each rater was
shown (and on which side each system sat), and the votes. No web code here; `human_app` maps the exceptions below
to HTTP statuses.

Every write is one transaction committed before it returns, with `synchronous=FULL`: votes are few and each costs a
person's attention, so a killed server (or a power cut) must not lose one that the rater saw acknowledged.
"""

from __future__ import annotations

import logging
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from bp_ray.eval.human_pairs import PairItem
from bp_ray.sqlite_wal import WalConnection, WalStore

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Stored in the file's `PRAGMA user_version`; 0 means a new file."""

VOTE_COLUMNS = ["vote_id", "rater", "rater_id", "item_id", "prompt_id", "prompt", "system_a", "system_b",
                "left_system", "right_system", "choice", "created_at", "elapsed_ms"]
"""The columns of `read_votes`, in order."""

CHOICES = ("left", "tie", "right")


def votes_path(eval_dir: Path) -> Path:
    """Where the votes of one evaluation folder live."""
    return Path(eval_dir) / "human" / "votes.sqlite"


def read_votes(db_path: Path) -> pd.DataFrame:
    """All votes, one row per vote ordered by vote_id, with columns VOTE_COLUMNS; an empty frame with those columns
    when the file or its votes table does not exist yet."""
    db_path = Path(db_path)
    empty = pd.DataFrame({name: pd.Series(dtype="int64" if name in ("vote_id", "prompt_id", "elapsed_ms")
                                          else "object") for name in VOTE_COLUMNS})
    if not db_path.exists():
        return empty
    conn = sqlite3.connect(db_path, timeout=10.0)
    try:
        has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'votes'").fetchone()
        if not has_table:
            return empty
        frame = pd.read_sql_query(f"SELECT {', '.join(VOTE_COLUMNS)} FROM votes ORDER BY vote_id", conn)
    finally:
        conn.close()
    return frame if len(frame) else empty


class VoteError(Exception):
    """A request the store refuses; the message names the problem and is safe to show the rater."""


class UnknownRater(VoteError):
    """No such rater (a stale or forged cookie)."""


class UnknownItem(VoteError):
    """The item_id is not a pair of this study."""


class NotShown(VoteError):
    """The pair was not shown to this rater under this show_token, or was skipped."""


class AlreadyVoted(VoteError):
    """A second vote for one pair by one rater (a replayed form)."""


class BadChoice(VoteError):
    """choice is not one of CHOICES."""


@dataclass(frozen=True)
class Rater:
    rater_id: str
    name: str
    csrf: str
    """Per-rater token every form of that rater carries."""
    created_at: str


class Assignment(NamedTuple):
    """The pair a rater sees now and which side each system is on."""

    item: PairItem
    left_system: str
    right_system: str
    show_token: str
    """Names this (rater, pair) showing in image URLs and forms, instead of the systems."""


def _iso_utc(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS raters (rater_id TEXT PRIMARY KEY, name TEXT NOT NULL, csrf TEXT NOT NULL, "
    "created_at TEXT NOT NULL)",
    # One row per (rater, pair) ever served: the row is never re-created, so a pair is shown to a rater once and its
    # sides and token stay fixed across reloads and restarts.
    "CREATE TABLE IF NOT EXISTS shown (rater_id TEXT NOT NULL, item_id TEXT NOT NULL, left_system TEXT NOT NULL, "
    "right_system TEXT NOT NULL, show_token TEXT NOT NULL UNIQUE, shown_at REAL NOT NULL, "
    "state TEXT NOT NULL CHECK (state IN ('shown', 'voted', 'skipped')), PRIMARY KEY (rater_id, item_id))",
    "CREATE TABLE IF NOT EXISTS votes (vote_id INTEGER PRIMARY KEY, rater TEXT NOT NULL, rater_id TEXT NOT NULL, "
    "item_id TEXT NOT NULL, prompt_id INTEGER NOT NULL, prompt TEXT NOT NULL, system_a TEXT NOT NULL, "
    "system_b TEXT NOT NULL, left_system TEXT NOT NULL, right_system TEXT NOT NULL, "
    "choice TEXT NOT NULL CHECK (choice IN ('left', 'tie', 'right')), created_at TEXT NOT NULL, "
    "elapsed_ms INTEGER NOT NULL, UNIQUE (rater_id, item_id))",
    "CREATE INDEX IF NOT EXISTS votes_by_item ON votes (item_id)",
    "CREATE INDEX IF NOT EXISTS shown_by_state ON shown (state, item_id)",
]


class VoteStore(WalStore):
    """The study's raters, assignments and votes in one SQLite file, shared by the threads of one server (and by
    several processes, through WAL and the busy timeout).

    items: the pairs of the study (`load_pairs`); an item_id outside them is UnknownItem.
    assignment_ttl_s: an open assignment (shown, not yet voted or skipped) stops counting toward its pair's
    coverage after this long, so a rater who walks away does not hold pairs back from the others.
    """

    def __init__(self, path: str | Path, items: Sequence[PairItem], *, busy_timeout_s: float = 10.0,
                 assignment_ttl_s: float = 1800.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.items = {item.item_id: item for item in items}
        if len(self.items) != len(items):
            raise ValueError("duplicate item_id among the study's pairs")
        self.assignment_ttl_s = assignment_ttl_s
        self._clock = clock
        self._order = [item.item_id for item in items]
        self._sides = random.SystemRandom()
        self._db = WalConnection(self.path, busy_timeout_s)
        try:
            # FULL: a commit is on disk (WAL fsynced) before record_vote returns, so even a power cut keeps every
            # acknowledged vote; at a few votes a minute the fsync costs nothing.
            self._db.conn.execute("PRAGMA synchronous=FULL")
            self._db.transaction(self._create)
        except BaseException:
            self._db.close()
            raise

    def _create(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has vote schema version {version}, newer than the {SCHEMA_VERSION} "
                               "this bp-ray reads; upgrade bp-ray")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # Raters

    def add_rater(self, name: str) -> tuple[str, str]:
        """A new rater; returns (rater_id, csrf). name: 1 to 80 printable characters after stripping."""
        name = " ".join(str(name).split())
        if not 1 <= len(name) <= 80:
            raise ValueError("name: give 1 to 80 characters")
        # Hex: the vote page carries csrf and show_token, and hex never spells a system name ("sft", "ppo", ...).
        rater_id, csrf = secrets.token_hex(16), secrets.token_hex(16)
        created_at = _iso_utc(self._clock())
        self._db.transaction(lambda conn: conn.execute(
            "INSERT INTO raters (rater_id, name, csrf, created_at) VALUES (?, ?, ?, ?)",
            (rater_id, name, csrf, created_at)))
        logger.info("human eval: new rater %r (%s)", name, rater_id[:6])
        return rater_id, csrf

    def rater(self, rater_id: str) -> Rater | None:
        """The rater, or None for an unknown id."""
        row = self._db.read(lambda conn: conn.execute(
            "SELECT rater_id, name, csrf, created_at FROM raters WHERE rater_id = ?", (str(rater_id),)).fetchone())
        return Rater(*row) if row else None

    # Assignment

    def next_item(self, rater_id: str, rng_seed: int = 0) -> Assignment | None:
        """The pair this rater should see now, or None when they have seen every pair.

        A pair still open for this rater (shown, not voted or skipped) comes back unchanged, so a reload creates no
        new assignment. Otherwise the least covered pair this rater has never seen: fewest votes plus open
        assignments to other raters; ties go by a shuffle seeded with (rng_seed, rater_id), so raters start on
        different pairs. The new assignment gets random sides and a fresh show_token, recorded in one transaction.
        """
        now = self._clock()

        def assign(conn: sqlite3.Connection) -> Assignment | None:
            if not conn.execute("SELECT 1 FROM raters WHERE rater_id = ?", (rater_id,)).fetchone():
                raise UnknownRater("rater: unknown; enter your name again")
            seen = {}
            for item, left, right, token, state in conn.execute(
                    "SELECT item_id, left_system, right_system, show_token, state FROM shown "
                    "WHERE rater_id = ? ORDER BY shown_at", (rater_id,)):
                seen[item] = state
                if state == "shown" and item in self.items:
                    return Assignment(self.items[item], left, right, token)
            fresh = [item for item in self._order if item not in seen]
            if not fresh:
                return None
            coverage = dict.fromkeys(fresh, 0)
            for item, count in conn.execute("SELECT item_id, COUNT(*) FROM votes GROUP BY item_id"):
                if item in coverage:
                    coverage[item] += count
            for item, count in conn.execute(
                    "SELECT item_id, COUNT(*) FROM shown WHERE state = 'shown' AND rater_id != ? AND shown_at >= ? "
                    "GROUP BY item_id", (rater_id, now - self.assignment_ttl_s)):
                if item in coverage:
                    coverage[item] += count
            shuffled = list(self._order)
            random.Random(f"{rng_seed}/{rater_id}").shuffle(shuffled)
            rank = {item: i for i, item in enumerate(shuffled)}
            chosen = self.items[min(fresh, key=lambda item: (coverage[item], rank[item]))]
            left, right = chosen.system_a, chosen.system_b
            if self._sides.random() < 0.5:
                left, right = right, left
            token = secrets.token_hex(16)
            conn.execute("INSERT INTO shown (rater_id, item_id, left_system, right_system, show_token, shown_at, "
                         "state) VALUES (?, ?, ?, ?, ?, ?, 'shown')", (rater_id, chosen.item_id, left, right, token,
                                                                         now))
            return Assignment(chosen, left, right, token)

        return self._db.transaction(assign)

    def shown_by_token(self, show_token: str) -> tuple[str, str, str, str, str] | None:
        """(rater_id, item_id, left_system, right_system, state) of one served pair, or None."""
        return self._db.read(lambda conn: conn.execute(
            "SELECT rater_id, item_id, left_system, right_system, state FROM shown WHERE show_token = ?",
            (str(show_token),)).fetchone())

    # Votes

    def _open_row(self, conn: sqlite3.Connection, rater_id: str, item_id: str,
                  show_token: str) -> tuple[str, str, float, str]:
        """(left_system, right_system, shown_at, state) of this rater's pair, after the checks every answer needs."""
        if item_id not in self.items:
            raise UnknownItem("item_id: unknown pair")
        if not conn.execute("SELECT 1 FROM raters WHERE rater_id = ?", (rater_id,)).fetchone():
            raise UnknownRater("rater: unknown; enter your name again")
        row = conn.execute("SELECT left_system, right_system, shown_at, state, show_token FROM shown "
                           "WHERE rater_id = ? AND item_id = ?", (rater_id, item_id)).fetchone()
        # compare_digest: the token is the only proof the page was served to this rater.
        if row is None or not secrets.compare_digest(str(row[4]), str(show_token)):
            raise NotShown("show_token: this pair was not shown to you")
        return row[0], row[1], row[2], row[3]

    def record_vote(self, rater_id: str, item_id: str, show_token: str, choice: str,
                    now: float | None = None) -> int:
        """Stores one vote and closes the assignment, in one transaction committed before returning; returns the
        vote_id. elapsed_ms: from when the pair was first shown to `now` (unix s; default the clock)."""
        if choice not in CHOICES:
            raise BadChoice(f"choice: must be one of {', '.join(CHOICES)}")
        now = self._clock() if now is None else float(now)

        def vote(conn: sqlite3.Connection) -> int:
            left, right, shown_at, state = self._open_row(conn, rater_id, item_id, show_token)
            if state == "voted":
                raise AlreadyVoted("vote already recorded for this pair")
            if state == "skipped":
                raise NotShown("show_token: this pair was skipped")
            name = conn.execute("SELECT name FROM raters WHERE rater_id = ?", (rater_id,)).fetchone()[0]
            item = self.items[item_id]
            cursor = conn.execute(
                "INSERT INTO votes (rater, rater_id, item_id, prompt_id, prompt, system_a, system_b, left_system, "
                "right_system, choice, created_at, elapsed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (f"{name}#{rater_id[:6]}", rater_id, item_id, item.prompt_id, item.prompt, item.system_a,
                 item.system_b, left, right, choice, _iso_utc(now), max(0, round((now - shown_at) * 1000))))
            conn.execute("UPDATE shown SET state = 'voted' WHERE rater_id = ? AND item_id = ?", (rater_id, item_id))
            return int(cursor.lastrowid)

        try:
            return self._db.transaction(vote)
        except sqlite3.IntegrityError as err:  # UNIQUE(rater_id, item_id): only reachable via another writer
            raise AlreadyVoted("vote already recorded for this pair") from err

    def skip(self, rater_id: str, item_id: str, show_token: str) -> None:
        """Closes the assignment without a vote; the pair is never served to this rater again. Skipping twice is
        a no-op; skipping a voted pair is AlreadyVoted."""

        def close(conn: sqlite3.Connection) -> None:
            state = self._open_row(conn, rater_id, item_id, show_token)[3]
            if state == "voted":
                raise AlreadyVoted("vote already recorded for this pair")
            conn.execute("UPDATE shown SET state = 'skipped' WHERE rater_id = ? AND item_id = ?", (rater_id, item_id))

        self._db.transaction(close)

    def progress(self, rater_id: str) -> tuple[int, int]:
        """(pairs this rater voted on or skipped, pairs in the study)."""
        rows = self._db.read(lambda conn: conn.execute(
            "SELECT item_id FROM shown WHERE rater_id = ? AND state != 'shown'", (rater_id,)).fetchall())
        return sum(1 for (item,) in rows if item in self.items), len(self.items)
