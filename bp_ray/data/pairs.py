"""Low -> high pair candidates from processed rows, and the pair-level cleaning rules. Pure pandas."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from bp_ray.config import DataConfig
from bp_ray.data import columns as C
from bp_ray.data.content import pair_overlap, split_subject
from bp_ray.data.prompt_rules import content_flag, dedup_key, is_meta_answer, within_bounds
from bp_ray.data.tag_strip import strip_tags
from bp_ray.data.vocab import Vocab, load_vocab, tag_terms

SOURCES = ("caption", "summary", "expansion", "stripped", "given")  # given: bp_ray.data.given_pairs
LLM_SOURCES = ("summary", "expansion")
PAIR_DROP_REASONS = ("generation_failed", "meta_answer", "nsfw_keyword", "political_keyword", "length",
                     "same_low_high", "off_topic", "aesthetic", "duplicate")


def pair_id(row_id: str, source: str) -> str:
    """Deterministic id of the pair one source makes from one input row."""
    return hashlib.sha1(f"{row_id}\x1f{source}".encode()).hexdigest()[:16]


def in_share(key: str, fraction: float) -> bool:
    """A stable pseudo-random choice of a `fraction` of keys: the same key is always on the same side."""
    return fraction >= 1 or int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def llm_rows(row_ids, fraction: float) -> np.ndarray:
    """Which rows the LLM rewrites (data.llm_fraction): a stable choice by row id, the same in every batch."""
    return np.array([in_share(f"llm\x1f{r}", fraction) for r in row_ids], dtype=bool)


def build_candidates(rows: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Every pair the enabled sources propose for these rows (PAIR_COLUMNS + gen_error), before cleaning.

    caption: (BLIP caption, original high prompt); summary: (LLM summary, high); expansion: (low, LLM expansion);
    stripped: (high without its vocabulary tags and artist credits, high).
    """
    # A stage the graph skipped (no images to caption, say) added no column: nothing was generated there.
    missing = {column: "" for column in (C.CAPTION, C.SUMMARY, C.EXPANSION, C.GEN_ERROR) if column not in rows}
    rows = rows.assign(**missing)
    is_high, is_low = rows[C.QUALITY] == "high", rows[C.QUALITY] == "low"
    parts = []
    if cfg.use_captions:
        parts.append(_candidates(rows[is_high & (rows[C.IMAGE_REF] != "")], "caption", C.CAPTION, C.PROMPT))
    by_llm = llm_rows(rows[C.ROW_ID].tolist(), cfg.llm_fraction)
    if cfg.use_summaries:
        parts.append(_candidates(rows[is_high & by_llm], "summary", C.SUMMARY, C.PROMPT))
    if cfg.use_expansions:
        parts.append(_candidates(rows[is_low & by_llm], "expansion", C.PROMPT, C.EXPANSION))
    if cfg.use_stripped:
        terms = tag_terms(load_vocab())
        high = rows[is_high]
        high = high.assign(**{C.STRIPPED: [strip_tags(p, terms, cfg.low_max_segments) for p in high[C.PROMPT]]})
        parts.append(_candidates(high, "stripped", C.STRIPPED, C.PROMPT))
    if not parts:
        return pd.DataFrame(columns=[*C.PAIR_COLUMNS, C.GEN_ERROR])
    return pd.concat(parts, ignore_index=True)


def _candidates(rows: pd.DataFrame, source: str, low_column: str, high_column: str) -> pd.DataFrame:
    aesthetic = rows[C.AESTHETIC] if C.AESTHETIC in rows else pd.Series(np.nan, index=rows.index)
    # Only summaries and expansions come from the LLM, so an LLM error on the same row must not drop the others.
    gen_error = rows.get(C.GEN_ERROR, pd.Series("", index=rows.index)) if source in LLM_SOURCES else ""
    return pd.DataFrame({
        C.PAIR_ID: [pair_id(r, source) for r in rows[C.ROW_ID]],
        C.PAIR_SOURCE: source,
        C.LOW: rows[low_column].astype(str).to_numpy(),
        C.HIGH: rows[high_column].astype(str).to_numpy(),
        C.ROW_ID: rows[C.ROW_ID].to_numpy(),
        C.SOURCE: rows[C.SOURCE].to_numpy(),
        C.IMAGE_REF: rows[C.IMAGE_REF].to_numpy() if source != "expansion" else "",
        C.AESTHETIC: aesthetic.to_numpy(dtype=np.float32) if source != "expansion" else np.nan,
        C.ROW_ORDER: rows[C.ROW_ORDER].to_numpy(),
        C.GEN_ERROR: gen_error if isinstance(gen_error, str) else gen_error.to_numpy(),
    })


