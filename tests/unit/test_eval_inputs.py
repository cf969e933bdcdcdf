"""The evaluation's inputs without Ray: the embedded prompt set, prompt files, and the `tags` baseline."""

from __future__ import annotations

import pytest

from bp_ray.config_loader import load_config
from bp_ray.data.corpus import generate_prompts
from bp_ray.data.prompt_sources import VocabPrompts
from bp_ray.eval.prompts import EMBEDDED_SEED, load_eval_prompts
from bp_ray.eval.systems import checkpoint_model_dir, popular_tags, with_tags
from tests.conftest import shared_path


def sections(cfg):
    """What load_eval_prompts reads of a config."""
    return cfg.eval, cfg.data


def test_the_embedded_set_is_distinct_deterministic_and_held_out_from_the_corpus():
    cfg = load_config("tiny", ["eval.num_prompts=0"])
    corpus = {p.strip().lower() for p in generate_prompts(cfg.data.corpus_rows, cfg.data.corpus_seed)}
    prompts, report = load_eval_prompts(cfg.eval, cfg.data)
    assert report is None and len(prompts) == 200
    assert len({p.lower() for p in prompts}) == 200 and not {p.lower() for p in prompts} & corpus
    assert prompts == load_eval_prompts(cfg.eval, cfg.data)[0]
    # the exclusion is what holds it out: without it, some corpus prompts come back
    assert {p.lower() for p in VocabPrompts().eval_prompts(200, EMBEDDED_SEED, set())} & corpus


def test_num_prompts_caps_the_set():
    assert len(load_eval_prompts(*sections(load_config("tiny", ["eval.num_prompts=7"])))[0]) == 7


def test_a_prompt_file_is_read_in_order_with_bad_rows_skipped_and_counted(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a cat on a sofa"}\nnot json\n{"prompt": ""}\n{"prompt": "a red fox"}\n')
    prompts, report = load_eval_prompts(*sections(load_config("tiny")), path)
    assert prompts == ["a cat on a sofa", "a red fox"]
    assert sum(report.rows_skipped.values()) == 2


def test_a_csv_prompt_file_is_read(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('prompt,category\n"a cat, sitting",animals\na dog,animals\n')
    assert load_eval_prompts(*sections(load_config("tiny")), path)[0] == ["a cat, sitting", "a dog"]


def test_the_real_drawbench_prompts_load():
    path = shared_path("data", "prompts", "drawbench.jsonl")
    prompts, _ = load_eval_prompts(*sections(load_config("tiny", ["eval.num_prompts=0"])), path)
    assert len(prompts) > 100 and all(p.strip() for p in prompts)


def test_popular_tags_are_the_most_frequent_vocabulary_tags_with_ties_in_vocabulary_order():
    pool = ["a cat, highly detailed, 8k", "a dog, 8k, oil painting", "a fox, 8k, highly detailed", "a bird, sofa"]
    # 8k in 3 prompts, highly detailed in 2, oil painting in 1; "sofa" is no tag
    assert popular_tags(pool, 3) == ["8k", "highly detailed", "oil painting"]
    counted_once = popular_tags(["a cat, 8k, 8k, 8k", "a dog, highly detailed", "a fox, highly detailed"], 2)
    assert counted_once == ["highly detailed", "8k"]  # a tag counts once per prompt


def test_popular_tags_top_up_from_the_vocabulary_when_the_pool_has_too_few():
    tags = popular_tags(["a cat, 8k"], 4)
    assert tags[0] == "8k" and len(tags) == len(set(tags)) == 4


def test_with_tags_appends_only_missing_tags():
    assert with_tags("A cat on a sofa.", ["8k", "highly detailed"]) == "A cat on a sofa, 8k, highly detailed"
    assert with_tags("a cat, 8k", ["8k", "highly detailed"]) == "a cat, 8k, highly detailed"
    assert with_tags("a cat, 8k", ["8k"]) == "a cat, 8k"


def test_a_checkpoint_is_a_stage_folder_or_a_model_folder(tmp_path):
    (tmp_path / "sft" / "model").mkdir(parents=True)
    (tmp_path / "sft" / "model" / "config.json").write_text("{}")
    assert checkpoint_model_dir(tmp_path / "sft") == tmp_path / "sft" / "model"
    assert checkpoint_model_dir(tmp_path / "sft" / "model") == tmp_path / "sft" / "model"
    with pytest.raises(FileNotFoundError, match="no Hugging Face model at"):
        checkpoint_model_dir(tmp_path / "nothing")
