"""The run directory: one subfolder per stage, defined here and nowhere else.

    RUN_DIR/
      config.yaml   resolved config of the last command that wrote here
      corpus/       embedded corpus: metadata.parquet, images/part-*.zip, corpus.json        (bp-ray data corpus)
      data/         prompt pairs: part-*.parquet, work/ (committed batches)                  (bp-ray data generate)
      rewards/      reward labels: part-*.parquet, cache.sqlite, images/ (rewards.keep_images) (bp-ray rewards label)
      sft/          model/ (save_pretrained), metrics/, ray/sft/checkpoint_*/ (Ray Train)    (bp-ray train sft)
      rm/           pickscore/ and aesthetic/ (or shared/), each laid out as sft/            (bp-ray train rm)
      ppo/          model/, critic/, metrics/, ray/ppo/checkpoint_*/                         (bp-ray train ppo)
      eval/         results.json, results.csv, scores.csv, rewrites.jsonl, report.html, plots/, images/ (bp-ray eval)
      logs/         bp-ray.log and output.log of bp-ray pipeline

Each stage reads only earlier stages' folders and writes `manifest.json` (config, counts, timings) and, when it
finished, `_SUCCESS.json`; so each stage reruns alone and `bp-ray status` can summarise a run. `bp-ray pipeline`
also writes `_STARTED.json` when it starts a stage and adds the stage's fingerprint to `_SUCCESS.json`, which is
how a rerun knows what to skip, resume or redo (bp_ray/pipeline.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS.json"


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a stage's manifest.json and, when it finished (`complete`, default true), its _SUCCESS.json: the one
    place a stage marks itself done."""
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if manifest.get("complete", True):
        (out_dir / SUCCESS).write_text(json.dumps({"stage": manifest.get("stage")}))
    return manifest


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage of bp_ray/stages.py (layout sits below the stages and does not import them)."""
        return self.root / stage

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    def manifest(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    def success_marker(self, stage: str) -> Path:
        return self.stage_dir(stage) / SUCCESS

    def model_dir(self, stage: str) -> Path:
        """Final Hugging Face export of a training stage, for the next stage and for Serve."""
        return self.stage_dir(stage) / "model"

    def is_done(self, stage: str) -> bool:
        return self.success_marker(stage).exists()

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        self.success_marker(stage).write_text(json.dumps(info, indent=2, default=str))

    def stage_status(self, stage: str) -> dict[str, Any]:
        """done / partial / missing, with the manifest's contents when there is one."""
        folder = self.stage_dir(stage)
        if not folder.exists():
            return {"stage": stage, "state": "missing"}
        manifest = self.manifest(stage)
        info: dict[str, Any] = json.loads(manifest.read_text()) if manifest.exists() else {}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return {"stage": stage, "state": "done" if self.is_done(stage) else "partial", "bytes": size,
                "manifest": info}
