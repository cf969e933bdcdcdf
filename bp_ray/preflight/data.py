"""Whether the prompt data the config names is there and readable."""

from __future__ import annotations

from pathlib import Path

from bp_ray.config import DataConfig
from bp_ray.preflight.report import MISSING, OK, WARN, Check


def check_data(data: DataConfig) -> list[Check]:
    """data.source, data.extra_sources and data.pair_files: each opened and its first rows read, as the data stage
    will."""
    from bp_ray.data.pipeline import source_problem

    problem = source_problem(data)
    if problem:
        return [Check("data.source", MISSING, problem)]
    needs_images = data.use_captions or data.aesthetic_threshold is not None
    if data.source == "corpus":
        checks = [Check("data.source", OK, f"corpus: the embedded synthetic corpus ({data.corpus_rows:,} generated "
                                           f"rows, data.corpus_kind={data.corpus_kind}), not DiffusionDB")]
    else:
        checks = [prompt_source_check("data.source", data.source, needs_images)]
    checks += [prompt_source_check(f"data.extra_sources[{i}]", s, needs_images)
               for i, s in enumerate(data.extra_sources)]
    checks += [prompt_source_check(f"data.pair_files[{i}]", s, False) for i, s in enumerate(data.pair_files)]
    return checks


def prompt_source_check(what: str, source: str, needs_images: bool) -> Check:
    """A DiffusionDB folder or prompt file: its first rows read with the data stage's reader; for a folder, whether
    its images are there when captions or the aesthetic filter need them."""
    import pyarrow.parquet as pq

    from bp_ray.data import columns as C
    from bp_ray.data.prompt_io import METADATA_FILES, SUPPORTED_FORMATS, read_prompts

    try:
        table, _ = read_prompts(source, limit=5)
    except Exception as error:  # whatever stops the reader stops the data stage: that is the answer
        formats = "" if "expected" in str(error) else f" (expected {SUPPORTED_FORMATS})"
        return Check(what, MISSING, f"{error}{formats}")
    path = Path(source)
    if not path.is_dir():
        return Check(what, OK, f"{source}: a {path.suffix or 'text'} prompt file, its first rows read")
    metadata = next(path / name for name in METADATA_FILES if (path / name).is_file())
    rows = pq.ParquetFile(metadata).metadata.num_rows
    parts = sum(1 for pattern in ("images/part-*", "diffusiondb-large-part-*/part-*", "part-*")
                for _ in path.glob(pattern))
    if needs_images and not (table[C.IMAGE_REF] != "").any():
        return Check(what, WARN, f"{source}: DiffusionDB metadata ({rows:,} rows in {metadata.name}) but not the "
                                 "images of its first rows (images/part-*.zip): download them, or turn off what needs "
                                 "them (data.use_captions=false, data.aesthetic_threshold=null)")
    return Check(what, OK, f"{source}: DiffusionDB folder, {rows:,} prompts in {metadata.name}, {parts:,} image parts")
