"""`bp-ray data generate`: prompts -> normalise -> split -> three pair sources -> clean -> Parquet + manifest.

Row-level work (normalising, the split, NSFW / keyword / duplicate filters) is pure pandas on the driver; the
model stages stream through Ray Data actor pools that autoscale between min and max actors:

    rows -> Captioner (BLIP) -> PromptRewriter (LLM) -> ImageAesthetic (optional) -> write_batch (commit)

or, with data.fused (the CPU presets), one pool of BatchModels actors that each run all of that on whole batches.

Every batch commits one work file, so an interrupted run resumes where it stopped and a retried batch after an
actor failure rewrites the same file. Consolidation then removes duplicates across batches and writes the shards.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bp_ray.config import ActorPoolConfig, ClusterConfig, ConfigError, DataConfig, ModelsConfig
from bp_ray.config_loader import ENV_VARIABLE
from bp_ray.data import columns as C
from bp_ray.data import work_store
from bp_ray.data.given_pairs import read_given_pairs
from bp_ray.data.pairs import SOURCES, build_candidates, clean_candidates, llm_rows, mark_duplicates
from bp_ray.data.prompt_io import ReadReport, read_prompts
from bp_ray.data.prompt_rules import SplitRules, annotate_prompts, content_flag, dedup_key, nsfw_score_flag
from bp_ray.data.vocab import load_vocab, tag_terms
from bp_ray.layout import SUCCESS, write_manifest
from bp_ray.ray_runtime import actor_pool_args

logger = logging.getLogger(__name__)

WORK_DIR = "work"
WORK_KEY = "work_key.json"


# --- 1-2. rows: normalise, filter, split (pure) ---------------------------------------------------------------

def prepare_rows(table: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Source table -> rows the model stages must process, and the row-level counts.

    Counts add up: rows_in = sum(dropped) + low + high + neither, and rows_to_process = low + high - unused.
    """
    vocab = load_vocab()
    notes = annotate_prompts(table[C.PROMPT].tolist(), SplitRules.from_config(cfg), tag_terms(vocab),
                             cfg.weights_syntax, cfg.max_prompt_chars)
    rows = table.reset_index(drop=True).assign(**{C.PROMPT: notes["prompt"].to_numpy(),
                                                   C.QUALITY: notes["quality"].to_numpy(),
                                                   C.ROW_ORDER: np.arange(len(table))})
    reason = notes["drop_reason"].astype(object).where(notes["drop_reason"].notna(), "").to_numpy()
    nsfw = np.array([nsfw_score_flag(p, i, cfg.nsfw_threshold)
                     for p, i in zip(rows[C.PROMPT_NSFW], rows[C.IMAGE_NSFW], strict=True)], dtype=bool)
    reason = np.where((reason == "") & nsfw, "nsfw_score", reason)
    if cfg.keyword_filter:
        flags = np.array([content_flag(p, vocab) or "" if r == "" else ""
                          for p, r in zip(rows[C.PROMPT], reason, strict=True)], dtype=object)
        reason = np.where((reason == "") & (flags != ""), flags, reason)
    keys = pd.Series([dedup_key(p) if r == "" else None for p, r in zip(rows[C.PROMPT], reason, strict=True)])
    duplicate = keys.notna() & keys.duplicated(keep="first")
    reason = np.where(duplicate.to_numpy(), "duplicate", reason)

    usable = reason == ""
    quality = rows[C.QUALITY].where(usable)
    has_image = rows[C.IMAGE_REF] != ""
    by_llm = llm_rows(rows[C.ROW_ID].tolist(), cfg.llm_fraction)
    low_used = (quality == "low") & cfg.use_expansions & by_llm
    high_used = (quality == "high") & ((cfg.use_summaries & by_llm) | cfg.use_stripped
                                       | (cfg.use_captions & has_image))
    counts = {
        "rows_in": len(rows),
        "rows_dropped": dict(Counter(r for r in reason if r)),
        "quality": {q: int((quality == q).sum()) for q in ("low", "high", "neither")},
        "unused": {"low": int(((quality == "low") & ~low_used).sum()),
                   "high": int(((quality == "high") & ~high_used).sum())},
    }
    selected = rows[(low_used | high_used).to_numpy()]
    counts["rows_to_process"] = len(selected)
    columns = [C.ROW_ID, C.ROW_ORDER, C.SOURCE, C.PROMPT, C.QUALITY, C.IMAGE_REF]
    return selected.loc[:, columns].reset_index(drop=True), counts


