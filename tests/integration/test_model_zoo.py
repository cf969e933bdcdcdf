"""Tiny zoo round-trips: build -> save -> load through from_pretrained -> one forward / generation / image /
score, with the expected shapes and determinism for a fixed seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bp_ray.config_loader import load_config
from bp_ray.embedded.tiny_zoo import ZOO_ROLES, build_tiny_zoo, ensure_tiny_zoo
from bp_ray.models import loading
from bp_ray.models.model_cache import MANIFEST

pytestmark = pytest.mark.integration


def _weights_digest(folder: Path) -> dict[str, str]:
    """Weights, configs and tokenizer files (the manifest holds build times, so it is left out)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_zoo_has_every_role_in_library_formats(tiny_models_cfg):
    root = Path(tiny_models_cfg.zoo_dir) / "tiny"
    manifest = json.loads((root / MANIFEST).read_text())
    assert set(manifest["parameters"]) == set(ZOO_ROLES)
    assert (root / "bloom" / "model.safetensors").exists() and (root / "bloom" / "tokenizer.json").exists()
    assert (root / "sd" / "model_index.json").exists()
    assert (root / "sd" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (root / "aesthetic" / "aesthetic_head.safetensors").exists()
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pth"))  # safetensors only


def test_zoo_build_is_deterministic_and_cached(tmp_path, tiny_models_cfg):
    first = _weights_digest(Path(tiny_models_cfg.zoo_dir) / "tiny")
    again = build_tiny_zoo(tmp_path / "tiny", tiny_models_cfg.zoo["tiny"])
    assert again.built
    assert _weights_digest(tmp_path / "tiny") == first
    cached = build_tiny_zoo(tmp_path / "tiny", tiny_models_cfg.zoo["tiny"])
    assert not cached.built  # same config: reused, not rebuilt


def test_zoo_rebuilds_when_its_config_changes(tmp_path, tiny_models_cfg):
    cfg = load_config("tiny", ["models.zoo.tiny.lm_layers=1"]).models
    cfg.zoo_dir = str(tmp_path)
    root = ensure_tiny_zoo(cfg)
    assert json.loads((root / MANIFEST).read_text())["config"]["lm_layers"] == 1
    cfg.zoo["tiny"].lm_layers = 3
    ensure_tiny_zoo(cfg)
    assert json.loads((root / MANIFEST).read_text())["config"]["lm_layers"] == 3
    model, _ = loading.load_causal_lm("tiny:bloom", cfg)
    assert model.config.n_layer == 3


def test_causal_lm_generates_deterministically(tiny_models_cfg):
    model, tokenizer = loading.load_causal_lm("tiny:bloom", tiny_models_cfg)
    assert type(model).__name__ == "BloomForCausalLM"
    batch = tokenizer(["a cat on a sofa", "an old lighthouse at sunset, highly detailed"], return_tensors="pt",
                      padding=True)
    assert (batch["input_ids"][:, -1] != tokenizer.pad_token_id).all()  # left padding for generation
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    again = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 6)
    assert torch.equal(out, again)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("a cat on a sofa")  # byte-level BPE round-trips the prompt


def test_captioner_writes_a_caption_per_image(tiny_models_cfg):
    model, processor = loading.load_captioner("tiny:blip", tiny_models_cfg)
    assert type(model).__name__ == "BlipForConditionalGeneration"
    inputs = processor(images=_images(3), return_tensors="pt")
    size = tiny_models_cfg.zoo["tiny"].image_size
    assert inputs["pixel_values"].shape == (3, 3, size, size)
    ids = model.generate(**inputs, max_new_tokens=5)
    assert torch.equal(ids, model.generate(**inputs, max_new_tokens=5))
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_diffusion_renders_deterministic_images(tiny_models_cfg):
    pipe = loading.load_diffusion("tiny:sd", tiny_models_cfg, scheduler="ddim")
    size = tiny_models_cfg.zoo["tiny"].image_size

    def render(prompts, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompts, num_images_per_prompt=len(seeds) // len(prompts), num_inference_steps=3,
                    height=size, width=size, generator=generators, output_type="np").images

    batched = render(["a cat", "a dog"], [0, 1, 2, 3])
    assert batched.shape == (4, size, size, 3)
    assert np.array_equal(batched, render(["a cat", "a dog"], [0, 1, 2, 3]))  # batched rerun: bit-exact
    alone = render(["a dog"], [2])[0]
    # per-image generators: image (prompt 2, seed 2) matches rendering it alone, up to batched-kernel float bits
    assert np.abs(batched[2] - alone).max() < 1 / 255
    assert not np.allclose(batched[0], batched[1])  # seeds differ


