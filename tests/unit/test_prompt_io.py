"""read_prompts on every source kind: DiffusionDB's own layout, our corpus, JSONL, CSV/TSV/txt, errors."""

import json
import math
import zipfile
from io import BytesIO
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bp_ray.data import columns as C
from bp_ray.data.corpus import CorpusSpec, write_corpus
from bp_ray.data.prompt_io import iter_diffusiondb_images, load_image, read_prompts

SHARED_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"

# Six DiffusionDB rows: part 1 ships as a zip, part 2 as an unzipped folder, part 3 is not downloaded,
# and one row has a null prompt.
_NAMES = [f"{i:08x}-aef7-4225-a9e9-f516527408ac.webp" for i in range(6)]
_PROMPTS = ["a castle, by greg rutkowski", "a cat", "", None, "portrait of a knight, 8 k", "a fox"]
_PARTS = [1, 1, 1, 2, 2, 3]
_SIZES = [(24, 16), (16, 24), (20, 20), (16, 16), (12, 28), (8, 8)]


def _write_diffusiondb(root: Path, metadata_name: str = "metadata.parquet", parts_dir: str = "images") -> None:
    """A tiny dataset in DiffusionDB's own layout, written without our corpus code."""
    table = pa.table({
        "image_name": pa.array(_NAMES, pa.string()),
        "prompt": pa.array(_PROMPTS, pa.string()),
        "part_id": pa.array(_PARTS, pa.uint16()),
        "seed": pa.array([38753269 + i for i in range(6)], pa.uint32()),
        "step": pa.array([50] * 6, pa.uint16()),
        "cfg": pa.array([7.0, 12.0, 7.5, 7.0, 7.0, 8.0], pa.float32()),
        "sampler": pa.array([8, 8, 1, 3, 8, 8], pa.uint8()),
        "width": pa.array([w for w, _ in _SIZES], pa.uint16()),
        "height": pa.array([h for _, h in _SIZES], pa.uint16()),
        "user_name": pa.array(["e285b7ef63be99e9107cecd79b280bde602f17e0ca8363cb7a0889b67f0b5ed0"] * 5
                              + ["deleted_account"], pa.string()),
        "timestamp": pa.array([pd.Timestamp("2022-08-11 09:05", tz="UTC")] * 6, pa.timestamp("us", tz="UTC")),
        "image_nsfw": pa.array([0.08, 0.69, 0.07, 0.9, 2.0, 0.2], pa.float32()),
        "prompt_nsfw": pa.array([0.004, 0.1, 0.02, 0.9, 0.01, 0.03], pa.float32()),
    })
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / metadata_name)

    def webp(size: tuple[int, int]) -> bytes:
        buffer = BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buffer, format="WEBP", lossless=True)
        return buffer.getvalue()

    images = root / parts_dir
    images.mkdir(parents=True, exist_ok=True)
    index = {name: {"p": prompt, "se": 1, "c": 7.0, "st": 50, "sa": "k_lms"}
             for name, prompt, part in zip(_NAMES, _PROMPTS, _PARTS, strict=True) if part == 1}
    with zipfile.ZipFile(images / "part-000001.zip", "w") as archive:
        for name, part, size in zip(_NAMES, _PARTS, _SIZES, strict=True):
            if part == 1:
                archive.writestr(name, webp(size))
        archive.writestr("part-000001.json", json.dumps(index))
    (images / "part-000002").mkdir()
    for name, part, size in zip(_NAMES, _PARTS, _SIZES, strict=True):
        if part == 2:
            (images / "part-000002" / name).write_bytes(webp(size))


# (a) DiffusionDB's layout


def test_diffusiondb_layout_reads_every_row_once_with_loadable_images(tmp_path: Path):
    _write_diffusiondb(tmp_path)
    table, report = read_prompts(tmp_path)

    # 6 rows - 1 null prompt = 5; the empty prompt is kept for the cleaning stage
    assert report.rows_read == 5 and report.rows_skipped == {"missing_prompt": 1}
    assert tuple(table.columns[:6]) == C.PROMPT_TABLE_COLUMNS
    assert sorted(table[C.ROW_ID]) == sorted(n for n, p in zip(_NAMES, _PROMPTS, strict=True) if p is not None)
    assert table[C.ROW_ID].is_unique and (table[C.SOURCE] == "diffusiondb").all()
    assert "" in set(table[C.PROMPT])
    assert table[C.PROMPT_NSFW].dtype == "float64" and table[C.IMAGE_NSFW].max() == 2.0

    by_name = table.set_index(C.ROW_ID)
    assert by_name.loc[_NAMES[0], C.IMAGE_REF].endswith(f"part-000001.zip::{_NAMES[0]}")
    assert by_name.loc[_NAMES[5], C.IMAGE_REF] == ""  # part 3 was never downloaded
    for name, row in by_name.iterrows():
        if row[C.IMAGE_REF]:
            assert load_image(row[C.IMAGE_REF]).size == (row[C.WIDTH], row[C.HEIGHT]), name


