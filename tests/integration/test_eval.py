"""`bp-ray eval` end to end on the tiny zoo: every system, every file, an offline report that a real headless
Chromium renders, and the same results from the same seeds."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bp_ray.config_loader import load_config
from bp_ray.eval.browser import find_chromium, render_page
from bp_ray.eval.human_pairs import default_systems, load_pairs
from bp_ray.eval.human_results import HUMAN_BEGIN, HUMAN_END
from bp_ray.eval.run import run_evaluation
from bp_ray.eval.systems import popular_tags, tags_pool
from bp_ray.train.metrics import MetricsWriter
from tests.openai_stub_server import EXPANSION_SUFFIX, OpenAIStubServer

pytestmark = pytest.mark.integration

SYSTEMS = ["original", "tags", "sft", "ppo", "llm"]
PROMPTS, SEEDS, GRID, HUMAN = 6, 2, 3, 5  # images saved for the first HUMAN prompts, the grid shows GRID


def _ppo_stage_with_metrics(folder: Path) -> Path:
    """A PPO stage folder whose metrics.csv the training loop's own writer wrote (5 steps)."""
    with MetricsWriter(folder / "metrics") as writer:
        for step in range(1, 6):
            writer.log(step, {"reward/combined": 0.1 * step, "kl": 0.05 * step, "kl_coef": 0.2 - 0.01 * step,
                              "loss/policy": 1.0 / step, "loss/value": 0.5 / step})
    return folder


@pytest.fixture(scope="module")
def evaluation(ray_session, tiny_models_cfg, tmp_path_factory):
    """Two evaluations with the same config and seeds; the tiny zoo's policy stands in for both checkpoints."""
    root = tmp_path_factory.mktemp("eval")
    policy = Path(tiny_models_cfg.zoo_dir) / "tiny" / "bloom"
    ppo_stage = _ppo_stage_with_metrics(root / "ppo")
    os.environ.setdefault("OPENAI_API_KEY", "EMPTY")
    with OpenAIStubServer() as server:
        cfg = load_config("tiny", [f"models.zoo_dir={tiny_models_cfg.zoo_dir}", f"eval.num_prompts={PROMPTS}",
                                   f"eval.num_seeds={SEEDS}", f"eval.grid_prompts={GRID}",
                                   f"eval.human_prompts={HUMAN}", "eval.batch_size=4",
                                   f"data.openai_base_url={server.base_url}", "eval.max_new_tokens=16"])
        manifests = [run_evaluation(cfg.eval, cfg.sft, cfg.data, cfg.rewards, cfg.models, cfg.cluster, root / name,
                                    preset=cfg.preset, sft_dir=policy, ppo_dir=policy, systems=SYSTEMS,
                                    training_dirs={"ppo": ppo_stage}) for name in ("a", "b")]
    return {"cfg": cfg, "out": root / "a", "again": root / "b", "manifest": manifests[0]}


