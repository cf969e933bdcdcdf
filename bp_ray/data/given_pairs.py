"""Pair source (v), `given`: real low -> high pairs read from files (DrawBench's prompts with their GPT-4
"upsampled" rewrites, say). A stable share of each file is used; the rest stays unseen, so that an evaluation on
the same prompts can leave every trained one out. Pure pandas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bp_ray.data import columns as C
from bp_ray.data.pairs import in_share, pair_id
from bp_ray.data.prompt_io import read_prompts
from bp_ray.data.prompt_rules import dedup_key

GIVEN = "given"


def in_used_share(low: str, fraction: float) -> bool:
    """Whether a given pair is used for training: decided by the low prompt alone (its near-duplicate key), so a
    prompt is on the same side in every file, run and order."""
    return in_share(dedup_key(low), fraction)


def read_given_pairs(paths: Sequence[str | Path], high_field: str, fraction: float,
                     first_order: int = 0) -> tuple[pd.DataFrame, dict[str, dict]]:
    """(candidate pairs with PAIR_COLUMNS + gen_error, per-file counts). The low prompt is each row's `prompt`,
    the high one its `high_field`; rows without a usable high prompt are skipped and counted. Row order continues
    from `first_order`, so given pairs rank after the source rows when duplicates are resolved."""
    frames, counts = [], {}
    for path in paths:
        table, report = read_prompts(path)
        if high_field not in table:
            raise ValueError(f"{path}: no {high_field!r} field to take the high prompt from "
                             f"(data.pair_high_field; fields: {', '.join(map(str, table.columns))})")
        high = table[high_field].map(lambda v: v.strip() if isinstance(v, str) else "")
        low = table[C.PROMPT].str.strip()
        report.skip("missing_low", int((low == "").sum()))
        report.skip("missing_high", int(((low != "") & (high == "")).sum()))
        table = table.assign(**{C.PROMPT: low, C.HIGH: high})[(low != "") & (high != "")]
        used = table[C.PROMPT].map(lambda p: in_used_share(p, fraction)).to_numpy(dtype=bool)
        counts[str(path)] = {"rows_read": report.rows_read, "rows_skipped": report.rows_skipped,
                             "used": int(used.sum()), "held_back": int((~used).sum())}
        table = table[used]
        frames.append(pd.DataFrame({
            C.PAIR_ID: [pair_id(r, GIVEN) for r in table[C.ROW_ID]],
            C.PAIR_SOURCE: GIVEN,
            C.LOW: table[C.PROMPT].to_numpy(),
            C.HIGH: table[C.HIGH].to_numpy(),
            C.ROW_ID: table[C.ROW_ID].to_numpy(),
            C.SOURCE: table[C.SOURCE].to_numpy(),
            C.IMAGE_REF: "",
            C.AESTHETIC: np.float32(np.nan),
            C.ROW_ORDER: first_order + sum(len(f) for f in frames) + np.arange(len(table)),
            C.GEN_ERROR: "",
        }))
    if not frames:
        return pd.DataFrame(columns=[*C.PAIR_COLUMNS, C.GEN_ERROR]), counts
    pairs = pd.concat(frames, ignore_index=True)
    if not pairs[C.PAIR_ID].is_unique:  # row ids name the file stem: two files of one name would collide
        raise ValueError(f"data.pair_files give rows the same ids; rename one of: {', '.join(map(str, paths))}")
    return pairs, counts