def test_diffusiondb_limit_and_metadata_file_path(tmp_path: Path):
    _write_diffusiondb(tmp_path)
    table, report = read_prompts(tmp_path, limit=2)
    assert table[C.ROW_ID].tolist() == _NAMES[:2] and report.rows_read == 2
    from_file, _ = read_prompts(tmp_path / "metadata.parquet")  # the table itself, not the folder
    assert len(from_file) == 5 and from_file[C.IMAGE_REF].str.contains("::").sum() == 3


def test_diffusiondb_large_layout(tmp_path: Path):
    _write_diffusiondb(tmp_path, "metadata-large.parquet", "diffusiondb-large-part-1")
    table, _ = read_prompts(tmp_path)
    refs = table.set_index(C.ROW_ID)[C.IMAGE_REF]
    assert "diffusiondb-large-part-1/part-000001.zip::" in refs[_NAMES[0]]
    assert load_image(refs[_NAMES[4]]).size == _SIZES[4]


def test_iter_diffusiondb_images_covers_zip_and_folder_parts(tmp_path: Path):
    _write_diffusiondb(tmp_path)
    wanted = [_NAMES[4], _NAMES[0], _NAMES[3]]
    images = dict(iter_diffusiondb_images(tmp_path, wanted))
    assert {name: image.size for name, image in images.items()} == {n: _SIZES[_NAMES.index(n)] for n in wanted}
    with pytest.raises(KeyError, match="not in"):
        list(iter_diffusiondb_images(tmp_path, ["nope.webp"]))
    with pytest.raises(FileNotFoundError, match="part 3"):
        list(iter_diffusiondb_images(tmp_path, [_NAMES[5]]))


# (b) our corpus goes through the same path


def test_generated_corpus_reads_like_diffusiondb(tmp_path: Path):
    spec = CorpusSpec(num_rows=150, seed=2, image_size=16, rows_per_part=100)
    write_corpus(tmp_path, spec)
    table, report = read_prompts(tmp_path)
    metadata = pd.read_parquet(tmp_path / "metadata.parquet")
    assert report.rows_read == 150 and report.rows_skipped == {}
    assert table[C.PROMPT].tolist() == metadata[C.PROMPT].tolist()
    assert table[C.ROW_ID].tolist() == metadata[C.IMAGE_NAME].tolist()
    assert table[C.IMAGE_REF].str.contains("part-00000[12].zip::", regex=True).all()
    assert load_image(table[C.IMAGE_REF].iloc[-1]).size == (16, 16)
    assert len(dict(iter_diffusiondb_images(tmp_path, table[C.ROW_ID]))) == 150


# (c) the shared JSON Lines files


def _shared(name: str) -> Path:
    path = SHARED_PROMPTS / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def test_drawbench_reads_one_row_per_line():
    path = _shared("drawbench.jsonl")
    num_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    table, report = read_prompts(path)
    assert len(table) == num_lines == report.rows_read and report.rows_skipped == {}
    assert table[C.ROW_ID].iloc[0] == "drawbench:1" and (table[C.SOURCE] == "drawbench").all()
    assert "category" in table.columns and table[C.PROMPT_NSFW].isna().all()


def test_partiprompts_keeps_its_extra_fields():
    path = _shared("partiprompts.jsonl")
    table, report = read_prompts(path)
    assert len(table) == len(path.read_text(encoding="utf-8").splitlines()) and report.rows_skipped == {}
    assert {"category", "challenge"} <= set(table.columns) and (table[C.IMAGE_REF] == "").all()


def test_discord_sample_with_limit():
    table, report = read_prompts(_shared("sd_discord_prompts_sample20k.jsonl"), limit=100)
    assert len(table) == 100 == report.rows_read and table[C.ROW_ID].is_unique
    assert (table[C.SOURCE] == "sd_discord_beta").all()  # the rows' own source field wins over the file stem
    assert table[C.ROW_ID].iloc[-1] == "sd_discord_prompts_sample20k:100"


# (d) malformed JSON Lines


def test_malformed_json_lines_are_skipped_and_counted(tmp_path: Path):
    lines = [
        b'{"prompt": "a cat on a sofa", "category": "plain", "tags": ["nested", "dropped"]}',
        b'{"prompt": "a dog", "prompt_nsfw": 0.25',  # truncated
        b'{"text": "falls back to text"}',
        b'{"caption": "falls back to caption", "image_path": "img/cat.png"}',
        b'{"foo": 1}',
        b'{"prompt": 5}',
        b'{"prompt": null}',
        b"",
        b"   ",
        b'{"prompt": ""}',
        b"[1, 2]",
        b'"a bare string prompt"',
        b'{"prompt": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"prompt": "last good row", "prompt_nsfw": 0.75, "source": "mine"}',
    ]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    table, report = read_prompts(path)

    assert table[C.PROMPT].tolist() == ["a cat on a sofa", "falls back to text", "falls back to caption", "",
                                        "a bare string prompt", "last good row"]
    assert report.rows_read == 6
    assert report.rows_skipped == {"invalid_json": 1, "missing_prompt": 2, "non_text_prompt": 1, "blank_line": 2,
                                   "not_an_object": 1, "invalid_utf8": 1}
    assert table[C.ROW_ID].tolist() == ["messy:1", "messy:3", "messy:4", "messy:10", "messy:12", "messy:14"]
    last = table.iloc[-1]
    assert last[C.PROMPT_NSFW] == 0.75 and last[C.SOURCE] == "mine" and math.isnan(table[C.IMAGE_NSFW].iloc[0])
    assert table[C.IMAGE_REF].iloc[2] == str((tmp_path / "img" / "cat.png").resolve())
    assert table["category"].iloc[0] == "plain" and "tags" not in table.columns


