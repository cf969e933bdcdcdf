"""Quick low -> high pairs without a captioner or an LLM: each high-quality prompt and its subject phrase (the
text before the first comma). For tests, benchmarks and smoke runs of the training stages, on the embedded
corpus or any prompt file `read_prompts` reads; the paper's pairs come from `bp-ray data generate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bp_ray.data import columns as C
from bp_ray.data.corpus import generate_prompts
from bp_ray.data.prompt_rules import HIGH, SplitRules, annotate_prompts
from bp_ray.data.vocab import load_vocab, tag_terms


def subject_pairs_of(prompts: Sequence[object], max_pairs: int | None = None) -> pd.DataFrame:
    """Pair table (pair_id, low, high) from raw prompts; pairs whose low equals high are dropped."""
    notes = annotate_prompts(prompts, SplitRules(), tag_terms(load_vocab()), "strip", 1000)
    high = notes.loc[notes[C.QUALITY] == HIGH, C.PROMPT].drop_duplicates()
    low = high.str.split(",").str[0].str.strip()
    pairs = pd.DataFrame({C.PAIR_ID: [f"c{i}" for i in range(len(high))], C.LOW: low.to_numpy(),
                          C.HIGH: high.to_numpy()})
    return pairs[pairs[C.LOW] != pairs[C.HIGH]].head(max_pairs).reset_index(drop=True)


def subject_pairs(rows: int = 1200, seed: int = 5) -> pd.DataFrame:
    """subject_pairs_of `rows` generated corpus prompts."""
    return subject_pairs_of(generate_prompts(rows, seed=seed))


def write_pairs(pairs: pd.DataFrame, folder: Path) -> Path:
    """A pair table written as the data stage writes pairs (folder/part-00000.parquet); returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(folder / "part-00000.parquet")
    return folder


def write_subject_pairs(folder: Path, rows: int = 1200, seed: int = 5) -> Path:
    """subject_pairs of the embedded corpus written to folder."""
    return write_pairs(subject_pairs(rows, seed), folder)
