"""Seedable generator of a DiffusionDB-shaped corpus: metadata.parquet + images/part-XXXXXX.zip.

The layout, column names and dtypes are DiffusionDB 2M's (https://github.com/poloclub/diffusiondb), so the
loader in prompt_io reads this corpus and the real dataset through the same code path. The prompt mix imitates
what a cleaning stage has to cope with: short plain prompts, long tag-style "high-quality" prompts, repeats,
NSFW and political prompts and malformed junk.
"""

import hashlib
import json
import logging
import re
import time
import uuid
import zipfile
from bisect import bisect_left
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from bp_ray.data import columns as C
from bp_ray.data import prompt_text
from bp_ray.data.prompt_sources import prompt_source
from bp_ray.data.vocab import Vocab, load_vocab

logger = logging.getLogger(__name__)

KINDS = ("plain", "rich", "duplicate", "nsfw", "political", "malformed")
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "corpus.json"
IMAGES_DIR = "images"

# DiffusionDB's published schema (README "Metadata Schema"): its integer columns are unsigned.
DIFFUSIONDB_SCHEMA = pa.schema([
    (C.IMAGE_NAME, pa.string()),
    (C.PROMPT, pa.string()),
    (C.PART_ID, pa.uint16()),
    (C.SEED, pa.uint32()),
    (C.STEP, pa.uint16()),
    (C.CFG, pa.float32()),
    (C.SAMPLER, pa.uint8()),
    (C.WIDTH, pa.uint16()),
    (C.HEIGHT, pa.uint16()),
    (C.USER_NAME, pa.string()),
    (C.TIMESTAMP, pa.timestamp("us", tz="UTC")),
    (C.IMAGE_NSFW, pa.float32()),
    (C.PROMPT_NSFW, pa.float32()),
])

_DIFFUSIONDB_START = pd.Timestamp("2022-08-07", tz="UTC")  # DiffusionDB was scraped from Aug 2022 Discord
_BLURRED_NSFW = 2.0  # DiffusionDB's image_nsfw for images Stable Diffusion already blurred


@dataclass
class CorpusSpec:
    """Size and prompt mix of a synthetic corpus. Fractions are of num_rows; the rest are "rich" prompts."""

    num_rows: int = 2000
    seed: int = 0
    image_size: int = 32
    """Side of the square PNG stored per row; also the width/height recorded in the metadata."""
    rows_per_part: int = 1000
    """Images per part zip (DiffusionDB: 1,000)."""
    with_images: bool = True
    plain_fraction: float = 0.35
    """Short plain prompts ("a cat on a sofa"): the inputs BeautifulPrompt learns to rewrite."""
    duplicate_fraction: float = 0.05
    """Exact repeats (same prompt, new seed) and case/whitespace variants of earlier prompts."""
    nsfw_fraction: float = 0.03
    political_fraction: float = 0.01
    malformed_fraction: float = 0.02
    """Empty, whitespace-only, over 1,000 characters, junk, unbalanced weights, control characters."""
    prompt_source: str = "prompts"
    """What the plain and rich prompts describe and how their images are drawn (data/prompt_sources.py)."""

    def __post_init__(self) -> None:
        fractions = [getattr(self, f"{kind}_fraction") for kind in KINDS if kind != "rich"]
        if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
            raise ValueError(f"CorpusSpec fractions must be >= 0 and sum to <= 1, got {fractions}")
        if self.num_rows < 0 or self.image_size < 1 or self.rows_per_part < 1:
            raise ValueError("CorpusSpec: num_rows >= 0, image_size >= 1 and rows_per_part >= 1 are required")
        if self.num_rows > self.rows_per_part * np.iinfo(np.uint16).max:
            raise ValueError("CorpusSpec: too many parts for DiffusionDB's uint16 part_id")


@dataclass
class CorpusSummary:
    """What write_corpus produced; also recorded in corpus.json."""

    num_rows: int
    num_parts: int
    num_images: int
    kind_counts: dict[str, int] = field(default_factory=dict)
    """Rows per kind: plain / rich / duplicate / nsfw / political / malformed."""
    bytes_on_disk: int = 0
    out_dir: str = ""


