"""One loader for every prompt source: DiffusionDB folders, Parquet, JSON Lines, CSV/TSV and plain text.

Every source comes back as the same prompt table (columns.PROMPT_TABLE_COLUMNS first, extra source columns
after). Rows whose prompt cannot be read at all are skipped and counted by reason; empty or junk prompts are
kept, since cleaning is a later stage.
"""

import csv
import json
import logging
import math
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from bp_ray.data import columns as C

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "a DiffusionDB folder (metadata.parquet or metadata-large.parquet), .parquet, "
    ".jsonl / .json (JSON Lines), .csv, .tsv, .txt (one prompt per line)"
)
ZIP_MEMBER_SEP = "::"
"""image_ref of an image inside a zip: "<zip path>::<member>"."""
METADATA_FILES = ("metadata.parquet", "metadata-large.parquet")
_PROMPT_FIELDS = ("prompt", "text", "caption")
_CSV_PROMPT_COLUMNS = ("prompt", "Prompt")
_SCALARS = (str, int, float, bool)
_PARQUET_BATCH_ROWS = 65_536


@dataclass
class ReadReport:
    """How many rows came back and how many were skipped, by reason (invalid_json, missing_prompt, ...)."""

    rows_read: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.rows_skipped[reason] = self.rows_skipped.get(reason, 0) + count


def read_prompts(path: str | Path, limit: int | None = None) -> tuple[pd.DataFrame, ReadReport]:
    """Read up to `limit` prompts from any supported source into the prompt table.

    `source` is the row's own "source" field when it has one, else "diffusiondb" for DiffusionDB folders and
    the file stem otherwise. `row_id` is DiffusionDB's image_name or "<file stem>:<line or row number>".
    """
    path = Path(path)
    if not path.exists():
        unset = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", str(path))
        if unset:
            raise FileNotFoundError(f"prompt source {path} names the environment variable {unset[0]}, which is not "
                                    f"set: export {unset[0]}=DIR (the folder of your prompt files), or name the "
                                    "files with --prompts / --set")
        raise FileNotFoundError(f"prompt source not found: {path}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if path.is_dir():
        table, report = _read_diffusiondb(_find_metadata(path), limit)
    else:
        readers = {".parquet": _read_parquet, ".jsonl": _read_json_lines, ".json": _read_json_lines,
                   ".csv": _read_delimited, ".tsv": _read_delimited, ".txt": _read_text_lines}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"unsupported prompt source {path}: expected {SUPPORTED_FORMATS}")
        table, report = reader(path, limit)
    report.rows_read = len(table)
    if report.rows_skipped:
        logger.warning("%s: read %d rows, skipped %s", path, report.rows_read, report.rows_skipped)
    return table, report


def load_image(image_ref: str) -> Image.Image:
    """Decode the image an image_ref points at ("<zip>::<member>" or a file path) as RGB."""
    if not image_ref:
        raise ValueError("empty image_ref: this row has no image")
    zip_path, sep, member = image_ref.partition(ZIP_MEMBER_SEP)
    if not sep:
        with Image.open(image_ref) as image:
            return image.convert("RGB")
    with zipfile.ZipFile(zip_path) as archive:
        return _decode(archive.read(_zip_member(archive, member, zip_path)))


def iter_diffusiondb_images(
    dataset_dir: Path, image_names: Iterable[str]
) -> Iterator[tuple[str, Image.Image]]:
    """Yield (image_name, RGB image) part by part, opening each part zip or folder once.

    Order: by part_id, then as given. Raises KeyError for names the metadata does not list and
    FileNotFoundError when a needed part is not on disk.
    """
    dataset_dir = Path(dataset_dir)
    metadata_path = _find_metadata(dataset_dir)
    wanted = list(dict.fromkeys(image_names))
    if not wanted:
        return
    metadata = pq.read_table(metadata_path, columns=[C.IMAGE_NAME, C.PART_ID],
                             filters=[(C.IMAGE_NAME, "in", wanted)]).to_pandas()
    part_of = dict(zip(metadata[C.IMAGE_NAME], metadata[C.PART_ID].astype(int), strict=True))
    missing = [name for name in wanted if name not in part_of]
    if missing:
        raise KeyError(f"{len(missing)} image names are not in {metadata_path}, e.g. {missing[:3]}")

    by_part: dict[int, list[str]] = {}
    for name in wanted:
        by_part.setdefault(part_of[name], []).append(name)
    for part_id in sorted(by_part):
        location = _find_part(metadata_path, part_id)
        if location is None:
            raise FileNotFoundError(f"part {part_id} of {dataset_dir} is not on disk (no zip or folder)")
        if location.suffix == ".zip":
            with zipfile.ZipFile(location) as archive:
                for name in by_part[part_id]:
                    yield name, _decode(archive.read(_zip_member(archive, name, location)))
        else:
            for name in by_part[part_id]:
                yield name, load_image(str(location / name))


