"""`bp-ray data generate` on a local Ray with the tiny zoo: sources, cleaning, counts, resume, actor failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.data import work_store
from bp_ray.data.pairs import PAIR_DROP_REASONS, build_candidates
from bp_ray.data.pipeline import batch_rows, prepare_rows, read_source, run_data_generation

pytestmark = pytest.mark.integration

SMALL = ["data.corpus_rows=160", "data.max_new_tokens=12", "data.caption_max_new_tokens=8",
         "data.captioner_pool.batch_size=8", "data.rewriter_pool.batch_size=8", "data.rewriter_pool.max_actors=2",
         "data.model_pool.batch_size=8"]


def small_config(tiny_models_cfg, *overrides: str):
    cfg = load_config("tiny", [*SMALL, f"models.zoo_dir={tiny_models_cfg.zoo_dir}", *overrides])
    return cfg


def read_pairs(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True)


def expected_candidate_ids(cfg, corpus_dir: Path) -> set[str]:
    """Every pair id the sources must propose, from the rows alone (independent of what the models write)."""
    table, _, _ = read_source(cfg.data, corpus_dir)
    rows, _ = prepare_rows(table, cfg.data)
    frame = rows.assign(**{C.CAPTION: "", C.SUMMARY: "", C.EXPANSION: "", C.GEN_ERROR: ""})
    return set(build_candidates(frame, cfg.data)[C.PAIR_ID])


def assert_counts_add_up(manifest: dict) -> None:
    quality = manifest["quality"]
    assert manifest["rows_in"] == manifest["rows_read"]
    assert manifest["rows_in"] == sum(manifest["rows_dropped"].values()) + sum(quality.values())
    assert manifest["rows_to_process"] == quality["low"] + quality["high"] - sum(manifest["unused"].values())
    for info in manifest["pairs"].values():
        assert info["candidates"] == info["out"] + sum(info["dropped"].values())
    assert manifest["pairs_out"] == sum(info["out"] for info in manifest["pairs"].values())


def assert_exactly_once(out: Path, expected_ids: set[str]) -> None:
    committed = work_store.read_committed(out / "work")
    assert committed[C.PAIR_ID].is_unique, "a candidate was committed twice"
    assert set(committed[C.PAIR_ID]) == expected_ids, "a candidate is missing"
    pairs = read_pairs(out)
    assert pairs[C.PAIR_ID].is_unique
    kept = committed[committed[C.DROP_REASON] == ""]
    made = pairs[pairs[C.PAIR_SOURCE] != "given"]  # given pairs come from files, never from committed work
    assert set(made[C.PAIR_ID]) <= set(kept[C.PAIR_ID])


@pytest.fixture(scope="module")
def tiny_run(ray_session, tiny_models_cfg, tmp_path_factory):
    """One full run on the embedded corpus (with its malformed, NSFW and duplicate rows)."""
    root = tmp_path_factory.mktemp("run")
    cfg = small_config(tiny_models_cfg)
    manifest = run_data_generation(cfg.data, cfg.models, cfg.cluster, root / "data")
    return cfg, root, manifest


def test_every_source_runs_on_the_tiny_models(tiny_run):
    """BLIP captions make pairs; the random-init tiny LM writes junk, which cleaning drops and counts."""
    _, root, manifest = tiny_run
    pairs = read_pairs(root / "data")
    captions = pairs[pairs[C.PAIR_SOURCE] == "caption"]
    assert len(captions) > 0 and (captions[C.IMAGE_REF] != "").all()  # from the high prompt's image
    committed = work_store.read_committed(root / "data" / "work")
    for source, generated in (("summary", C.LOW), ("expansion", C.HIGH)):
        mine = committed[committed[C.PAIR_SOURCE] == source]
        assert manifest["pairs"][source]["candidates"] == len(mine) > 0
        assert (mine[C.GEN_ERROR] == "").all()  # the local LM answered every row...
        assert set(mine[C.DROP_REASON]) <= {"", *PAIR_DROP_REASONS}  # ...and every answer was judged
        assert mine[generated].map(len).sum() > 0
    assert set(json.loads((root / "data" / "manifest.json").read_text())) >= {
        "rows_in", "rows_dropped", "pairs", "models", "wall_time_s"}


def test_openai_backend_makes_summary_and_expansion_pairs(ray_session, tiny_models_cfg, tmp_path):
    """The official client in the rewriter actors against a real local OpenAI-compatible HTTP server."""
    from tests.openai_stub_server import EXPANSION_SUFFIX, SUMMARY_WORDS, OpenAIStubServer

    with OpenAIStubServer(rate_limit_first=2) as server:
        cfg = small_config(tiny_models_cfg, "data.corpus_rows=60", "data.use_captions=false",
                           "data.llm_backend=openai", f"data.openai_base_url={server.base_url}",
                           "data.openai_backoff_s=0.01")
        manifest = run_data_generation(cfg.data, cfg.models, cfg.cluster, tmp_path / "data")
        requests = server.total_requests
    assert requests == manifest["rows_to_process"] + 2  # one per row, plus the two rate-limited retries
    pairs = read_pairs(tmp_path / "data")
    summaries = pairs[pairs[C.PAIR_SOURCE] == "summary"]
    expansions = pairs[pairs[C.PAIR_SOURCE] == "expansion"]
    assert len(summaries) > 0 and len(expansions) > 0
    for low, high in zip(summaries[C.LOW], summaries[C.HIGH], strict=True):
        assert low == " ".join(high.split()[:SUMMARY_WORDS])
    for low, high in zip(expansions[C.LOW], expansions[C.HIGH], strict=True):
        assert high == low + EXPANSION_SUFFIX
    assert_counts_add_up(manifest)


def test_manifest_counts_add_up_and_malformed_rows_are_counted(tiny_run):
    cfg, root, manifest = tiny_run
    assert_counts_add_up(manifest)
    dropped = manifest["rows_dropped"]
    # the embedded corpus carries empty, junk / control-character, NSFW and duplicate rows: each is counted
    assert dropped.get("empty", 0) > 0 and dropped.get("non_text", 0) + dropped.get("too_long", 0) > 0
    assert dropped.get("nsfw_score", 0) + dropped.get("nsfw_keyword", 0) > 0
    assert dropped.get("duplicate", 0) > 0
    assert manifest["quality"]["low"] > 0 and manifest["quality"]["high"] > 0
    assert_exactly_once(root / "data", expected_candidate_ids(cfg, root / "corpus"))


def test_output_pairs_are_clean(tiny_run):
    _, root, _ = tiny_run
    pairs = read_pairs(root / "data")
    assert (pairs[C.LOW].str.strip() != "").all() and (pairs[C.HIGH].str.strip() != "").all()
    assert (pairs[C.LOW].str.lower() != pairs[C.HIGH].str.lower()).all()
    assert not pairs[C.HIGH].str.contains(r"\bnude\b|\bgore\b", case=False).any()


def test_a_rerun_reuses_every_committed_batch(tiny_run):
    cfg, root, first = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in work_store.committed_files(root / "data" / "work")}
    again = run_data_generation(cfg.data, cfg.models, cfg.cluster, root / "data")
    assert again["rows_resumed"] == first["rows_to_process"]
    assert {p.name: p.stat().st_mtime_ns for p in work_store.committed_files(root / "data" / "work")} == before
    assert again["pairs"] == first["pairs"]


def test_fused_and_separate_pools_commit_the_same_pairs(tiny_run, tiny_models_cfg, tmp_path):
    cfg, root, first = tiny_run
    # The other mode than the run's (the preset's default), with batches of the same rows.
    other = small_config(tiny_models_cfg, f"data.fused={str(not cfg.data.fused).lower()}")
    assert batch_rows(cfg.data) == batch_rows(other.data) == 8
    again = run_data_generation(other.data, other.models, other.cluster, tmp_path / "data")
    assert again["rows_resumed"] == 0 and again["pairs"] == first["pairs"]
    def committed(run: Path) -> pd.DataFrame:  # image paths point into each run's own corpus folder
        frame = work_store.read_committed(run / "data" / "work").sort_values(C.PAIR_ID, ignore_index=True)
        return frame.assign(**{C.IMAGE_REF: frame[C.IMAGE_REF].str.replace(str(run), "<run>", regex=False)})

    pd.testing.assert_frame_equal(committed(tmp_path), committed(root))


def test_a_changed_config_starts_the_work_over(ray_session, tiny_models_cfg, tmp_path):
    cfg = small_config(tiny_models_cfg, "data.corpus_rows=40", "data.use_captions=false")
    first = run_data_generation(cfg.data, cfg.models, cfg.cluster, tmp_path / "data")
    assert first["pairs"]["caption"]["candidates"] == 0
    cfg = small_config(tiny_models_cfg, "data.corpus_rows=40")
    second = run_data_generation(cfg.data, cfg.models, cfg.cluster, tmp_path / "data")
    assert second["rows_resumed"] == 0 and second["pairs"]["caption"]["candidates"] > 0


def test_killed_driver_resumes_with_every_pair_exactly_once(tiny_models_cfg, tmp_path):
    """Start the CLI in its own process group, SIGKILL it once some batches are committed, then rerun."""
    overrides = [*SMALL, "data.corpus_rows=240", "data.max_new_tokens=24", "data.rewriter_pool.batch_size=4",
                 "data.captioner_pool.batch_size=4", "data.model_pool.batch_size=4",
                 f"models.zoo_dir={tiny_models_cfg.zoo_dir}"]
    out = tmp_path / "data"
    argv = [str(Path(sys.executable).parent / "bp-ray"), "data", "generate", "--out", str(out)]
    for item in overrides:
        argv += ["--set", item]
    # its own local Ray, never the test session's
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(work_store.committed_files(out / "work")) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        committed_at_kill = len(work_store.committed_files(out / "work"))
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, all ours
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "_SUCCESS.json").exists()

    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_resumed"] >= committed_at_kill  # committed work was not redone
    assert_counts_add_up(manifest)
    cfg = load_config("tiny", overrides)
    assert_exactly_once(out, expected_candidate_ids(cfg, tmp_path / "corpus"))


def test_a_killed_actor_is_replaced_and_nothing_is_lost(ray_session, tiny_models_cfg, tmp_path):
    import psutil

    cfg = small_config(tiny_models_cfg, "data.corpus_rows=240", "data.max_new_tokens=24",
                       "data.rewriter_pool.batch_size=4", "data.captioner_pool.batch_size=4",
                       "data.model_pool.batch_size=4")
    victim = "BatchModels" if cfg.data.fused else "PromptRewriter"  # the actor that runs the LM
    out = tmp_path / "data"
    killed: list[int] = []

    def kill_one_model_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if work_store.committed_files(out / "work"):
                # Ray titles actor workers "ray::<actor class>"; only this test's own Ray is searched.
                for process in psutil.Process().children(recursive=True):
                    try:
                        title = " ".join(process.cmdline())
                    except psutil.Error:
                        continue
                    if victim in title:
                        process.kill()
                        killed.append(process.pid)
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_model_actor, daemon=True)
    killer.start()
    manifest = run_data_generation(cfg.data, cfg.models, cfg.cluster, out)
    killer.join(timeout=5)
    assert killed, f"no {victim} actor was killed while the job ran"
    assert_counts_add_up(manifest)
    assert_exactly_once(out, expected_candidate_ids(cfg, tmp_path / "corpus"))


def test_real_prompts_put_long_tagged_prompts_on_the_high_side(ray_session, tiny_models_cfg, tmp_path):
    from bp_ray.data.prompt_io import read_prompts
    from bp_ray.data.prompt_rules import normalize_prompt, word_count
    from tests.conftest import shared_path
    from tests.openai_stub_server import OpenAIStubServer

    path = shared_path("data", "prompts", "sd_discord_prompts_sample20k.jsonl")
    with OpenAIStubServer() as server:
        cfg = small_config(tiny_models_cfg, f"data.source={path}", "data.limit=150", "data.llm_backend=openai",
                           f"data.openai_base_url={server.base_url}", "data.keyword_filter=false")
        manifest = run_data_generation(cfg.data, cfg.models, cfg.cluster, tmp_path / "data")
    assert manifest["rows_in"] == 150 and manifest["pairs"]["caption"]["candidates"] == 0  # no images here
    assert_counts_add_up(manifest)

    table, _ = read_prompts(path, limit=150)
    normalized = table[C.PROMPT].map(normalize_prompt)
    long_tagged = set(normalized[(normalized.str.count(",") >= 4) & (normalized.map(word_count) >= 12)])
    short_plain = set(normalized[(~normalized.str.contains(",")) & (normalized.map(word_count) <= 6)])
    assert len(long_tagged) >= 20 and len(short_plain) >= 5
    committed = work_store.read_committed(tmp_path / "data" / "work")
    high_side = set(committed.loc[committed[C.PAIR_SOURCE] == "summary", C.HIGH])
    low_side = set(committed.loc[committed[C.PAIR_SOURCE] == "expansion", C.LOW])
    dropped_rows = sum(manifest["rows_dropped"].values())
    # every long tagged prompt is on the high side, unless it was dropped as NSFW / duplicate
    assert len(long_tagged - high_side) <= dropped_rows
    assert not short_plain & high_side
    assert short_plain & low_side


def test_stripped_pairs_from_real_prompts_without_any_model(ray_session, tiny_models_cfg, tmp_path):
    """Pair source (iv) alone on a real DiffusionDB pool: no captioner, no LLM, every high row proposes a pair."""
    from bp_ray.data.vocab import load_vocab, tag_terms
    from tests.conftest import shared_path

    path = shared_path("data", "prompts", "diffusiondb_imagereward_refl.jsonl")
    given = shared_path("data", "prompts", "drawbench_upsampled_pairs.jsonl")
    cfg = small_config(tiny_models_cfg, f"data.source={path}", "data.limit=300", "data.use_captions=false",
                       "data.use_summaries=false", "data.use_expansions=false", "data.use_stripped=true",
                       f"data.pair_files=[{given}]", "data.pair_high_field=upsampled",
                       "data.pair_files_fraction=0.5")
    manifest = run_data_generation(cfg.data, cfg.models, cfg.cluster, tmp_path / "data")
    assert_counts_add_up(manifest)
    # source (v): half of DrawBench's upsampled pairs; a few long DrawBench prompts exceed data.pair_low_words
    used = manifest["pair_files"][str(given)]["used"]
    assert manifest["pairs"]["given"]["candidates"] == used
    assert set(manifest["pairs"]["given"]["dropped"]) <= {"length"} and manifest["pairs"]["given"]["out"] > used - 8
    counts = manifest["pair_files"][str(given)]
    assert used + counts["held_back"] + sum(counts["rows_skipped"].values()) == counts["rows_read"] == 160
    given_pairs = read_pairs(tmp_path / "data").query("pair_source == 'given'")
    assert len(given_pairs) == manifest["pairs"]["given"]["out"]
    assert given_pairs[C.HIGH].str.split().str.len().min() > 20
    stripped = manifest["pairs"]["stripped"]
    assert stripped["candidates"] == manifest["quality"]["high"] - manifest["unused"]["high"] > 50
    assert manifest["unused"]["high"] == 0 and stripped["out"] > 0.5 * stripped["candidates"]
    assert_exactly_once(tmp_path / "data", expected_candidate_ids(cfg, tmp_path / "corpus"))
    pairs = read_pairs(tmp_path / "data").query("pair_source == 'stripped'")
    terms = tag_terms(load_vocab())
    for low, high in zip(pairs[C.LOW], pairs[C.HIGH], strict=True):
        assert low != high and set(low.replace(",", " ").split()) <= set(high.replace(",", " ").split()), low
        assert not any(f" {t} " in f" {low.lower()} " for t in terms if len(t) > 3), low
