"""Committed work of the pair pipeline: one Parquet file per processed batch, written atomically.

A batch file holds every candidate pair of its input rows (kept or dropped, with the reason), so the set of
input rows already done is the set of row ids in committed files; a rerun skips them. A file appears whole or
not at all (write to a temporary name, then rename), so a killed run leaves no half batch behind, and a
retried batch rewrites the same name with the same content.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bp_ray.data import columns as C

BATCH_GLOB = "batch-*.parquet"
STORED_COLUMNS = (*C.PAIR_COLUMNS, C.GEN_ERROR, C.DROP_REASON)


def batch_name(row_ids: list[str]) -> str:
    """Deterministic file name of the batch made of these input rows."""
    digest = hashlib.sha1("\x1f".join(sorted(row_ids)).encode()).hexdigest()[:24]
    return f"batch-{digest}.parquet"


def commit_batch(work_dir: Path, pairs: pd.DataFrame, row_ids: list[str]) -> Path:
    """Write one batch's candidates atomically; returns the committed path."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / batch_name(row_ids)
    temporary = work_dir / f".tmp-{uuid.uuid4().hex}.parquet"
    table = pa.Table.from_pandas(pairs.loc[:, list(STORED_COLUMNS)], preserve_index=False)
    pq.write_table(table, temporary)
    os.replace(temporary, target)
    return target


def committed_files(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob(BATCH_GLOB)) if work_dir.exists() else []


def committed_row_ids(work_dir: Path) -> set[str]:
    """Input rows whose batch is committed."""
    ids: set[str] = set()
    for path in committed_files(work_dir):
        ids.update(pq.read_table(path, columns=[C.ROW_ID]).column(0).to_pylist())
    return ids


def read_committed(work_dir: Path) -> pd.DataFrame:
    files = committed_files(work_dir)
    if not files:
        return pd.DataFrame(columns=list(STORED_COLUMNS))
    return pd.concat([pq.read_table(path).to_pandas() for path in files], ignore_index=True)


def clear_partial_writes(work_dir: Path) -> int:
    """Remove temporaries a killed run left behind; returns how many."""
    leftovers = list(work_dir.glob(".tmp-*.parquet")) if work_dir.exists() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def write_shards(pairs: pd.DataFrame, out_dir: Path, shard_rows: int) -> list[Path]:
    """Replace out_dir/part-*.parquet with `pairs` in files of at most shard_rows rows."""
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    paths = []
    for index, start in enumerate(range(0, max(len(pairs), 1), shard_rows)):
        path = out_dir / f"part-{index:05d}.parquet"
        chunk = pairs.iloc[start:start + shard_rows].loc[:, list(C.PAIR_COLUMNS)]
        temporary = out_dir / f".tmp-{path.name}"
        pq.write_table(pa.Table.from_pandas(chunk, preserve_index=False), temporary)
        os.replace(temporary, path)
        paths.append(path)
    return paths