# ---------------------------------------------------------------------------------------------------------
# DiffusionDB layout and Parquet


def _find_metadata(dataset_dir: Path) -> Path:
    # The Hugging Face repo holds both tables; metadata.parquet (2M) pairs with images/, the default download.
    for name in METADATA_FILES:
        if (dataset_dir / name).is_file():
            return dataset_dir / name
    raise ValueError(f"{dataset_dir} is a folder without {' or '.join(METADATA_FILES)}; "
                     f"expected {SUPPORTED_FORMATS}")


def _find_part(metadata_path: Path, part_id: int) -> Path | None:
    """The zip or folder holding one part: images/ for 2M, diffusiondb-large-part-*/ for Large (same ids!)."""
    root = metadata_path.parent
    if metadata_path.name == "metadata-large.parquet":
        parent_dirs = [*sorted(root.glob("diffusiondb-large-part-*")), root]
    else:
        parent_dirs = [root / "images", root]
    name = f"part-{part_id:06d}"
    for parent in parent_dirs:
        if (parent / f"{name}.zip").is_file():
            return parent / f"{name}.zip"
        if (parent / name).is_dir():
            return parent / name
    return None


def _read_diffusiondb(metadata_path: Path, limit: int | None) -> tuple[pd.DataFrame, ReadReport]:
    """All metadata columns are kept; row_id is image_name; image_ref points into the part zip or folder."""
    report = ReadReport()
    rows = _read_parquet_rows(metadata_path, limit, C.PROMPT, report)
    if not {C.IMAGE_NAME, C.PART_ID} <= set(rows.columns):
        raise ValueError(f"{metadata_path} lacks DiffusionDB's {C.IMAGE_NAME}/{C.PART_ID} columns")

    # One directory lookup per part, not per row: 2M rows share 2,000 parts.
    prefixes = {}
    for part_id in rows[C.PART_ID].dropna().unique():
        location = _find_part(metadata_path, int(part_id))
        if location is not None:
            location = location.resolve()  # absolute: Ray workers run in another working directory
            prefixes[part_id] = f"{location}{ZIP_MEMBER_SEP}" if location.suffix == ".zip" else f"{location}/"
    image_refs = [prefixes[part] + name if part in prefixes else ""
                  for part, name in zip(rows[C.PART_ID], rows[C.IMAGE_NAME], strict=True)]

    rows = rows.assign(**{C.SOURCE: "diffusiondb", C.ROW_ID: rows[C.IMAGE_NAME], C.IMAGE_REF: image_refs})
    return _prompt_table(rows), report


def _read_parquet(path: Path, limit: int | None) -> tuple[pd.DataFrame, ReadReport]:
    columns = set(pq.read_schema(path).names)
    if {C.IMAGE_NAME, C.PART_ID} <= columns:  # a DiffusionDB metadata table given as a file
        return _read_diffusiondb(path, limit)
    candidates = [*_PROMPT_FIELDS, "Prompt"]
    prompt_column = next((c for c in candidates if c in columns), None)
    if prompt_column is None:
        raise ValueError(f"{path} has no prompt column (looked for {candidates}); columns: {sorted(columns)}")
    report = ReadReport()
    rows = _read_parquet_rows(path, limit, prompt_column, report)
    rows = rows.rename(columns={prompt_column: C.PROMPT})
    if C.ROW_ID not in rows.columns:
        rows[C.ROW_ID] = [f"{path.stem}:{position + 1}" for position in rows.index]
    if C.SOURCE not in rows.columns:
        rows[C.SOURCE] = path.stem
    return _prompt_table(rows), report


