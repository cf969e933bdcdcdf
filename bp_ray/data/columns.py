"""Column names: DiffusionDB's metadata schema and our prompt table."""

# DiffusionDB metadata.parquet / metadata-large.parquet, in the released column order
# (https://github.com/poloclub/diffusiondb#metadata-schema).
IMAGE_NAME = "image_name"
PROMPT = "prompt"
PART_ID = "part_id"
SEED = "seed"
STEP = "step"
CFG = "cfg"
SAMPLER = "sampler"
WIDTH = "width"
HEIGHT = "height"
USER_NAME = "user_name"
TIMESTAMP = "timestamp"
IMAGE_NSFW = "image_nsfw"
PROMPT_NSFW = "prompt_nsfw"

DIFFUSIONDB_COLUMNS = (
    IMAGE_NAME, PROMPT, PART_ID, SEED, STEP, CFG, SAMPLER, WIDTH, HEIGHT, USER_NAME, TIMESTAMP, IMAGE_NSFW,
    PROMPT_NSFW,
)

# `sampler` is stored as a code; the per-part JSON files store the name ("sa").
SAMPLER_NAMES = {
    1: "ddim", 2: "plms", 3: "k_euler", 4: "k_euler_ancestral", 5: "k_heun", 6: "k_dpm_2",
    7: "k_dpm_2_ancestral", 8: "k_lms", 9: "others",
}

# Prompt table: what prompt_io.read_prompts returns for every source (extra source columns may follow).
SOURCE = "source"
ROW_ID = "row_id"
IMAGE_REF = "image_ref"

PROMPT_TABLE_COLUMNS = (PROMPT, SOURCE, ROW_ID, PROMPT_NSFW, IMAGE_NSFW, IMAGE_REF)

# Working columns of the pair-generation pipeline (one row per usable low / high input prompt).
ROW_ORDER = "row_order"
"""Position in the source table: makes "keep the first" deterministic however batches were formed."""
QUALITY = "quality"
CAPTION = "caption"
SUMMARY = "summary"
EXPANSION = "expansion"
STRIPPED = "stripped"
GEN_ERROR = "gen_error"
AESTHETIC = "aesthetic"

# Pair table: what `bp-ray data generate` writes (data/part-*.parquet).
PAIR_ID = "pair_id"
PAIR_SOURCE = "pair_source"
"""caption | summary | expansion (the paper's three sources) | stripped | given: which source made the pair."""
LOW = "low"
HIGH = "high"
DROP_REASON = "drop_reason"
PAIR_COLUMNS = (PAIR_ID, PAIR_SOURCE, LOW, HIGH, ROW_ID, SOURCE, IMAGE_REF, AESTHETIC, ROW_ORDER)