def test_every_file_is_written_and_every_image_scored_once(evaluation):
    out = evaluation["out"]
    for name in ("results.json", "results.csv", "report.html", "scores.csv", "rewrites.jsonl", "manifest.json",
                 "_SUCCESS.json", "plots/means.png", "plots/differences_vs_original.png",
                 "plots/differences_vs_sft.png", "plots/curves_ppo.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert all((out / f).is_file() for f in evaluation["manifest"]["files"])
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == len(SYSTEMS) * PROMPTS * SEEDS
    assert not scores.duplicated(["system", "prompt_id", "seed"]).any()
    assert scores[["pickscore", "aesthetic", "relevance", "reward"]].notna().all().all()
    saved = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert len(saved) == len(SYSTEMS) * HUMAN * SEEDS
    assert set(saved) <= set(evaluation["manifest"]["files"])
    assert Image.open(out / saved[0]).size == (32, 32)


def test_the_human_study_reads_the_evaluations_images(evaluation):
    out = evaluation["out"]
    assert default_systems(out) == ["original", "ppo"]
    items = load_pairs(out, ["original", "sft", "ppo"])
    assert [item.prompt_id for item in items[::3]] == list(range(HUMAN))  # three pairs per prompt with images
    rewrites = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    for item in items:
        assert item.seed == evaluation["manifest"]["seeds"][0] and (out / item.image_a).is_file()
        row = rewrites[item.prompt_id]
        assert (item.prompt, item.text_b) == (row["prompt"], row[item.system_b])
    page = (out / "report.html").read_text()
    assert page.index(HUMAN_BEGIN) < page.index(HUMAN_END)  # the place `bp-ray eval human-results` fills


def test_results_hold_the_table_comparisons_and_long_prompt_counts(evaluation):
    results = json.loads((evaluation["out"] / "results.json").read_text())
    assert [row["system"] for row in results["table"]] == SYSTEMS
    assert all(row["n"] == PROMPTS for row in results["table"])
    scores = pd.read_csv(evaluation["out"] / "scores.csv")
    # the table's means are the means over prompts of the means over seeds
    per_prompt = scores.groupby(["system", "prompt_id"])["pickscore"].mean().groupby("system").mean()
    for row in results["table"]:
        assert row["pickscore_mean"] == pytest.approx(per_prompt[row["system"]], rel=1e-4)
    pairs = {(c["system"], c["baseline"], c["metric"]) for c in results["comparisons"]}
    assert ("ppo", "original", "reward") in pairs and ("ppo", "sft", "pickscore") in pairs
    assert ("original", "sft", "reward") not in pairs  # the mirror of sft over original adds nothing
    for c in results["comparisons"]:
        assert c["wins"] + c["ties"] + c["losses"] == c["n"] == PROMPTS
    long = results["long_prompts"]
    assert long["limit_tokens"] == 77 and set(long["systems"]) == set(SYSTEMS)
    assert long["mode"] == "truncate"
    csv_table = pd.read_csv(evaluation["out"] / "results.csv")
    assert csv_table["system"].tolist() == SYSTEMS


def test_each_system_rewrote_the_prompts_its_own_way(evaluation):
    rows = [json.loads(line) for line in (evaluation["out"] / "rewrites.jsonl").read_text().splitlines()]
    assert len(rows) == PROMPTS
    cfg = evaluation["cfg"]
    tags = popular_tags(tags_pool(cfg.eval, cfg.data), cfg.eval.num_tags)
    for row in rows:
        assert row["original"] == row["prompt"]
        assert row["tags"].startswith(row["prompt"].rstrip(".")) and row["tags"].endswith(tags[-1])
        assert row["llm"].endswith(EXPANSION_SUFFIX)  # the stub endpoint's expansion, through the openai client
        assert row["sft"] == row["ppo"]  # the same checkpoint, greedy


def test_the_same_seeds_give_the_same_results(evaluation):
    first, second = evaluation["out"], evaluation["again"]
    assert (first / "results.json").read_bytes() == (second / "results.json").read_bytes()
    assert (first / "rewrites.jsonl").read_bytes() == (second / "rewrites.jsonl").read_bytes()
    a, b = pd.read_csv(first / "scores.csv"), pd.read_csv(second / "scores.csv")
    pd.testing.assert_frame_equal(a, b)
    image = "images/ppo/p0001_s1.png"
    assert np.array_equal(np.asarray(Image.open(first / image)), np.asarray(Image.open(second / image)))


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]


def test_the_report_references_only_local_files_that_exist(evaluation):
    out = evaluation["out"]
    parser = _References()
    parser.feed((out / "report.html").read_text())
    assert parser.refs, "the report references no files"
    for ref in parser.refs:
        assert "://" not in ref and not ref.startswith("//"), f"external reference {ref}"
        assert (out / ref).is_file(), f"report.html references missing {ref}"
    assert "script" not in parser.tags and "link" not in parser.tags  # nothing to fetch, nothing to run


def test_chromium_renders_the_table_and_the_images(evaluation, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    state = render_page(evaluation["out"] / "report.html", tmp_path / "report.png", chromium=chromium)
    assert state.title.startswith("bp-ray evaluation")
    assert state.tables["results"]["rows"] == 1 + len(SYSTEMS)  # header + one row per system
    assert state.tables["grid"]["rows"] == 1 + GRID
    assert state.tables["results"]["box"]["height"] > 50
    assert state.images == state.loaded and not state.broken, state.broken
    assert state.images >= len(SYSTEMS) * GRID * SEEDS + 3  # grid images plus the plots
    assert not state.console_errors
    shot = np.asarray(Image.open(state.screenshot).convert("RGB")).astype(float)
    assert shot.shape[1] == 1400 and shot.shape[0] >= state.first_grid_image["y"] + 96
    # the first grid image is drawn where the page put it: a noisy 96x96 render, not the white page
    box = state.first_grid_image
    x, y = int(box["x"]), int(box["y"])
    patch = shot[y + 4:y + int(box["height"]) - 4, x + 4:x + int(box["width"]) - 4]
    assert patch.std() > 10 and abs(patch.mean() - 255) > 20
