"""An untrained reward-model folder in the exact `bp-ray train rm` layout, built in about a second: for tests of
what loads such a folder (serving's rank=reward_model), not of training."""

from __future__ import annotations

from pathlib import Path

from bp_ray.config import ModelsConfig, RMConfig
from bp_ray.layout import write_manifest
from bp_ray.models.reward_heads import HeadSpec
from bp_ray.models.reward_model import load_regressor
from bp_ray.train.reward import head_inputs, model_groups

LABEL_UNITS = {"pickscore": (19.0, 0.5), "aesthetic": (4.5, 0.3)}
"""(mean, std) each head's standardised outputs are mapped back with: the tiny labels' rough scale."""


def untrained_rm_folder(models: ModelsConfig, out_dir: Path, rm: RMConfig | None = None, alpha: float = 0.7,
                        seed: int = 0) -> Path:
    """out_dir laid out as run_rm writes it (<name>/model: save_pretrained + tokenizer + reward_head.json, and
    manifest.json with "models" and "max_length"), holding models.rm_backbone with seeded random heads."""
    import torch

    rm = rm or RMConfig()
    out_dir = Path(out_dir)
    groups = model_groups(rm)
    for name, heads in groups.items():
        folder = out_dir / name / "model"
        torch.manual_seed(seed)  # the heads' random init: the same folder on every build
        model, tokenizer = load_regressor(models.rm_backbone, models, len(heads), "cpu")
        # as rm_worker_loop's save_model
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        HeadSpec(heads, head_inputs(rm, heads), mean=[LABEL_UNITS[h][0] for h in heads],
                 std=[LABEL_UNITS[h][1] for h in heads]).save(folder)
    write_manifest(out_dir, {"stage": "rm", "heads": rm.heads, "alpha": alpha, "max_length": rm.max_length,
                             "models": {name: f"{name}/model" for name in groups}, "complete": True,
                             "inputs": {"pickscore": rm.pickscore_input, "aesthetic": rm.aesthetic_input},
                             "backbone": models.rm_backbone, "untrained": True})
    return out_dir
