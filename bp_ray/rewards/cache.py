"""Persistent, content-addressed cache of per-image scores (SQLite, WAL), shared by many worker processes.

An entry's key hashes everything its scores depend on (models and revisions, render settings, prompt, seed and the
texts it was scored against), so a hit is always safe to reuse and any change of model or setting is a clean miss.
No Ray or torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bp_ray.sqlite_wal import WalConnection, WalStore

logger = logging.getLogger(__name__)

SCORE_NAMES = ("pickscore", "aesthetic", "relevance")
SCHEMA_VERSION = 1
KEY_VERSION = 1
"""Part of every entry key: bump it when scoring code changes what a score means, so old entries stop matching."""

# SQLite builds before 3.32 allow 999 bound variables per statement; stay well under it.
_CHUNK = 500


@dataclass(frozen=True)
class RenderKey:
    """Everything an image's scores depend on except the prompt texts and the seed."""

    diffusion_model: str
    """Model id + revision/fingerprint, e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5@main"."""
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    # Scorer ids + revisions/fingerprints: a new checkpoint must not reuse the old one's scores.
    pickscore_model: str
    aesthetic_model: str
    relevance_model: str

    def digest(self) -> str:
        """Stable sha256 hex of the canonical JSON of all fields (sorted keys)."""
        fields = asdict(self)
        # Canonical number types: guidance 7 and 7.0 (or numpy ints from a config) must give the same key.
        for name in ("height", "width", "num_inference_steps"):
            fields[name] = int(fields[name])
        fields["guidance_scale"] = float(fields["guidance_scale"])
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def entry_key(render_key: RenderKey, prompt: str, seed: int, pickscore_text: str, intent: str) -> str:
    """sha256 hex of (key version, render key digest, prompt, seed, PickScore text, intent = CLIP relevance text)."""
    # A JSON list is an unambiguous join: no choice of texts can make two different tuples serialise alike.
    parts = [KEY_VERSION, render_key.digest(), prompt, int(seed), pickscore_text, intent]
    text = json.dumps(parts, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RewardCache(WalStore):
    """(pickscore, aesthetic, relevance) per entry key in one SQLite file; one connection per object.

    Several processes may open the same file at once: WAL lets readers run beside the one writer, the busy timeout
    makes writers queue instead of failing, and every write is one transaction, so a killed writer leaves either
    all or none of a put_many behind.
    """

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._hits = self._misses = self._writes = 0
        self._db = WalConnection(self.path, timeout_s)
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        def create(conn: sqlite3.Connection) -> str:
            conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, pickscore REAL NOT NULL, "
                         "aesthetic REAL NOT NULL, relevance REAL NOT NULL, created REAL NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            return conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0]

        version = self._db.transaction(create)
        if version != str(SCHEMA_VERSION):
            raise RuntimeError(f"{self.path} has cache schema version {version}, this code reads {SCHEMA_VERSION}")

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[float, float, float]]:
        """The hits among keys: key -> (pickscore, aesthetic, relevance). Stats count each distinct key once."""
        unique = list(dict.fromkeys(keys))

        def read(conn: sqlite3.Connection) -> dict[str, tuple[float, float, float]]:
            found = {}
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start:start + _CHUNK]
                rows = conn.execute(f"SELECT key, pickscore, aesthetic, relevance FROM scores "
                                    f"WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update((key, (p, a, r)) for key, p, a, r in rows)
            return found

        # One read transaction: a consistent snapshot across chunks, and it never blocks or waits for writers.
        found = self._db.transaction(read, begin="BEGIN") if unique else {}
        self._hits += len(found)
        self._misses += len(unique) - len(found)
        return found

    def put_many(self, entries: Mapping[str, Sequence[float]]) -> None:
        """Stores all entries (key -> 3 finite scores, replacing old values) in one transaction, or none of them."""
        created = time.time()
        rows = []
        # Validate everything before the transaction: a NaN must never reach the file, nor half of a call.
        for key, scores in entries.items():
            if not isinstance(key, str):
                raise TypeError(f"cache keys are str, got {type(key).__name__}")
            values = tuple(float(v) for v in scores)
            if len(values) != len(SCORE_NAMES):
                raise ValueError(f"{key}: expected {len(SCORE_NAMES)} scores {SCORE_NAMES}, got {len(values)}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{key}: non-finite scores {values} are never cached")
            rows.append((key, *values, created))
        if not rows:
            return
        self._db.transaction(lambda conn: conn.executemany(
            "INSERT OR REPLACE INTO scores (key, pickscore, aesthetic, relevance, created) VALUES (?, ?, ?, ?, ?)",
            rows))
        self._writes += len(rows)

    def __len__(self) -> int:
        return self._db.read(lambda conn: conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def stats(self) -> dict[str, int]:
        """Hits, misses and entries written through this object."""
        return {"hits": self._hits, "misses": self._misses, "writes": self._writes}

    def integrity_ok(self) -> bool:
        """True when SQLite's full integrity check passes."""
        rows = self._db.read(lambda conn: conn.execute("PRAGMA integrity_check").fetchall())
        return [tuple(r) for r in rows] == [("ok",)]
