"""Synthetic DiffusionDB-shaped corpus: determinism, schema, prompt mix, on-disk layout, idempotence."""

import json
import re
import zipfile
from io import BytesIO
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bp_ray.data import columns as C
from bp_ray.data.corpus import (
    DIFFUSIONDB_SCHEMA,
    CorpusSpec,
    generate_corpus_rows,
    generate_prompts,
    render_row_image,
    write_corpus,
)
from bp_ray.data.vocab import load_vocab, tag_terms

SMALL = CorpusSpec(num_rows=300, seed=3, image_size=16, rows_per_part=100)


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The default 2,000-row spec written once: (out_dir, summary, metadata rows)."""
    out_dir = tmp_path_factory.mktemp("corpus")
    summary = write_corpus(out_dir, CorpusSpec())
    return out_dir, summary, pd.read_parquet(out_dir / "metadata.parquet")


def test_vocab_lists_are_filled_and_tag_terms_are_lowercase():
    vocab = load_vocab()
    assert len(vocab.subjects) >= 50 and len(vocab.artists) >= 40 and len(vocab.styles) >= 40
    assert "greg rutkowski" in vocab.artists and "nsfw" in vocab.nsfw_terms
    assert set(vocab.colors) <= set(vocab.color_rgb)
    terms = tag_terms(vocab)
    assert "trending on artstation" in terms and all(t == t.lower() for t in terms)
    assert load_vocab() is vocab  # cached


def test_same_seed_gives_identical_rows_and_image_bytes(tmp_path: Path):
    pd.testing.assert_frame_equal(generate_corpus_rows(SMALL), generate_corpus_rows(SMALL))
    write_corpus(tmp_path / "a", SMALL)
    write_corpus(tmp_path / "b", SMALL)
    for part in ("part-000001.zip", "part-000002.zip", "part-000003.zip"):
        assert (tmp_path / "a/images" / part).read_bytes() == (tmp_path / "b/images" / part).read_bytes()


def test_different_seed_gives_different_corpus():
    first = generate_corpus_rows(SMALL)
    other = generate_corpus_rows(CorpusSpec(num_rows=300, seed=4, image_size=16, rows_per_part=100))
    assert (first[C.PROMPT] != other[C.PROMPT]).mean() > 0.9
    assert not set(first[C.IMAGE_NAME]) & set(other[C.IMAGE_NAME])


def test_generate_prompts_matches_the_corpus_prompts():
    assert generate_prompts(300, seed=3, spec=SMALL) == generate_corpus_rows(SMALL)[C.PROMPT].tolist()
    assert generate_prompts(50, seed=1) == generate_prompts(50, seed=1)


def test_columns_and_dtypes_match_diffusiondb(default_corpus):
    out_dir, _, _ = default_corpus
    rows = generate_corpus_rows(SMALL)
    assert tuple(rows.columns) == C.DIFFUSIONDB_COLUMNS
    expected = {C.PART_ID: "uint16", C.SEED: "uint32", C.STEP: "uint16", C.CFG: "float32", C.SAMPLER: "uint8",
                C.WIDTH: "uint16", C.HEIGHT: "uint16", C.IMAGE_NSFW: "float32", C.PROMPT_NSFW: "float32",
                C.TIMESTAMP: "datetime64[us, UTC]"}
    assert {name: str(rows[name].dtype) for name in expected} == expected
    for name in (C.IMAGE_NAME, C.PROMPT, C.USER_NAME):
        assert pd.api.types.is_string_dtype(rows[name])
    assert pq.read_schema(out_dir / "metadata.parquet").remove_metadata().equals(DIFFUSIONDB_SCHEMA)
    assert rows[C.SAMPLER].between(1, 8).all()
    assert rows[C.IMAGE_NAME].str.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\.png").all()
    assert rows[C.IMAGE_NAME].is_unique


def test_kind_counts_follow_the_fractions(default_corpus):
    _, summary, _ = default_corpus
    # 2,000 rows: plain 0.35 -> 700, duplicate 0.05 -> 100, nsfw 0.03 -> 60, political 0.01 -> 20,
    # malformed 0.02 -> 40, rich = the remaining 1,080
    assert summary.kind_counts == {"plain": 700, "rich": 1080, "duplicate": 100, "nsfw": 60, "political": 20,
                                   "malformed": 40}
    assert summary.num_rows == 2000 and summary.num_parts == 2 and summary.num_images == 2000


def test_prompt_mix_is_visible_in_the_data(default_corpus):
    _, _, rows = default_corpus
    prompts = rows[C.PROMPT]
    words = prompts.str.split().str.len()
    # plain prompts: subject (2-4 words) + optional setting (2-4 words)
    assert ((words >= 1) & (words <= 6)).sum() >= 500
    assert (words >= 10).sum() >= 500  # subject + setting + 2-8 tags
    assert prompts.str.contains(r"\([^()]+:1\.\d\)").sum() >= 20  # (highly detailed:1.2)
    assert prompts.str.contains(r"\(\([^()]+\)\)").any() and prompts.str.contains(r"\[[^\[\]]+\]").any()
    assert prompts.str.contains(" --no ", regex=False).any()
    assert prompts.str.contains("Negative prompt: ", regex=False).any()
    assert prompts.str.contains("by greg rutkowski|art by ", regex=True).any()

    # about half of the 100 duplicates are exact copies; case/whitespace variants only match once normalised
    exact = prompts[prompts.str.strip() != ""].duplicated().sum()
    normalised = prompts.str.lower().str.split().str.join(" ")
    assert exact >= 30
    assert normalised[normalised != ""].duplicated().sum() > exact

    nsfw_terms = load_vocab().nsfw_terms
    flagged = rows[rows[C.PROMPT_NSFW] > 0.5]
    assert len(flagged) >= 60 and (rows[C.IMAGE_NSFW] > 0.5).sum() >= 60
    assert flagged[C.PROMPT].map(lambda p: any(t in p for t in nsfw_terms)).mean() > 0.9
    assert (rows[C.IMAGE_NSFW] == 2.0).any()  # DiffusionDB's "already blurred" score
    assert rows[C.PROMPT_NSFW].median() < 0.1

    assert (prompts == "").any() and ((prompts != "") & (prompts.str.strip() == "")).any()
    assert (prompts.str.len() > 1000).any()
    assert prompts.str.contains("\x00", regex=False).any()
    assert prompts.str.contains("(masterpiece:1.3,", regex=False).any()


def test_write_corpus_layout_matches_diffusiondb(default_corpus):
    out_dir, summary, rows = default_corpus
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == ["part-000001.zip", "part-000002.zip"]
    for part_id, part in rows.groupby(C.PART_ID):
        name = f"part-{part_id:06d}"
        with zipfile.ZipFile(out_dir / "images" / f"{name}.zip") as archive:
            assert sorted(archive.namelist()) == sorted([*part[C.IMAGE_NAME], f"{name}.json"])
            index = json.loads(archive.read(f"{name}.json"))
            first = part.iloc[0]
            assert index[first[C.IMAGE_NAME]] == {
                "p": first[C.PROMPT], "se": int(first[C.SEED]), "c": float(first[C.CFG]),
                "st": int(first[C.STEP]), "sa": C.SAMPLER_NAMES[int(first[C.SAMPLER])],
            }
            image = Image.open(BytesIO(archive.read(first[C.IMAGE_NAME])))
            assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    recorded = json.loads((out_dir / "corpus.json").read_text())
    assert recorded["spec"]["num_rows"] == 2000 and recorded["summary"]["kind_counts"] == summary.kind_counts
    assert summary.bytes_on_disk > 0


def test_write_corpus_is_idempotent_and_regenerates_on_a_new_spec(tmp_path: Path):
    first = write_corpus(tmp_path, SMALL)
    metadata_mtime = (tmp_path / "metadata.parquet").stat().st_mtime_ns
    assert write_corpus(tmp_path, SMALL) == first
    assert (tmp_path / "metadata.parquet").stat().st_mtime_ns == metadata_mtime

    (tmp_path / "images" / "part-000002.zip").unlink()  # a half-deleted corpus is rebuilt, not trusted
    assert write_corpus(tmp_path, SMALL) == first and (tmp_path / "images" / "part-000002.zip").is_file()

    smaller = CorpusSpec(num_rows=120, seed=3, image_size=16, rows_per_part=100)
    second = write_corpus(tmp_path, smaller)
    assert second.num_rows == 120 and second.num_parts == 2
    # the old third part must not linger next to the new corpus
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["part-000001.zip", "part-000002.zip"]


def test_without_images_only_metadata_is_written(tmp_path: Path):
    summary = write_corpus(tmp_path, CorpusSpec(num_rows=50, with_images=False))
    assert summary.num_images == 0 and not (tmp_path / "images").exists()
    assert len(pd.read_parquet(tmp_path / "metadata.parquet")) == 50


def test_render_row_image_uses_colour_words_and_is_deterministic():
    image = render_row_image("a red car, highly detailed", seed=7, size=24)
    assert image.size == (24, 24) and image.mode == "RGB"
    # the top row is unshaded background except where the disc (radius <= 0.4 of the side) covers it
    assert (200, 40, 40) in [image.getpixel((x, 0)) for x in range(24)]
    assert image.tobytes() == render_row_image("a red car, highly detailed", seed=7, size=24).tobytes()
    assert image.tobytes() != render_row_image("a red car, highly detailed", seed=8, size=24).tobytes()


@pytest.mark.parametrize("fractions", [{"plain_fraction": 0.9, "nsfw_fraction": 0.2}, {"nsfw_fraction": -0.1}])
def test_invalid_fractions_are_rejected(fractions: dict):
    with pytest.raises(ValueError, match="fractions"):
        CorpusSpec(**fractions)


def test_generated_weights_syntax_is_balanced_for_rich_prompts():
    # Only malformed rows may carry unbalanced brackets; everything else must parse for A1111-style tools.
    rows = generate_corpus_rows(CorpusSpec(num_rows=500, seed=11, malformed_fraction=0.0))
    unbalanced = rows[C.PROMPT].map(lambda p: p.count("(") != p.count(")") or p.count("[") != p.count("]"))
    assert not unbalanced.any()
    assert not rows[C.PROMPT].map(lambda p: bool(re.search(r"[\x00-\x08\x1b]", p))).any()