def corpus_spec(data: DataConfig):
    """The generated corpus the data section asks for (data.corpus_*)."""
    from bp_ray.data.corpus import CorpusSpec

    return CorpusSpec(num_rows=data.corpus_rows, seed=data.corpus_seed, image_size=data.corpus_image_size,
                      prompt_source=data.corpus_kind)


SOURCE_HINT = ("give it with --prompts /path/to/diffusiondb (bp-ray pipeline, bp-ray data generate, bp-ray check) "
               "or --set data.source=PATH (any command): a DiffusionDB folder (metadata.parquet + images/part-*.zip) "
               "or a prompt file; --set data.source=corpus trains on the embedded synthetic corpus instead")


def source_problem(data: DataConfig) -> str | None:
    """Why the configured prompt sources cannot be read, known without touching them: data.source not set (the
    paper preset has no default, so a real run never falls back to the synthetic corpus unnoticed), or a source
    naming an environment variable that is not set. None when they are worth opening."""
    if not data.source.strip():
        return f"data.source is not set: {SOURCE_HINT}"
    named = [("data.source", data.source), *((f"data.extra_sources[{i}]", s) for i, s in enumerate(data.extra_sources))]
    for key, value in named:
        unset = ENV_VARIABLE.findall(value)
        if unset:  # config_loader leaves an unset ${NAME} as it is
            return (f"{key}={value} names the environment variable {unset[0]}, which is not set: export "
                    f"{unset[0]}=DIR, or {SOURCE_HINT}")
    return None


def require_source(data: DataConfig) -> None:
    """Raise ConfigError, before any work, when `source_problem` finds one."""
    problem = source_problem(data)
    if problem:
        raise ConfigError(problem)


def read_source(data: DataConfig, corpus_dir: Path) -> tuple[pd.DataFrame, ReadReport, str]:
    """The configured prompt source as a prompt table; `corpus` is generated on first use (idempotent)."""
    require_source(data)
    if data.source == "corpus":
        from bp_ray.data.corpus import write_corpus

        write_corpus(corpus_dir, corpus_spec(data))
        path = corpus_dir
    else:
        path = Path(data.source)
    table, report = read_prompts(path, limit=data.limit or None)
    if not data.extra_sources:
        return table, report, str(path)
    tables, paths = [table], [str(path)]
    for extra in data.extra_sources:
        more, more_report = read_prompts(extra, limit=data.limit or None)
        tables.append(more)
        paths.append(str(extra))
        report.rows_read += more_report.rows_read
        for reason, count in more_report.rows_skipped.items():
            report.skip(reason, count)
    table = pd.concat(tables, ignore_index=True)
    if not table[C.ROW_ID].is_unique:  # row ids name the file stem: two files of one name would collide
        raise ValueError(f"data.source and data.extra_sources give rows the same ids; rename one of: "
                         f"{', '.join(paths)}")
    return table, report, " + ".join(paths)


# --- 3-4. the Ray Data graph ------------------------------------------------------------------------------------

def write_batch(batch: pd.DataFrame, work_dir: str, data_cfg: DataConfig) -> pd.DataFrame:
    """Last stage of the graph: candidates of this batch, cleaned, committed as one work file."""
    candidates = clean_candidates(build_candidates(batch, data_cfg), data_cfg, load_vocab())
    work_store.commit_batch(Path(work_dir), candidates, batch[C.ROW_ID].tolist())
    return pd.DataFrame({"rows": [len(batch)], "candidates": [len(candidates)],
                         "kept": [int((candidates[C.DROP_REASON] == "").sum())]})


MODEL_STAGES = ("caption", "rewrite", "aesthetic")