def pair_drop_reason(low: str, high: str, aesthetic: float, gen_error: str, cfg: DataConfig,
                     vocab: Vocab, generated: str = "") -> str:
    """"" for a clean pair, else the first rule it breaks (in PAIR_DROP_REASONS order). `generated`: the side an
    LLM wrote (a summary's low, an expansion's high), "" when none did."""
    if gen_error or not low.strip() or not high.strip():
        return "generation_failed"
    if generated and is_meta_answer(generated):
        return "meta_answer"
    if cfg.keyword_filter:
        # Only generated text can bring new terms in; the input rows were filtered already.
        flag = content_flag(low, vocab) or content_flag(high, vocab)
        if flag:
            return flag
    if not within_bounds(low, cfg.pair_low_words) or not within_bounds(high, cfg.pair_high_words):
        return "length"
    if dedup_key(low) == dedup_key(high):
        return "same_low_high"
    if cfg.pair_min_low_in_high is not None or cfg.pair_min_subject_in_low is not None:
        low_in_high, subject_in_low = pair_overlap(low, high)
        if low_in_high < (cfg.pair_min_low_in_high or 0.0) or subject_in_low < (cfg.pair_min_subject_in_low or 0.0):
            return "off_topic"
    if cfg.aesthetic_threshold is not None and not np.isnan(aesthetic) and aesthetic < cfg.aesthetic_threshold:
        return "aesthetic"
    return ""


def with_low_subject(low: str, high: str) -> str:
    """The high prompt with its subject (first comma segment) replaced by the low prompt: the user's own words,
    then the high prompt's additions."""
    return ", ".join([low.strip().rstrip(".,"), *split_subject(high)[1]])


def clean_candidates(candidates: pd.DataFrame, cfg: DataConfig, vocab: Vocab) -> pd.DataFrame:
    """Candidates with a `drop_reason` column ("" = kept); duplicates are found later, across all batches.
    With data.high_subject_from_low, kept pairs' high prompts start with their low prompt (after the filters,
    which judge the original high prompt)."""
    written = {"summary": C.LOW, "expansion": C.HIGH}  # the side of each LLM source the model wrote
    generated = [row[written[source]] if source in written else "" for source, row in zip(
        candidates[C.PAIR_SOURCE], candidates[[C.LOW, C.HIGH]].to_dict("records"), strict=True)]
    reasons = [pair_drop_reason(low, high, float(aes), str(err), cfg, vocab, text)
               for low, high, aes, err, text in zip(candidates[C.LOW], candidates[C.HIGH], candidates[C.AESTHETIC],
                                                    candidates[C.GEN_ERROR], generated, strict=True)]
    out = candidates.assign(**{C.DROP_REASON: reasons})
    if cfg.high_subject_from_low and len(out):
        out[C.HIGH] = [with_low_subject(low, high) for low, high in zip(out[C.LOW], out[C.HIGH], strict=True)]
        # a high prompt that was only its subject now equals its low one: nothing left to learn from it
        same = (out[C.DROP_REASON] == "") & (out[C.LOW].map(dedup_key) == out[C.HIGH].map(dedup_key))
        out.loc[same, C.DROP_REASON] = "same_low_high"
    return out


def mark_duplicates(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mark kept pairs whose (low, high) near-duplicates an earlier kept pair (source-row order, then source)."""
    order = pairs[C.PAIR_SOURCE].map({s: i for i, s in enumerate(SOURCES)})
    pairs = pairs.assign(_order=order).sort_values([C.ROW_ORDER, "_order"], kind="stable").drop(columns="_order")
    kept = pairs[C.DROP_REASON] == ""
    keys = pairs.loc[kept, C.LOW].map(dedup_key) + pairs.loc[kept, C.HIGH].map(dedup_key)
    duplicate_index = keys.index[keys.duplicated(keep="first")]
    pairs.loc[duplicate_index, C.DROP_REASON] = "duplicate"
    return pairs.reset_index(drop=True)