def test_json_array_file(tmp_path: Path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"prompt": "a"}, "b", {"prompt": 3}]))
    table, report = read_prompts(path)
    assert table[C.PROMPT].tolist() == ["a", "b"] and report.rows_skipped == {"non_text_prompt": 1}


# (e) CSV, TSV, txt, generic Parquet


def test_csv_with_prompt_header_and_quoted_commas(tmp_path: Path):
    path = tmp_path / "prompts.csv"
    path.write_text('id,Prompt,category\n1,"a cat, on a sofa",animals\n2,,empty\n3\n\n4,"a ""quoted"" dog",x\n')
    table, report = read_prompts(path)
    assert table[C.PROMPT].tolist() == ["a cat, on a sofa", "", 'a "quoted" dog']
    assert report.rows_skipped == {"missing_prompt": 1, "blank_line": 1}
    assert table["category"].tolist() == ["animals", "empty", "x"] and "Prompt" not in table.columns
    assert table[C.ROW_ID].tolist() == ["prompts:1", "prompts:2", "prompts:5"]


def test_tsv_without_prompt_column_uses_the_first(tmp_path: Path):
    path = tmp_path / "parti.tsv"
    path.write_text("Text\tCategory\nbond\tAbstract\na red car\tVehicles\n")
    table, _ = read_prompts(path, limit=1)
    assert table[C.PROMPT].tolist() == ["bond"] and table["Category"].tolist() == ["Abstract"]


def test_txt_keeps_blank_lines_as_empty_prompts(tmp_path: Path):
    path = tmp_path / "plain.txt"
    path.write_text("a cat\n\n  a dog  \r\na fox\n", encoding="utf-8")
    table, report = read_prompts(path)
    assert table[C.PROMPT].tolist() == ["a cat", "", "  a dog  ", "a fox"] and report.rows_skipped == {}
    assert table[C.ROW_ID].tolist() == ["plain:1", "plain:2", "plain:3", "plain:4"]


def test_generic_parquet_with_text_column(tmp_path: Path):
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "score": [1.0, 2.0, 3.0]}), path)
    table, report = read_prompts(path)
    assert table[C.PROMPT].tolist() == ["a", "c"] and report.rows_skipped == {"missing_prompt": 1}
    assert table["score"].tolist() == [1.0, 3.0] and (table[C.SOURCE] == "captions").all()
    assert table[C.ROW_ID].tolist() == ["captions:1", "captions:3"]  # file positions, not renumbered


# (f) errors


def test_unsupported_extension_lists_the_formats(tmp_path: Path):
    path = tmp_path / "prompts.xml"
    path.write_text("<prompts/>")
    with pytest.raises(ValueError, match=r"unsupported prompt source .*\.jsonl"):
        read_prompts(path)


def test_missing_path_and_folder_without_metadata(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        read_prompts(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match=r"metadata\.parquet"):
        read_prompts(tmp_path)
    with pytest.raises(ValueError, match="empty image_ref"):
        load_image("")


def test_extra_sources_are_appended_and_their_bad_rows_counted(tmp_path: Path):
    from bp_ray.cli import build_parser, config_from_args
    from bp_ray.data.pipeline import read_source

    first, second = tmp_path / "pool_a.jsonl", tmp_path / "pool_b.txt"
    first.write_text('{"prompt": "a castle, oil painting"}\nnot json\n{"prompt": "a cat"}\n')
    second.write_text("a fox in snow, 8k\n\na dog\n")
    args = build_parser().parse_args(["data", "generate", "--prompts", str(first), str(second), "--set",
                                      "data.limit=5"])
    cfg = config_from_args(args)
    assert (cfg.data.source, cfg.data.extra_sources) == (str(first), [str(second)])
    table, report, described = read_source(cfg.data, tmp_path / "corpus")
    # a blank text line is a row (cleaning drops it as `empty`); a bad JSON line is skipped and counted
    assert table[C.PROMPT].tolist() == ["a castle, oil painting", "a cat", "a fox in snow, 8k", "", "a dog"]
    assert table[C.ROW_ID].is_unique and report.rows_read == 5 and report.rows_skipped == {"invalid_json": 1}
    assert described == f"{first} + {second}"

    (tmp_path / "again").mkdir()
    clash = tmp_path / "again" / "pool_a.jsonl"
    clash.write_text('{"prompt": "a castle, oil painting"}\n')
    cfg.data.extra_sources = [str(clash)]
    with pytest.raises(ValueError, match="same ids; rename one of"):
        read_source(cfg.data, tmp_path / "corpus")