def model_stages(rows: pd.DataFrame, data: DataConfig) -> list[str]:
    """The model stages these rows need, in order (of MODEL_STAGES)."""
    has_image = rows[C.IMAGE_REF] != ""
    wanted = {"caption": data.use_captions and bool(((rows[C.QUALITY] == "high") & has_image).any()),
              "rewrite": data.use_summaries or data.use_expansions,
              "aesthetic": data.aesthetic_threshold is not None and bool(has_image.any())}
    return [stage for stage in MODEL_STAGES if wanted[stage]]


def _stage_udf(stage: str, data: DataConfig, models: ModelsConfig) -> tuple[type, dict[str, Any], ActorPoolConfig]:
    """The Ray Data UDF class of one model stage, its constructor arguments and its pool."""
    from bp_ray.data.captions import Captioner
    from bp_ray.data.image_filter import ImageAesthetic
    from bp_ray.data.rewrite import PromptRewriter

    return {"caption": (Captioner, {"models_cfg": models, "max_new_tokens": data.caption_max_new_tokens},
                        data.captioner_pool),
            "rewrite": (PromptRewriter, {"data_cfg": data, "models_cfg": models}, data.rewriter_pool),
            "aesthetic": (ImageAesthetic, {"models_cfg": models}, data.aesthetic_pool)}[stage]


class BatchModels:
    """Ray Data UDF of data.fused: a batch's every model stage and its commit in one actor. On CPUs the separate
    pools cost more than they give: each hand-over crosses the object store between actors that share the same
    cores. A pool of these runs like the sequential path in as many processes, with Ray's retries."""

    def __init__(self, data_cfg: DataConfig, models_cfg: ModelsConfig, stages: list[str], work_dir: str):
        from bp_ray.ray_runtime import use_held_cpus

        use_held_cpus(data_cfg.model_pool.num_cpus)
        self.steps = [cls(**kwargs) for cls, kwargs, _ in (_stage_udf(s, data_cfg, models_cfg) for s in stages)]
        self.data_cfg, self.work_dir = data_cfg, work_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        for step in self.steps:
            batch = step(batch)
        return write_batch(pd.DataFrame(batch), self.work_dir, self.data_cfg)


def batch_rows(data: DataConfig) -> int:
    """Rows per block: the unit of parallelism, of retry and of resume (the fused pool's batch, else the smaller of
    the captioner's and the rewriter's)."""
    return max(1, data.model_pool.batch_size if data.fused
               else min(data.captioner_pool.batch_size, data.rewriter_pool.batch_size))


def run_model_stages(rows: pd.DataFrame, data: DataConfig, models: ModelsConfig, work_dir: Path) -> int:
    """Stream `rows` through the actor pools (or the fused pool, data.fused) and commit every batch; returns
    batches committed."""
    import ray

    from bp_ray.console import report_progress

    stages = model_stages(rows, data)
    block_rows = batch_rows(data)
    blocks = [rows.iloc[i:i + block_rows] for i in range(0, len(rows), block_rows)]
    ds = ray.data.from_pandas(blocks)
    if data.fused:
        ds = ds.map_batches(BatchModels, fn_constructor_kwargs={"data_cfg": data, "models_cfg": models,
                                                                "stages": stages, "work_dir": str(work_dir)},
                            **actor_pool_args(data.model_pool))
    else:
        for stage in stages:
            udf, kwargs, pool = _stage_udf(stage, data, models)
            ds = ds.map_batches(udf, fn_constructor_kwargs=kwargs, **actor_pool_args(pool))
        # Writing a batch is light I/O: a small CPU share keeps it from waiting behind the model actors.
        ds = ds.map_batches(write_batch, batch_format="pandas", batch_size=None, num_cpus=0.25,
                            fn_kwargs={"work_dir": str(work_dir), "data_cfg": data})
    batches = rows_done = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):  # each block as it lands: live progress
        batches, rows_done = batches + len(batch["rows"]), rows_done + int(batch["rows"].sum())
        report_progress(rows_done, len(rows), "rows")
    return batches