def generate_prompts(num_rows: int, seed: int, spec: CorpusSpec | None = None) -> list[str]:
    """Just the prompt texts of the corpus for (num_rows, seed), e.g. to train a tokenizer; `spec` gives the rest
    (another prompt source, for one)."""
    spec = replace(spec or CorpusSpec(), num_rows=num_rows, seed=seed)
    prompts, _, _ = _generate_prompt_rows(spec, load_vocab())
    return prompts


def generate_corpus_rows(spec: CorpusSpec) -> pd.DataFrame:
    """DiffusionDB metadata rows (its 13 columns and dtypes), deterministic for spec.seed."""
    rows, _ = _generate(spec)
    return rows


def render_row_image(prompt: str, seed: int, size: int) -> Image.Image:
    """A small RGB image loosely derived from the prompt: colour words tint it, the seed places a disc."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}".encode("utf-8", "replace")).digest()
    vocab = load_vocab()
    named = [vocab.color_rgb[c] for c in _color_pattern().findall(prompt.lower())]
    background = np.array(named[0] if named else tuple(digest[0:3]), dtype=np.float32)
    disc = np.array(named[1] if len(named) > 1 else tuple(digest[3:6]), dtype=np.float32)

    # Vertical shading so the image is not flat; a disc whose place and size depend on the seed.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    pixels = background * (1.0 - 0.45 * ys)[..., None]
    cx, cy = digest[6] / 255, digest[7] / 255
    radius = 0.15 + 0.25 * digest[8] / 255
    pixels[(xs - cx) ** 2 + (ys - cy) ** 2 < radius**2] = disc
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))  # (H, W, 3) uint8 -> RGB


def write_corpus(out_dir: Path, spec: CorpusSpec) -> CorpusSummary:
    """Write metadata.parquet, images/part-XXXXXX.zip (PNGs + part JSON) and corpus.json into out_dir.

    Skips all work and returns the recorded summary when out_dir/corpus.json already records this spec.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    recorded = _read_manifest(manifest_path)
    if recorded is not None and recorded["spec"] == asdict(spec) and _files_present(out_dir, recorded):
        logger.info("corpus in %s already matches the spec; not regenerating", out_dir)
        return CorpusSummary(**{**recorded["summary"], "out_dir": str(out_dir)})

    start = time.perf_counter()
    rows, kinds = _generate(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recorded is not None:
        # Our previous corpus, another spec: drop its marker first (a crash must not leave it claiming the new
        # files) and its part zips (a larger old corpus would leave stale parts behind).
        manifest_path.unlink()
        for old_zip in (out_dir / IMAGES_DIR).glob("part-*.zip"):
            old_zip.unlink()

    # 1. metadata table
    metadata_path = out_dir / METADATA_FILE
    pq.write_table(pa.Table.from_pandas(rows, schema=DIFFUSIONDB_SCHEMA, preserve_index=False), metadata_path)
    written = [metadata_path]

    # 2. one zip per part, holding the images and part-XXXXXX.json as DiffusionDB ships them
    if spec.with_images:
        written += _write_image_parts(out_dir / IMAGES_DIR, rows, spec.image_size, spec.prompt_source)

    # 3. summary + manifest, last, so its presence means the corpus is complete
    summary = CorpusSummary(
        num_rows=len(rows),
        num_parts=int(rows[C.PART_ID].nunique()),
        num_images=len(rows) if spec.with_images else 0,
        kind_counts={kind: kinds.count(kind) for kind in KINDS},
        bytes_on_disk=sum(p.stat().st_size for p in written),
        out_dir=str(out_dir),
    )
    elapsed_s = time.perf_counter() - start
    manifest = {"spec": asdict(spec), "summary": asdict(summary), "elapsed_s": round(elapsed_s, 3)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("corpus: %d rows, %d parts, %d bytes in %s | %.2f s",
                summary.num_rows, summary.num_parts, summary.bytes_on_disk, out_dir, elapsed_s)
    return summary


# ---------------------------------------------------------------------------------------------------------
# prompts


def _generate(spec: CorpusSpec) -> tuple[pd.DataFrame, list[str]]:
    """(metadata rows, kind of each row)."""
    vocab = load_vocab()
    prompts, kinds, copied_from = _generate_prompt_rows(spec, vocab)
    return _metadata_rows(spec, prompts, kinds, copied_from), kinds


def _generate_prompt_rows(spec: CorpusSpec, vocab: Vocab) -> tuple[list[str], list[str], list[int]]:
    """(prompts, kinds, copied_from); copied_from[i] is the row a duplicate repeats, -1 for other rows."""
    # Separate streams: prompt text never shifts when the metadata sampling changes, and vice versa.
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(2)[0])
    kinds = _assign_kinds(spec, rng)
    prompts = [""] * len(kinds)
    copied_from = [-1] * len(kinds)
    malformed_shape = int(rng.integers(len(prompt_text.MALFORMED_SHAPES)))

    # 1. every row that is not a copy
    source = prompt_source(spec.prompt_source)
    for i, kind in enumerate(kinds):
        if kind == "plain":
            prompts[i] = source.plain(rng)
        elif kind == "rich":
            prompts[i] = source.rich(rng)
        elif kind == "nsfw":
            prompts[i] = prompt_text.nsfw_prompt(rng, vocab)
        elif kind == "political":
            prompts[i] = prompt_text.political_prompt(rng, vocab)
        elif kind == "malformed":
            # Cycle through the shapes so even a few malformed rows cover several of them.
            shape = prompt_text.MALFORMED_SHAPES[malformed_shape % len(prompt_text.MALFORMED_SHAPES)]
            malformed_shape += 1
            prompts[i] = prompt_text.malformed_prompt(rng, vocab, shape)

    # 2. duplicates repeat an earlier plain/rich prompt (any one if none comes earlier)
    originals = [i for i, kind in enumerate(kinds) if kind in ("plain", "rich")]
    for i, kind in enumerate(kinds):
        if kind != "duplicate":
            continue
        if not originals:  # a mix without plain or rich rows: nothing to copy
            kinds[i], prompts[i] = "rich", prompt_text.rich_prompt(rng, vocab)
            continue
        num_earlier = bisect_left(originals, i)
        pool_size = num_earlier or len(originals)
        source = originals[int(rng.integers(pool_size))]
        copied_from[i] = source
        prompts[i] = prompt_text.vary_duplicate(rng, prompts[source])
    return prompts, kinds, copied_from


def _assign_kinds(spec: CorpusSpec, rng: np.random.Generator) -> list[str]:
    """Exact per-kind counts from the fractions, in a random order."""
    fractions = [getattr(spec, f"{kind}_fraction") for kind in KINDS if kind != "rich"]
    # Rounding cumulative boundaries keeps the counts summing to <= num_rows.
    bounds = np.round(np.cumsum([0.0, *fractions]) * spec.num_rows).astype(int)
    counts = [int(n) for n in np.diff(bounds)]
    special = [kind for kind in KINDS if kind != "rich"]
    kinds = [kind for kind, n in zip(special, counts, strict=True) for _ in range(n)]
    kinds += ["rich"] * (spec.num_rows - len(kinds))
    return [kinds[i] for i in rng.permutation(len(kinds))]


def _metadata_rows(spec: CorpusSpec, prompts: list[str], kinds: list[str],
                   copied_from: list[int]) -> pd.DataFrame:
    """The 13 DiffusionDB columns with its dtypes; NSFW scores follow each row's kind."""
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(2)[1])
    n = len(prompts)
    kind_array = np.array(kinds, dtype=object)

    # users: a pool with a few heavy users, as on the Discord server; a repeat keeps its original's user
    pool = [hashlib.sha256(f"{spec.seed}:user:{k}".encode()).hexdigest() for k in range(max(1, n // 25))]
    user_index = (len(pool) * rng.random(n) ** 2).astype(int)
    users = np.array([pool[k] for k in user_index], dtype=object)
    users[rng.random(n) < 0.01] = "deleted_account"
    copies = np.array(copied_from)
    is_copy = copies >= 0
    users[is_copy] = users[copies[is_copy]]

    # NSFW scores: DiffusionDB's are mostly near 0; flagged rows are high, some already blurred (2.0).
    prompt_nsfw = rng.beta(0.6, 12.0, n)
    image_nsfw = rng.beta(1.1, 8.0, n)
    is_nsfw = kind_array == "nsfw"
    prompt_nsfw[is_nsfw] = rng.uniform(0.6, 0.99, is_nsfw.sum())
    image_nsfw[is_nsfw] = np.where(rng.random(is_nsfw.sum()) < 0.25, _BLURRED_NSFW,
                                   rng.uniform(0.5, 0.99, is_nsfw.sum()))
    is_political = kind_array == "political"
    prompt_nsfw[is_political] = rng.uniform(0.05, 0.4, is_political.sum())

    minutes = np.sort(rng.integers(0, 21 * 24 * 60, n))  # three weeks of generations, in time order
    timestamps = pd.DatetimeIndex(_DIFFUSIONDB_START + pd.to_timedelta(minutes, unit="min")).as_unit("us")
    image_names = [f"{uuid.UUID(bytes=rng.bytes(16), version=4)}.png" for _ in range(n)]
    default_step = rng.random(n) < 0.8
    return pd.DataFrame({
        C.IMAGE_NAME: image_names,
        C.PROMPT: prompts,
        C.PART_ID: (np.arange(n) // spec.rows_per_part + 1).astype(np.uint16),
        C.SEED: rng.integers(0, 2**32, n, dtype=np.uint32),
        C.STEP: np.where(default_step, 50, rng.choice([20, 25, 30, 40, 75, 100, 150], n)).astype(np.uint16),
        C.CFG: rng.choice([7.0, 7.5, 8.0, 10.0, 12.0, 15.0], n, p=[0.5, 0.15, 0.1, 0.1, 0.1, 0.05]).astype(
            np.float32),
        C.SAMPLER: np.where(rng.random(n) < 0.75, 8, rng.integers(1, 8, n)).astype(np.uint8),  # 8 = k_lms
        C.WIDTH: np.full(n, spec.image_size, dtype=np.uint16),
        C.HEIGHT: np.full(n, spec.image_size, dtype=np.uint16),
        C.USER_NAME: users,
        C.TIMESTAMP: timestamps,
        C.IMAGE_NSFW: image_nsfw.astype(np.float32),
        C.PROMPT_NSFW: prompt_nsfw.astype(np.float32),
    })


def _write_image_parts(images_dir: Path, rows: pd.DataFrame, size: int, source_name: str) -> list[Path]:
    """images/part-XXXXXX.zip with each row's PNG and part-XXXXXX.json ({name: {p, se, c, st, sa}})."""
    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    source = prompt_source(source_name)
    progress = tqdm(total=len(rows), desc="corpus images", unit="img", disable=None)
    for part_id, part in rows.groupby(C.PART_ID, sort=True):
        name = f"part-{int(part_id):06d}"
        index = {}
        zip_path = images_dir / f"{name}.zip"
        # PNG is already compressed: store, don't deflate.
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
            for image_name, prompt, seed, cfg, step, sampler in zip(
                part[C.IMAGE_NAME], part[C.PROMPT], part[C.SEED], part[C.CFG], part[C.STEP], part[C.SAMPLER],
                strict=True,
            ):
                buffer = BytesIO()
                image = source.image(prompt, int(seed), size)
                (image or render_row_image(prompt, int(seed), size)).save(buffer, format="PNG")
                archive.writestr(_zip_entry(image_name), buffer.getvalue())
                index[image_name] = {"p": prompt, "se": int(seed), "c": float(cfg), "st": int(step),
                                     "sa": C.SAMPLER_NAMES[int(sampler)]}
            archive.writestr(_zip_entry(f"{name}.json"), json.dumps(index, indent=1))
        written.append(zip_path)
        progress.update(len(part))
    progress.close()
    return written


def _zip_entry(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp keeps the archives byte-identical across runs with the same seed.
    entry = zipfile.ZipInfo(name, date_time=(2022, 8, 7, 0, 0, 0))
    entry.external_attr = 0o644 << 16
    return entry


def _files_present(out_dir: Path, recorded: dict) -> bool:
    """The metadata and every part zip the manifest promises are still there (someone may have deleted them)."""
    num_parts = recorded["summary"]["num_parts"] if recorded["spec"]["with_images"] else 0
    expected = [out_dir / METADATA_FILE, *(out_dir / IMAGES_DIR / f"part-{i:06d}.zip" for i in range(1, num_parts + 1))]
    return all(path.is_file() for path in expected)


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "spec" in manifest and "summary" in manifest else None


@lru_cache(maxsize=1)
def _color_pattern() -> re.Pattern[str]:
    names = sorted(load_vocab().colors, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
