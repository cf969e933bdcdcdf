"""The miniature world: scenes, their descriptions, rendering and the pixel ground truth (no models)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bp_ray.embedded.world.scenes import (
    BAD_STYLES,
    COLOURS,
    GOOD_STYLES,
    SHAPES,
    STYLE_WORDS,
    Scene,
    WorldObject,
    parse_description,
    render_scene,
    render_text,
    sample_scenes,
)
from bp_ray.embedded.world.truth import (
    aesthetic_terms,
    colours_match,
    count_matches,
    dominant_colour,
    object_count,
    objects_seen,
    shapes_match,
    true_aesthetic,
)

SINGLES = [Scene((WorldObject(c, s),)) for c in COLOURS for s in SHAPES]


def _mean_truth(styles: tuple[str, ...], seeds: range = range(4)) -> float:
    return float(np.mean([true_aesthetic(render_scene(Scene(base.objects, None, styles), 97 * seed + i))
                          for i, base in enumerate(SINGLES) for seed in seeds]))


def test_scenes_are_seedable_and_describe_themselves():
    first, again, other = sample_scenes(50, 3), sample_scenes(50, 3), sample_scenes(50, 4)
    assert first == again and first != other
    for scene in first:
        assert parse_description(scene.detailed()) == scene  # the detailed text says everything about the scene
        plain = parse_description(scene.plain())
        assert [(o.colour, o.shape) for o in plain.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert plain.styles == () and all(o.size is None for o in plain.objects)
        assert len(scene.styles) >= 3 and "," not in scene.plain()


def test_parse_reads_any_text_and_first_contradiction_wins():
    assert parse_description("a cat on a sofa, trending on artstation").objects == ()
    scene = parse_description("An Orange Circle,  sharp, blurry, dark background")
    assert scene.objects == (WorldObject("orange", "circle"),)
    assert scene.styles == ("dark background", "sharp")
    assert parse_description("a small red square below a large blue triangle").relation == "below"


def test_render_is_deterministic_and_leaves_open_what_the_text_leaves_open():
    one = render_text("a red circle", seed=1)
    assert one.shape == (32, 32, 3) and one.dtype == np.uint8
    assert np.array_equal(one, render_text("a red circle", seed=1))
    assert not np.array_equal(one, render_text("a red circle", seed=2))
    assert render_text("a red circle", seed=1, size=16).shape == (16, 16, 3)


def test_every_style_phrase_moves_the_ground_truth_its_declared_way():
    assert set(GOOD_STYLES) | set(BAD_STYLES) == set(STYLE_WORDS)
    plain = _mean_truth(())
    for phrase in GOOD_STYLES:
        assert _mean_truth((phrase,)) > plain + 0.2, phrase
    for phrase in BAD_STYLES:
        assert _mean_truth((phrase,)) < plain - 0.2, phrase
    assert _mean_truth(("dark background", "high contrast", "sharp", "smooth", "centered")) > 8.0
    assert _mean_truth(("low contrast", "blurry", "grainy")) < 3.0


def test_truth_terms_respond_to_the_property_they_name():
    crisp = render_text("a large blue square, dark background, high contrast, sharp, smooth, centered", 5)
    terms = aesthetic_terms(crisp)
    assert all(value > 0.8 for value in terms.values()), terms
    noisy = np.clip(crisp.astype(float) + np.random.default_rng(0).normal(0, 40, crisp.shape), 0, 255)
    assert aesthetic_terms(noisy.astype(np.uint8))["cleanliness"] < 0.2
    blurred = np.asarray(Image.fromarray(crisp).resize((8, 8)).resize((32, 32), Image.BILINEAR))
    assert aesthetic_terms(blurred)["sharpness"] < terms["sharpness"] - 0.3
    corner = render_text("a small blue square, dark background, high contrast, sharp, smooth", 5)
    if aesthetic_terms(corner)["composition"] < 0.99:  # a small off-centre square scores lower on composition
        assert aesthetic_terms(corner)["composition"] < terms["composition"]
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert true_aesthetic(flat) < 2.5 and dominant_colour(flat) is None
    with pytest.raises(ValueError, match="RGB"):
        true_aesthetic(np.zeros((32, 32)))


def test_colour_check_reads_the_colours_a_request_names():
    hits = [dominant_colour(render_text(f"a {c} {s}, high contrast, sharp", seed)) == c
            for c in COLOURS for s in SHAPES for seed in range(3)]
    assert np.mean(hits) > 0.95
    two = render_text("a red circle left of a blue square, high contrast, dark background", 3)
    assert colours_match(two, "a red circle and a blue square")
    assert not colours_match(two, "a green triangle")
    assert colours_match(two, "a cat on a sofa") is None


def _world_checks(scenes: list[Scene], check) -> float:
    return float(np.mean([check(render_scene(scene, 31 * i), scene.detailed()) for i, scene in enumerate(scenes)]))


def test_colour_check_finds_faded_objects_in_the_worlds_own_renders():
    scenes = sample_scenes(300, 21)
    assert _world_checks(scenes, colours_match) > 0.95  # every style, low contrast and glow included
    faded = [Scene(s.objects, s.relation, ("low contrast",)) for s in scenes[:60]]
    assert _world_checks(faded, colours_match) > 0.9


def test_shape_and_count_checks_read_the_worlds_own_renders():
    crisp = [Scene(s.objects, s.relation, ("high contrast", "sharp", "smooth")) for s in sample_scenes(300, 22)]
    assert _world_checks(crisp, shapes_match) > 0.85
    assert _world_checks(crisp, count_matches) > 0.95
    every_style = sample_scenes(300, 23)
    assert _world_checks(every_style, count_matches) > 0.85
    for shape in SHAPES:
        image = render_text(f"a large red {shape}, dark background, high contrast, sharp, smooth, centered", 4)
        assert objects_seen(image) == [("red", shape)]
        others = [s for s in SHAPES if s != shape]
        assert shapes_match(image, f"a red {shape}") and not shapes_match(image, f"a red {others[0]}")
        assert not shapes_match(image, f"a blue {shape}")  # a shape of another colour is not the one asked for
    two = render_text("a large red circle left of a large blue square, high contrast, dark background, sharp", 3)
    assert object_count(two) == 2 and count_matches(two, "a red circle and a blue square")
    assert not count_matches(two, "a red circle")
    assert shapes_match(two, "a red circle and a blue square")
    assert not shapes_match(two, "a red square and a blue circle")  # both colours and shapes, but swapped
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert object_count(flat) == 0 and not count_matches(flat, "a red circle")
    assert shapes_match(flat, "a cat on a sofa") is None and count_matches(flat, "a cat") is None


def test_world_corpus_stores_the_world_render_of_each_prompt(tmp_path):
    from bp_ray.data.corpus import CorpusSpec, generate_prompts, write_corpus

    write_corpus(tmp_path, CorpusSpec(num_rows=60, seed=1, prompt_source="world"))
    rows = pd.read_parquet(tmp_path / "metadata.parquet")
    assert rows["prompt"].tolist() == generate_prompts(60, 1, CorpusSpec(prompt_source="world"))
    described = [i for i, p in enumerate(rows["prompt"]) if parse_description(p).objects]
    assert len(described) > 40  # plain and rich rows are world scenes; nsfw, political and junk rows stay
    with zipfile.ZipFile(tmp_path / "images" / "part-000001.zip") as archive:
        for i in described[:5]:
            stored = np.asarray(Image.open(io.BytesIO(archive.read(rows["image_name"][i]))))
            assert np.array_equal(stored, render_text(rows["prompt"][i], int(rows["seed"][i])))


def test_world_preset_builds_on_tiny():
    from bp_ray.config_loader import load_config

    world, tiny = load_config("world"), load_config("tiny")
    assert world.preset == "world" and world.models.diffusion == "world:sd"
    assert world.data.corpus_kind == "world" and world.eval.metrics == ["world_truth"]
    assert world.sft.lr == tiny.sft.lr and world.cluster.num_cpus == tiny.cluster.num_cpus


def test_world_eval_prompts_and_tags():
    from bp_ray.config_loader import load_config
    from bp_ray.eval.prompts import embedded_eval_prompts, load_eval_prompts
    from bp_ray.eval.systems import popular_tags, tag_vocabulary, tags_pool

    prompts = embedded_eval_prompts(load_config("world").data)
    assert len(prompts) == len(set(prompts)) == 200
    assert all(parse_description(p).objects and parse_description(p).styles == () for p in prompts)
    assert {len(parse_description(p).objects) for p in prompts[:4]} == {1, 2}
    cfg = load_config("world", ["eval.num_prompts=6"])
    assert load_eval_prompts(cfg.eval, cfg.data)[0] == prompts[:6]
    tags = popular_tags(tags_pool(cfg.eval, cfg.data), 4, tag_vocabulary(cfg.data))
    assert len(tags) == 4 and set(tags) <= set(STYLE_WORDS)


def test_styled_prompts_are_plain_requests_with_style_phrases():
    from bp_ray.embedded.world.scenes import STYLE_GROUPS
    from bp_ray.embedded.world.sd_training import styled_prompts

    scenes = sample_scenes(400, 5)
    prompts = styled_prompts(scenes, seed=1)
    assert prompts == styled_prompts(scenes, seed=1) and prompts != styled_prompts(scenes, seed=2)
    for scene, prompt in zip(scenes, prompts, strict=True):
        assert prompt.split(", ")[0] == scene.plain()
        parsed = parse_description(prompt)
        assert [(o.colour, o.shape) for o in parsed.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert len(parsed.styles) == len(prompt.split(", ")) - 1  # no contradictions: one phrase a group at most
    written = [phrase for prompt in prompts for phrase in prompt.split(", ")[1:]]
    assert set(written) == set(STYLE_WORDS)
    assert any("," not in p for p in prompts) and any(p.count(",") == len(STYLE_GROUPS) for p in prompts)