def _read_parquet_rows(path: Path, limit: int | None, prompt_column: str, report: ReadReport) -> pd.DataFrame:
    """Stream record batches until `limit` readable rows are found, so a 14M-row table is not read whole.

    The index is each row's 0-based position in the file, so skipped rows do not shift the others' ids.
    """
    kept: list[pd.DataFrame] = []
    num_kept = 0
    position = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        frame = batch.to_pandas()
        frame.index = pd.RangeIndex(position, position + len(frame))
        position += len(frame)
        prompts = frame[prompt_column]
        missing = prompts.isna()
        non_text = ~missing & ~prompts.map(lambda p: isinstance(p, str)).astype(bool)
        report.skip("missing_prompt", int(missing.sum()))
        report.skip("non_text_prompt", int(non_text.sum()))
        frame = frame[~missing & ~non_text]
        if limit is not None:
            frame = frame.iloc[: limit - num_kept]
        kept.append(frame)
        num_kept += len(frame)
        if limit is not None and num_kept >= limit:
            break
    if not kept:  # an empty file has no batches
        return pq.read_schema(path).empty_table().to_pandas()
    return pd.concat(kept)


# ---------------------------------------------------------------------------------------------------------
# JSON Lines, CSV/TSV, text


def _read_json_lines(path: Path, limit: int | None) -> tuple[pd.DataFrame, ReadReport]:
    """One JSON object per line with `prompt` (else `text`, else `caption`); a bare JSON string is a prompt.

    A .json file holding one JSON array of such records is read too; row numbers are then 1-based positions.
    """
    report = ReadReport()
    records: list[dict] = []
    with path.open("rb") as handle:
        first = handle.read(1024).lstrip()
        handle.seek(0)
        if path.suffix.lower() == ".json" and first.startswith(b"["):
            try:
                items = json.loads(handle.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{path} starts like a JSON array but does not parse: {error}") from error
            numbered: Iterable[tuple[int, object]] = enumerate(items, start=1)
        else:
            numbered = _parsed_lines(handle, report)
        for row_no, obj in numbered:
            if limit is not None and len(records) >= limit:
                break
            record = _json_record(obj, path, row_no, report)
            if record is not None:
                records.append(record)
    return _prompt_table(pd.DataFrame.from_records(records)), report


def _parsed_lines(lines: Iterable[bytes], report: ReadReport) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each line that parses; the others are counted in the report."""
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            report.skip("blank_line")
            continue
        try:
            yield line_no, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            report.skip("invalid_utf8")
        except json.JSONDecodeError:
            report.skip("invalid_json")


def _json_record(obj: object, path: Path, row_no: int, report: ReadReport) -> dict | None:
    """One parsed JSON value -> a prompt-table record, or None (counted) when it holds no text prompt."""
    if isinstance(obj, str):
        obj = {C.PROMPT: obj}
    if not isinstance(obj, dict):
        report.skip("not_an_object")
        return None
    prompt = next((obj[k] for k in _PROMPT_FIELDS if obj.get(k) is not None), None)
    if prompt is None:
        report.skip("missing_prompt")
        return None
    if not isinstance(prompt, str):
        report.skip("non_text_prompt")
        return None
    # Keep flat fields (category, index, ...) for reports; nested ones would not survive Parquet/Ray.
    record = {k: v for k, v in obj.items() if isinstance(v, _SCALARS) and k not in _PROMPT_FIELDS}
    record.update({
        C.PROMPT: prompt,
        C.SOURCE: _text_or(obj.get(C.SOURCE), path.stem),
        C.ROW_ID: f"{path.stem}:{row_no}",
        C.PROMPT_NSFW: _score(obj.get(C.PROMPT_NSFW)),
        C.IMAGE_NSFW: _score(obj.get(C.IMAGE_NSFW)),
        C.IMAGE_REF: _image_ref(obj, path.parent),
    })
    return record


def _read_delimited(path: Path, limit: int | None) -> tuple[pd.DataFrame, ReadReport]:
    """CSV/TSV with a header row; the prompt is column `prompt`, else `Prompt`, else the first column."""
    report = ReadReport()
    records = []
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        rows = csv.reader(handle, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            return _prompt_table(pd.DataFrame()), report
        prompt_index = next((header.index(c) for c in _CSV_PROMPT_COLUMNS if c in header), 0)
        row_no = 0
        while limit is None or len(records) < limit:
            try:
                values = next(rows)
            except StopIteration:
                break
            except csv.Error:  # e.g. a field over csv.field_size_limit(); the reader goes on after it
                values = None
            row_no += 1
            if values is None:
                report.skip("invalid_csv")
                continue
            if not values:  # csv yields [] for a blank line
                report.skip("blank_line")
                continue
            if prompt_index >= len(values):
                report.skip("missing_prompt")
                continue
            record = {name: value for name, value in zip(header, values, strict=False) if name}
            record.update({
                C.PROMPT: values[prompt_index],
                C.SOURCE: record.get(C.SOURCE) or path.stem,
                C.ROW_ID: f"{path.stem}:{row_no}",
                C.PROMPT_NSFW: _score(record.get(C.PROMPT_NSFW)),
                C.IMAGE_NSFW: _score(record.get(C.IMAGE_NSFW)),
                C.IMAGE_REF: _image_ref(record, path.parent),
            })
            records.append(record)
    table = pd.DataFrame.from_records(records)
    original = header[prompt_index]
    if original != C.PROMPT and original in table.columns:  # the prompt is already in `prompt`
        table = table.drop(columns=original)
    return _prompt_table(table), report


def _read_text_lines(path: Path, limit: int | None) -> tuple[pd.DataFrame, ReadReport]:
    """One prompt per line; blank lines are kept as empty prompts for the cleaning stage to count."""
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        lines = handle.read().splitlines()
    if limit is not None:
        lines = lines[:limit]
    table = pd.DataFrame({
        C.PROMPT: lines,
        C.SOURCE: path.stem,
        C.ROW_ID: [f"{path.stem}:{i}" for i in range(1, len(lines) + 1)],
    })
    return _prompt_table(table), ReadReport()


# ---------------------------------------------------------------------------------------------------------
# helpers


def _prompt_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Core columns first with fixed dtypes (str, str, str, float64, float64, str), then the rest."""
    rows = rows.copy()
    for column in (C.PROMPT, C.SOURCE, C.ROW_ID, C.IMAGE_REF):
        rows[column] = rows[column].fillna("").astype(str) if column in rows.columns else ""
    for column in (C.PROMPT_NSFW, C.IMAGE_NSFW):
        rows[column] = rows[column].astype("float64") if column in rows.columns else math.nan
    extras = [c for c in rows.columns if c not in C.PROMPT_TABLE_COLUMNS]
    return rows[[*C.PROMPT_TABLE_COLUMNS, *extras]].reset_index(drop=True)


def _score(value: object) -> float:
    """A numeric score, NaN when absent or not a number."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text_or(value: object, default: str) -> str:
    return value if isinstance(value, str) and value else default


def _image_ref(row: dict, base_dir: Path) -> str:
    """Explicit image_ref / image_path fields; relative file paths are taken from the file's folder."""
    ref = row.get(C.IMAGE_REF) or row.get("image_path")
    if not isinstance(ref, str) or not ref:
        return ""
    if ZIP_MEMBER_SEP in ref:
        zip_path, _, member = ref.partition(ZIP_MEMBER_SEP)
        return f"{(base_dir / zip_path).resolve()}{ZIP_MEMBER_SEP}{member}"
    return str((base_dir / ref).resolve())


def _zip_member(archive: zipfile.ZipFile, name: str, zip_path: str | Path) -> str:
    """The member for an image name, also when the zip nests it under a folder (part-000001/<name>)."""
    try:
        archive.getinfo(name)
        return name
    except KeyError:
        pass
    for member in archive.namelist():
        if member.rsplit("/", 1)[-1] == name:
            return member
    raise FileNotFoundError(f"{name} is not in {zip_path}")


def _decode(data: bytes) -> Image.Image:
    with Image.open(BytesIO(data)) as image:
        return image.convert("RGB")