# --- 5. consolidate ---------------------------------------------------------------------------------------------

def pair_counts(pairs: pd.DataFrame) -> dict[str, Any]:
    """Per source: candidates = out + sum(dropped by reason)."""
    counts = {}
    for source in SOURCES:
        mine = pairs[pairs[C.PAIR_SOURCE] == source]
        kept = mine[C.DROP_REASON] == ""
        counts[source] = {"candidates": len(mine), "out": int(kept.sum()),
                          "dropped": dict(Counter(mine.loc[~kept, C.DROP_REASON]))}
    return counts


def work_key(data: DataConfig, models: ModelsConfig, source_path: str) -> dict[str, Any]:
    """What committed work depends on: changing any of it invalidates the work folder."""
    # Given pairs are read afresh on every run: they never enter the committed work.
    unrelated = ("render", "num_seeds", "pair_files", "pair_high_field", "pair_files_fraction", "fused")
    settings = {k: v for k, v in asdict(data).items() if not k.endswith("_pool") and k not in unrelated}
    roles = {role: getattr(models, role) for role in ("rewriter", "captioner", "aesthetic")}
    return {"data": settings, "models": roles, "zoo": {name: asdict(section) for name, section in models.zoo.items()},
            "source": source_path}


def run_data_generation(data: DataConfig, models: ModelsConfig, cluster: ClusterConfig, out_dir: Path,
                        corpus_dir: Path | None = None, fresh: bool = False) -> dict[str, Any]:
    """The whole stage (the captioner, rewriter and aesthetic roles of `models`); returns the manifest it writes to
    out_dir/manifest.json."""
    require_source(data)  # before touching out_dir: a run without a source must leave an earlier one as it was
    start = time.perf_counter()
    out_dir = Path(out_dir)
    work_dir = out_dir / WORK_DIR
    (out_dir / SUCCESS).unlink(missing_ok=True)
    table, report, source_path = read_source(data, Path(corpus_dir) if corpus_dir else out_dir.parent / "corpus")
    rows, row_counts = prepare_rows(table, data)

    key = work_key(data, models, source_path)
    key_file = work_dir / WORK_KEY
    if fresh or (key_file.exists() and json.loads(key_file.read_text()) != key):
        logger.info("config or source changed since the committed work: starting over")
        shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=2, default=str))
    work_store.clear_partial_writes(work_dir)
    done = work_store.committed_row_ids(work_dir)
    pending = rows[~rows[C.ROW_ID].isin(done)]
    logger.info("%d rows to process (%d already committed)", len(pending), len(rows) - len(pending))

    if len(pending):
        from bp_ray.models.loading import prepare_models
        from bp_ray.ray_runtime import init_ray

        prepare_models(models, ("rewriter", "captioner", "aesthetic"))
        init_ray(cluster)
        run_model_stages(pending, data, models, work_dir)

    committed = work_store.read_committed(work_dir)
    committed = committed[committed[C.ROW_ID].isin(set(rows[C.ROW_ID]))]  # work of rows no longer in the source
    given, given_counts = read_given_pairs(data.pair_files, data.pair_high_field, data.pair_files_fraction,
                                           first_order=len(table))
    if len(given):
        committed = pd.concat([committed, clean_candidates(given, data, load_vocab())], ignore_index=True)
    pairs = mark_duplicates(committed)
    kept = pairs[pairs[C.DROP_REASON] == ""]
    shards = work_store.write_shards(kept, out_dir, data.shard_rows)
    manifest = {
        "stage": "data",
        "source": source_path,
        "rows_read": report.rows_read,
        "rows_skipped_by_reader": report.rows_skipped,
        **row_counts,
        "rows_resumed": len(rows) - len(pending),
        "pairs": pair_counts(pairs),
        "pair_files": given_counts,
        "pairs_out": len(kept),
        "shards": [p.name for p in shards],
        "models": {role: getattr(models, role) for role in ("captioner", "rewriter", "aesthetic")},
        "llm_backend": data.llm_backend,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return write_manifest(out_dir, manifest)