def test_diffusion_scheduler_swaps_by_name(tiny_models_cfg):
    pipe = loading.load_diffusion("tiny:sd", tiny_models_cfg, scheduler="euler_ancestral")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown scheduler 'magic'"):
        loading.load_diffusion("tiny:sd", tiny_models_cfg, scheduler="magic")


def test_pickscore_and_relevance_score_pairs(tiny_models_cfg):
    images = _images(4)
    texts = ["a cat", "a dog", "a red circle", "a castle at night"]
    pick = loading.load_pickscore(tiny_models_cfg)
    scores = pick.score(images, texts)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert np.array_equal(scores, pick.score(images, texts))
    relevance = loading.load_clip_relevance(tiny_models_cfg).score(images, texts)
    assert relevance.shape == (4,) and (np.abs(relevance) <= 1.0 + 1e-5).all()  # a cosine
    # PickScore is the same cosine scaled by logit_scale.exp()
    cosine = (pick.embed_images(images) * pick.embed_texts(texts)).sum(-1).numpy()
    assert np.allclose(scores, pick.model.logit_scale.exp().item() * cosine, atol=1e-5)
    with pytest.raises(ValueError, match="scored in pairs"):
        pick.score(images, texts[:2])


def test_aesthetic_scores_images(tiny_models_cfg):
    scorer = loading.load_aesthetic(tiny_models_cfg)
    images = _images(5)
    scores = scorer.score(images)
    assert scores.shape == (5,) and np.isfinite(scores).all()
    assert np.array_equal(scores, scorer.score(images))
    embeddings = scorer.embed(images)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)  # L2-normalised, as LAION's head expects
    assert scorer.score([]).shape == (0,)


def test_unknown_tiny_role_is_a_clear_error(tiny_models_cfg):
    with pytest.raises(ValueError, match="unknown tiny model 'tiny:gpt'; the tiny zoo has"):
        loading.resolve_model("tiny:gpt", tiny_models_cfg)


def test_hub_ids_and_paths_pass_through_unchanged(tiny_models_cfg):
    assert loading.resolve_model("bigscience/bloom-1b1", tiny_models_cfg) == "bigscience/bloom-1b1"
    assert loading.resolve_model("/some/dir", tiny_models_cfg) == "/some/dir"


def test_a_policy_response_ends_at_its_first_newline_as_at_eos(tiny_models_cfg):
    """Only a prompt's first line is ever rendered or served, so PPO must neither reward nor train the tokens after
    it: they are masked like the padding after EOS."""
    from bp_ray.models.loading import load_causal_lm
    from bp_ray.train.ppo_rollout import end_responses, stop_token_ids

    _, tokenizer = load_causal_lm("tiny:bloom", tiny_models_cfg)
    stops = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stops and all("\n" in tokenizer.decode([i]) for i in stops[1:])
    first = tokenizer("a red circle, sharp", add_special_tokens=False)["input_ids"]
    rest = tokenizer("\nfree words after the line", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = torch.tensor([[*first, *rest, eos], [*first, eos, *rest]])
    ids, mask, texts = end_responses(rows, tokenizer)
    assert texts == ["a red circle, sharp", "a red circle, sharp"]
    newline_at = len(first) + next(i for i, t in enumerate(rest) if "\n" in tokenizer.decode([t]))
    assert mask[0].tolist() == [1] * (newline_at + 1) + [0] * (rows.shape[1] - newline_at - 1)
    assert mask[1].tolist() == [1] * (len(first) + 1) + [0] * len(rest)
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
