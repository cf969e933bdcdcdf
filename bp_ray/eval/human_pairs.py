"""The items of a human pairwise study, read from an evaluation folder (`bp-ray eval`'s output): one item per user
prompt and pair of systems, showing both systems' images of that prompt with the evaluation's first seed. Nothing is
rendered here; the images are the ones `bp-ray eval` saved.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HUMAN_PROMPTS_HINT = "rerun `bp-ray eval` with `--set eval.human_prompts=N` to save the images of the first N prompts"


@dataclass(frozen=True)
class PairItem:
    """One comparison: the same prompt and seed rendered from two systems' rewrites."""

    item_id: str
    """Stable across restarts: "p{prompt_id:04d}:{system_a}~{system_b}", e.g. "p0003:original~ppo"."""
    prompt_id: int
    prompt: str
    """The user's prompt: what the rater judges both images against."""
    seed: int
    system_a: str
    """The earlier of the two in the requested system order."""
    system_b: str
    text_a: str
    """system_a's rewrite (the prompt that rendered image_a)."""
    text_b: str
    image_a: str
    """Path relative to the evaluation folder, e.g. "images/original/p0003_s0.png"."""
    image_b: str


def item_id(prompt_id: int, system_a: str, system_b: str) -> str:
    """The stable id of one comparison."""
    return f"p{prompt_id:04d}:{system_a}~{system_b}"


def _read_results(eval_dir: Path) -> dict:
    results_file = eval_dir / "results.json"
    if not (eval_dir / "rewrites.jsonl").is_file() or not results_file.is_file():
        raise FileNotFoundError(f"{eval_dir} is not an evaluation folder (no rewrites.jsonl / results.json); "
                                "pass a run folder whose `bp-ray eval` finished, or its eval/ folder")
    return json.loads(results_file.read_text())


def default_systems(eval_dir: Path) -> list[str]:
    """"original" and the most trained system present ("ppo", else "sft"); else the first two evaluated systems."""
    systems = list(_read_results(Path(eval_dir)).get("systems", []))
    trained = [name for name in ("sft", "ppo") if name in systems]
    if "original" in systems and trained:
        return ["original", trained[-1]]
    return systems[:2]


def load_pairs(eval_dir: Path, systems: Sequence[str]) -> list[PairItem]:
    """Every (prompt, pair of systems) whose first-seed images exist for all `systems`, prompt-major, pairs in
    itertools.combinations order of `systems`.

    Raises FileNotFoundError when eval_dir is not an evaluation folder or a system has no images, ValueError when
    fewer than two distinct systems are asked for or one is not among the rewrites.
    """
    eval_dir = Path(eval_dir)
    systems = list(systems)
    if len(set(systems)) < 2 or len(set(systems)) != len(systems):
        raise ValueError(f"a pairwise study needs at least two distinct systems, got {systems}")
    results = _read_results(eval_dir)
    seeds = results.get("seeds") or []
    if not seeds:
        raise ValueError(f"{eval_dir / 'results.json'} lists no seeds")
    seed = int(seeds[0])
    rows = [json.loads(line) for line in (eval_dir / "rewrites.jsonl").read_text().splitlines() if line.strip()]
    known = sorted({key for row in rows for key in row} - {"prompt_id", "prompt"})
    missing = [name for name in systems if name not in known]
    if missing:
        raise ValueError(f"system(s) {missing} not in {eval_dir / 'rewrites.jsonl'}; it has {known}")

    def image(system: str, prompt_id: int) -> str:
        return f"images/{system}/p{prompt_id:04d}_s{seed}.png"

    # A system with no image at all is a setup problem worth naming; a prompt missing one image is just skipped.
    for name in systems:
        if not any((eval_dir / image(name, int(row["prompt_id"]))).is_file() for row in rows):
            raise FileNotFoundError(f"no images of system {name!r} with seed {seed} under {eval_dir / 'images'}; "
                                    + HUMAN_PROMPTS_HINT)
    items = []
    for row in sorted(rows, key=lambda r: int(r["prompt_id"])):
        prompt_id = int(row["prompt_id"])
        if not all((eval_dir / image(name, prompt_id)).is_file() for name in systems):
            continue
        for a, b in itertools.combinations(systems, 2):
            items.append(PairItem(item_id(prompt_id, a, b), prompt_id, str(row["prompt"]), seed, a, b,
                                  str(row[a]), str(row[b]), image(a, prompt_id), image(b, prompt_id)))
    return items
