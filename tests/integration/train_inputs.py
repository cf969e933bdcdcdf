"""Small training inputs built in the tests: pairs from the embedded corpus, labels with a learnable signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bp_ray.data import columns as C
from bp_ray.data.prompt_rules import prompt_features
from bp_ray.data.subject_pairs import write_subject_pairs
from bp_ray.data.vocab import load_vocab, tag_terms


def corpus_pairs(folder: Path, rows: int = 1200) -> Path:
    return write_subject_pairs(folder, rows)


def mean_tags(texts: list[str]) -> float:
    terms = tag_terms(load_vocab())
    return float(np.mean([prompt_features(t, t, terms).tags for t in texts]))


def tagged_share(texts: list[str]) -> float:
    """Share of the texts that hold at least one style / quality tag of the vocabulary."""
    terms = tag_terms(load_vocab())
    return float(np.mean([prompt_features(t, t, terms).tags > 0 for t in texts]))


def synthetic_labels(pairs_dir: Path, folder: Path, seed: int = 0) -> Path:
    """Label files shaped like `bp-ray rewards label` output, whose scores follow the text: PickScore rises with
    the number of style tags, the aesthetic score with the number of words, plus a little noise."""
    pairs = pd.read_parquet(pairs_dir / "part-00000.parquet")
    terms = tag_terms(load_vocab())
    rows = pd.concat([pd.DataFrame({C.PAIR_ID: pairs[C.PAIR_ID], "role": role, C.PROMPT: pairs[column],
                                    "intent": pairs[C.LOW]}) for role, column in (("low", C.LOW), ("high", C.HIGH))],
                     ignore_index=True)
    rng = np.random.default_rng(seed)
    tags = np.array([prompt_features(p, p, terms).tags for p in rows[C.PROMPT]], dtype=float)
    words = rows[C.PROMPT].str.split().str.len().to_numpy(dtype=float)
    rows["pickscore_mean"] = 19.0 + 0.5 * np.minimum(tags, 6) + rng.normal(0, 0.1, len(rows))
    rows["aesthetic_mean"] = 4.5 + 0.08 * np.minimum(words, 30) + rng.normal(0, 0.05, len(rows))
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(folder / "part-00000.parquet")
    return folder


def model_weights(stage_dir: Path) -> dict:
    """The exported model of a training stage's output folder: {tensor name: tensor}."""
    from safetensors.torch import load_file

    return load_file(stage_dir / "model" / "model.safetensors")
