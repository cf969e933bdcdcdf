"""Training the three vision roles in the miniature world, and measuring them on held-out scenes.

- captioner (BLIP): image -> plain description, next-token loss on both renders of a scene;
- CLIP (PickScore and CLIP relevance): contrastive, images <-> plain and detailed descriptions;
- aesthetic predictor: open_clip image tower and LAION head regress the ground-truth aesthetic jointly.

Each trainer loads the random-init folder the tiny builder wrote, trains in place and saves it back in the same
format, so the app's loaders (`bp_ray.models.loading`, `load_aesthetic_scorer`) read the trained model unchanged.
Images go through the very processor / preprocess the loaders return, so training sees pixels exactly as
inference does. Deterministic for a world seed; each returns its stats (steps, seconds, first / last loss).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bp_ray.config import DataConfig
from bp_ray.embedded.config import WorldConfig
from bp_ray.embedded.world.samples import WorldSamples
from bp_ray.embedded.world.scenes import SHAPES, parse_description
from bp_ray.embedded.world.schedule import warmup_cosine

LAST_LOSS_STEPS = 20
"""`last_loss` averages this many final steps: one minibatch's loss is noisy."""
SHIFT = 4
"""Pixels a training image may shift by where the text allows it (half a ViT patch of the tiny models)."""
SHAPE_PRETRAIN_SHARE = 0.6
"""Share of captioner_steps / clip_steps in which the vision tower learns shapes alone, before its main task."""
SHAPE_PRETRAIN_BATCH_SIZE = 64
"""Images per shape-pretraining step (a vision-only step costs a fraction of a captioning / contrastive one)."""
MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP's temperature cap (as in the original CLIP training), so the scale cannot run away."""


# --- shared pieces ----------------------------------------------------------------------------------------

def _pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(image) for image in images]


def _batches(num: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """`steps` index batches over `num` rows: shuffled epochs from a seeded generator (same seed, same order)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > num:
            order, cursor = rng.permutation(num), 0
        yield order[cursor:cursor + batch_size]
        cursor += batch_size


def _augment(pixels: torch.Tensor, generator: torch.Generator, hflip: bool = True, vflip: bool = False,
             shift: int = 0) -> torch.Tensor:
    """Random flips and shifts (up to `shift` pixels, edges replicated) of preprocessed (B, 3, H, W) pixels.

    Preprocessing is per-pixel (the images are already at the model's size), so flipping or shifting its output
    equals preprocessing a flipped or shifted image. Without this the tiny ViTs memorise the training renders
    and learn shapes only at the pixel offsets they saw (held-out shape accuracy 0.72 instead of 0.88 after 4000 steps).
    """
    count = len(pixels)
    if hflip:
        flip = torch.rand(count, generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    if vflip:
        flip = torch.rand(count, generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-2), pixels)
    if shift:
        height, width = pixels.shape[-2:]
        padded = torch.nn.functional.pad(pixels, (shift,) * 4, mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (count, 2), generator=generator).tolist()
        pixels = torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])
    return pixels


def _train_loop(params: list[torch.nn.Parameter], loss_fn: Callable[[np.ndarray], torch.Tensor], num_rows: int,
                steps: int, batch_size: int, lr: float, seed: int,
                after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """AdamW with warmup + cosine over seeded minibatches of row indices; loss_fn(rows) -> scalar loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps, warmup))
    losses = []
    start = time.perf_counter()
    for rows in _batches(num_rows, min(batch_size, num_rows), steps, seed):
        loss = loss_fn(rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 2),
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": float(np.mean(losses[-LAST_LOSS_STEPS:])) if losses else float("nan")}


# --- shapes: what the tiny vision towers learn first ---------------------------------------------------------

def _shapes_shown(samples: WorldSamples) -> torch.Tensor:
    """(2N, shapes) float32 multi-hot: which shapes each image shows, rows as `_both_renders` stacks them."""
    shown = torch.zeros((len(samples), len(SHAPES)))
    for row, scene in enumerate(samples.scenes):
        for obj in scene.objects:
            shown[row, SHAPES.index(obj.shape)] = 1
    return shown.repeat(2, 1)


def _both_renders(samples: WorldSamples) -> np.ndarray:
    """(2N, S, S, 3): rows 0..N-1 the detailed renders, N..2N-1 the plain renders of the same scenes."""
    return np.concatenate([samples.images, samples.plain_images])


class _ShapeHead(torch.nn.Module):
    """Training only: which shapes an image shows (multi-label), from a vision tower's CLS token.

    The tiny towers, trained on captions or contrastive pairs alone, only ever learn colours (a patch's mean):
    colours are the easy half of every description and the towers never get past them, so captions and
    retrieval name shapes at chance (caption shape accuracy 0.35 after 5000 steps). Learning shapes first,
    alone, and keeping this loss on while the main task trains, fixes that; the real models' towers arrive
    pretrained, and this stands in for it. Never saved: the folders keep their library's own model classes.
    """

    def __init__(self, width: int, shown: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(width, shown.shape[1])
        self.shown = shown

    def loss(self, vision_states: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
        """vision_states (B, tokens, width) of images `rows_t` -> BCE against the shapes they show."""
        return torch.nn.functional.binary_cross_entropy_with_logits(self.linear(vision_states[:, 0]),
                                                                    self.shown[rows_t])


def _pretrain_shapes(vision: torch.nn.Module, head: _ShapeHead, pixels: torch.Tensor, steps: int, lr: float,
                     seed: int) -> dict[str, float]:
    """Stage one: the vision tower and shape head alone, on the plain renders (rows N..2N-1 of `pixels`).

    Plain renders only: the detailed ones' forced blur and low contrast slow shape learning (held-out shape
    accuracy 0.60 instead of 0.75 after 2000 steps)."""
    n = len(pixels) // 2
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(rows: np.ndarray) -> torch.Tensor:
        rows_t = torch.from_numpy(rows) + n
        images = _augment(pixels[rows_t], generator, shift=SHIFT)
        return head.loss(vision(pixel_values=images).last_hidden_state, rows_t)

    return _train_loop([*vision.parameters(), *head.parameters()], loss_fn, n, steps, SHAPE_PRETRAIN_BATCH_SIZE,
                       lr, seed)


def _two_stage_stats(total_steps: int, pretrain: dict[str, float], main: dict[str, float],
                     main_losses: list[float]) -> dict[str, float]:
    """One stats dict: the main task's own loss (without the shape loss) as first / last loss."""
    return {"steps": total_steps, "seconds": round(pretrain["seconds"] + main["seconds"], 2),
            "first_loss": main_losses[0] if main_losses else float("nan"),
            "last_loss": float(np.mean(main_losses[-LAST_LOSS_STEPS:])) if main_losses else float("nan"),
            "shape_pretrain_steps": pretrain["steps"], "shape_pretrain_first_loss": pretrain["first_loss"],
            "shape_pretrain_last_loss": pretrain["last_loss"]}


# --- captioner --------------------------------------------------------------------------------------------

def train_world_captioner(folder: Path, samples: WorldSamples, world: WorldConfig) -> dict[str, float]:
    """BLIP in `folder` learns image -> plain description on both renders of every scene; saved back in place.

    Stage one teaches the vision tower shapes (`_ShapeHead`); stage two trains the whole model on captions,
    next-token loss, with the shape loss still on.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    torch.manual_seed(world.seed)
    model = BlipForConditionalGeneration.from_pretrained(folder)
    processor = BlipProcessor.from_pretrained(folder)
    pixels = processor(images=_pil(_both_renders(samples)), return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(samples.plain + samples.plain, padding="longest", return_tensors="pt")
    input_ids = tokens["input_ids"].clone()
    # Generation starts from [DEC] (BLIP's decoder BOS) where the tokenizer puts [CLS]: train on the same start.
    input_ids[:, 0] = model.config.text_config.bos_token_id
    attention = tokens["attention_mask"]
    targets = input_ids.masked_fill(attention == 0, -100)
    shape_head = _ShapeHead(model.config.vision_config.hidden_size, _shapes_shown(samples))
    generator = torch.Generator().manual_seed(world.seed + 1)
    caption_losses: list[float] = []

    def loss_fn(rows: np.ndarray) -> torch.Tensor:
        rows_t = torch.from_numpy(rows)
        # Plain descriptions say nothing of position or left / right: flips and shifts keep them true.
        images = _augment(pixels[rows_t], generator, shift=SHIFT)
        out = model(pixel_values=images, input_ids=input_ids[rows_t], attention_mask=attention[rows_t])
        # Own next-token loss: the built-in one has BLIP's label smoothing, which floors the reported loss.
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets[rows_t][:, 1:].flatten(),
                                                 ignore_index=-100)
        caption_losses.append(loss.item())
        return loss + shape_head.loss(out.last_hidden_state, rows_t)

    model.train()
    pretrain_steps = int(world.captioner_steps * SHAPE_PRETRAIN_SHARE)
    pretrain = _pretrain_shapes(model.vision_model, shape_head, pixels, pretrain_steps, world.captioner_lr,
                                world.seed)
    main = _train_loop([*model.parameters(), *shape_head.parameters()], loss_fn, len(pixels),
                       world.captioner_steps - pretrain_steps, world.captioner_batch_size, world.captioner_lr,
                       world.seed + 1)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return _two_stage_stats(world.captioner_steps, pretrain, main, caption_losses)


def _objects(text: str) -> list[tuple[str, str]]:
    return sorted((obj.colour, obj.shape) for obj in parse_description(text).objects)


def measure_captioner(folder: Path, heldout: WorldSamples, batch_size: int = 64) -> dict[str, float]:
    """Held-out captions through the app's loader and caption code: share with the right colours, the right
    shapes, the right objects (colour-shape pairs, any order), and exactly the plain description; for each render
    kind. Two objects may be named in either order: nothing in an image says which one the text names first."""
    from bp_ray.data.captions import caption_images
    from bp_ray.models.loading import load_captioner

    model, processor = load_captioner(str(folder), device="cpu")
    max_new_tokens = DataConfig().caption_max_new_tokens
    stats: dict[str, float] = {}
    for kind, images in (("images", heldout.images), ("plain_images", heldout.plain_images)):
        captions = []
        for start in range(0, len(images), batch_size):
            captions += caption_images(model, processor, _pil(images[start:start + batch_size]), max_new_tokens)
        got = [_objects(c) for c in captions]
        want = [_objects(p) for p in heldout.plain]
        stats[f"{kind}/colours"] = float(np.mean([sorted(c for c, _ in g) == sorted(c for c, _ in w)
                                                  for g, w in zip(got, want, strict=True)]))
        stats[f"{kind}/shapes"] = float(np.mean([sorted(s for _, s in g) == sorted(s for _, s in w)
                                                 for g, w in zip(got, want, strict=True)]))
        stats[f"{kind}/objects"] = float(np.mean([g == w for g, w in zip(got, want, strict=True)]))
        stats[f"{kind}/exact"] = float(np.mean([c == p for c, p in zip(captions, heldout.plain, strict=True)]))
    for metric in ("colours", "shapes", "objects", "exact"):
        stats[metric] = (stats[f"images/{metric}"] + stats[f"plain_images/{metric}"]) / 2
    return stats


# --- CLIP -------------------------------------------------------------------------------------------------

def train_world_clip(folder: Path, samples: WorldSamples, world: WorldConfig) -> dict[str, float]:
    """CLIP in `folder` trained contrastively: detailed renders <-> detailed and plain descriptions, plain renders
    <-> plain descriptions; saved back in place (one model for the PickScore and CLIP-relevance roles).

    Stage one teaches the vision tower shapes (`_ShapeHead`); stage two is the symmetric InfoNCE of CLIP over
    image-text pairs, with the shape loss still on.
    """
    from transformers import AutoProcessor, CLIPModel

    torch.manual_seed(world.seed)
    model = CLIPModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    n = len(samples)
    pixels = processor(images=_pil(_both_renders(samples)), return_tensors="pt")["pixel_values"]
    texts = sorted(set(samples.plain) | set(samples.detailed))
    text_index = {t: i for i, t in enumerate(texts)}
    tokens = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
    plain_ids = np.array([text_index[t] for t in samples.plain])
    detailed_ids = np.array([text_index[t] for t in samples.detailed])
    # Pair rows: (detailed render, detailed text), (detailed render, plain text), (plain render, plain text).
    pair_image = np.concatenate([np.arange(n), np.arange(n), np.arange(n, 2 * n)])
    pair_text = np.concatenate([detailed_ids, plain_ids, plain_ids])
    # Every description true of an image is a positive of it, not only its own row's text: in-batch duplicates
    # ("a red circle" twice) would otherwise be pushed apart as negatives.
    true_texts = [{int(detailed_ids[i]), int(plain_ids[i])} for i in range(n)] + [{int(p)} for p in plain_ids]
    is_plain_pair = np.arange(3 * n) >= n
    shape_head = _ShapeHead(model.config.vision_config.hidden_size, _shapes_shown(samples))
    generator = torch.Generator().manual_seed(world.seed + 1)
    contrastive_losses: list[float] = []

    def loss_fn(rows: np.ndarray) -> torch.Tensor:
        batch_texts = np.unique(pair_text[rows])
        images = pair_image[rows]
        # Flips and shifts keep a plain description true, not a detailed one ("left of", "centered"); an augmented
        # image's only positive is its plain description.
        augmented = is_plain_pair[rows]
        positive = torch.tensor([[t == pair_text[r] if a else t in true_texts[i] for t in batch_texts.tolist()]
                                 for r, i, a in zip(rows, images, augmented, strict=True)], dtype=torch.float32)
        images_t = torch.from_numpy(images)
        batch_pixels = pixels[images_t]
        batch_pixels[augmented] = _augment(batch_pixels[augmented], generator, shift=SHIFT)
        out = model(input_ids=tokens["input_ids"][batch_texts], attention_mask=tokens["attention_mask"][batch_texts],
                    pixel_values=batch_pixels)
        logits = out.logits_per_image  # (B images, U texts), logit_scale * cosine
        image_loss = torch.nn.functional.cross_entropy(logits, positive / positive.sum(1, keepdim=True))
        text_loss = torch.nn.functional.cross_entropy(logits.T, (positive / positive.sum(0, keepdim=True)).T)
        loss = (image_loss + text_loss) / 2
        contrastive_losses.append(loss.item())
        return loss + shape_head.loss(out.vision_model_output.last_hidden_state, images_t)

    def clamp_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    model.train()
    pretrain_steps = int(world.clip_steps * SHAPE_PRETRAIN_SHARE)
    pretrain = _pretrain_shapes(model.vision_model, shape_head, pixels, pretrain_steps, world.clip_lr, world.seed)
    main = _train_loop([*model.parameters(), *shape_head.parameters()], loss_fn, len(pair_image),
                       world.clip_steps - pretrain_steps, world.clip_batch_size, world.clip_lr, world.seed + 1,
                       after_step=clamp_scale)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {**_two_stage_stats(world.clip_steps, pretrain, main, contrastive_losses),
            "logit_scale": round(model.logit_scale.exp().item(), 3)}


def _top1(scorer, images: np.ndarray, truths: list[str], candidates: list[str],
          same: Callable[[str, str], bool]) -> tuple[float, float]:
    """(top-1 accuracy, chance) of image -> text retrieval among `candidates`; chance counts every candidate
    that `same` would accept as right."""
    with torch.no_grad():
        image_emb = torch.cat([scorer.embed_images(_pil(images[s:s + 128])) for s in range(0, len(images), 128)])
        text_emb = torch.cat([scorer.embed_texts(candidates[s:s + 128]) for s in range(0, len(candidates), 128)])
    best = (image_emb @ text_emb.T).argmax(dim=1).tolist()
    hits = [same(candidates[b], t) for b, t in zip(best, truths, strict=True)]
    chance = [sum(same(c, t) for c in candidates) / len(candidates) for t in truths]
    return float(np.mean(hits)), float(np.mean(chance))


def measure_clip(folder: Path, heldout: WorldSamples) -> dict[str, float]:
    """Held-out image -> text top-1 retrieval through the app's CLIP scorer, among the distinct held-out
    descriptions, with chance. A plain description is right when it names the same objects (in either order);
    a detailed one only when it is the scene's own."""
    from bp_ray.models.loading import load_clip_scorer

    scorer = load_clip_scorer(str(folder), device="cpu", use_logit_scale=False)
    plain = sorted(set(heldout.plain))
    detailed = sorted(set(heldout.detailed))

    def same_objects(a: str, b: str) -> bool:
        return _objects(a) == _objects(b)

    stats = {"plain_candidates": len(plain), "detailed_candidates": len(detailed)}
    for key, images, truths, candidates, same in (
        ("plain", heldout.plain_images, heldout.plain, plain, same_objects),
        ("plain_from_detailed_images", heldout.images, heldout.plain, plain, same_objects),
        ("detailed", heldout.images, heldout.detailed, detailed, str.__eq__),
    ):
        stats[f"{key}/top1"], stats[f"{key}/chance"] = _top1(scorer, images, truths, candidates, same)
    return stats


# --- aesthetic --------------------------------------------------------------------------------------------

def _aesthetic_terms(images: np.ndarray) -> torch.Tensor:
    """(N, 5) each ground-truth term's share of the aesthetic (weight * term * 10: the row sums to the score)."""
    from bp_ray.embedded.world.truth import WEIGHTS, aesthetic_terms

    return torch.tensor([[10 * WEIGHTS[name] * value for name, value in aesthetic_terms(image).items()]
                         for image in images], dtype=torch.float32)


def train_world_aesthetic(folder: Path, samples: WorldSamples, world: WorldConfig,
                          sd_images: np.ndarray | None = None) -> dict[str, float]:
    """The aesthetic scorer folder's open_clip tower and LAION head regress the ground-truth aesthetic of both
    renders and of `sd_images` (the world SD's renders, labelled from their pixels) (MSE, on LAION's 0..10 scale);
    saved back in the scorer folder format.

    A training-only linear head on the same embedding also regresses the five terms the ground truth sums
    (contrast, vividness, cleanliness, sharpness, composition): their separate errors reach the tower where
    the single score's would cancel (held-out Spearman of plain renders 0.76 instead of 0.74 at 3000 steps).
    """
    from bp_ray.models.aesthetic import (
        CLIP_CONFIG_DIR,
        load_aesthetic_head,
        load_aesthetic_scorer,
        save_aesthetic_folder,
    )

    torch.manual_seed(world.seed)
    scorer = load_aesthetic_scorer(folder, device="cpu")
    _, spec = load_aesthetic_head(folder)
    tower, head = scorer.clip, scorer.head
    from bp_ray.embedded.world.truth import true_aesthetic

    sd_images = np.zeros((0, *samples.images.shape[1:]), np.uint8) if sd_images is None else sd_images
    images = np.concatenate([_both_renders(samples), sd_images])
    pixels = torch.stack([scorer.preprocess(image) for image in _pil(images)])
    sd_truth = np.array([true_aesthetic(image) for image in sd_images], dtype=np.float32)
    targets = torch.from_numpy(np.concatenate([samples.aesthetic, samples.plain_aesthetic, sd_truth])).float()
    terms = _aesthetic_terms(images)
    terms_head = torch.nn.Linear(head.input_size, terms.shape[1])
    with torch.no_grad():
        head.layers[-1].bias.fill_(float(targets.mean()))  # start at the mean: the early steps learn ranking
    generator = torch.Generator().manual_seed(world.seed)
    score_losses: list[float] = []

    def loss_fn(rows: np.ndarray) -> torch.Tensor:
        rows_t = torch.from_numpy(rows)
        # Every term of the ground truth is unchanged by flips; shifts would move the composition term.
        features = tower.encode_image(_augment(pixels[rows_t], generator, vflip=True)).float()
        embeddings = features / features.norm(dim=-1, keepdim=True)  # as AestheticScorer.embed
        loss = torch.nn.functional.mse_loss(head(embeddings), targets[rows_t])
        score_losses.append(loss.item())
        # Summed over terms, not averaged, so it weighs about as much as the score's own loss.
        return loss + terms.shape[1] * torch.nn.functional.mse_loss(terms_head(embeddings), terms[rows_t])

    tower.train()
    head.eval()  # no dropout: the head is linear, its dropout only slows a run this short
    params = [*tower.visual.parameters(), *head.parameters(), *terms_head.parameters()]
    stats = _train_loop(params, loss_fn, len(pixels), world.aesthetic_steps, world.aesthetic_batch_size,
                        world.aesthetic_lr, world.seed)
    stats["sd_images"] = len(sd_images)
    stats["first_loss"] = score_losses[0] if score_losses else float("nan")
    stats["last_loss"] = float(np.mean(score_losses[-LAST_LOSS_STEPS:])) if score_losses else float("nan")
    tower.eval()
    config_file = Path(folder) / CLIP_CONFIG_DIR / f"{spec.clip_model}.json"
    spec = replace(spec, head_source=f"trained in the miniature world (seed {world.seed}, "
                                     f"{world.aesthetic_steps} steps, image tower and head jointly)")
    save_aesthetic_folder(folder, spec, head, clip_state=tower.state_dict(),
                          clip_model_config=json.loads(config_file.read_text()))
    return stats


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def measure_aesthetic(folder: Path, heldout: WorldSamples) -> dict[str, float]:
    """Spearman correlation of the scorer (loaded as the app loads it) with the ground truth on held-out
    renders: both kinds together and each alone, plus the mean absolute error on the 0..10 scale."""
    from bp_ray.models.aesthetic import load_aesthetic_scorer

    scorer = load_aesthetic_scorer(folder, device="cpu")
    scores = {kind: np.concatenate([scorer.score(_pil(images[s:s + 128])) for s in range(0, len(images), 128)])
              for kind, images in (("images", heldout.images), ("plain_images", heldout.plain_images))}
    truth = {"images": heldout.aesthetic, "plain_images": heldout.plain_aesthetic}
    both_scores, both_truth = np.concatenate(list(scores.values())), np.concatenate(list(truth.values()))
    return {"spearman": _spearman(both_scores, both_truth),
            "images/spearman": _spearman(scores["images"], truth["images"]),
            "plain_images/spearman": _spearman(scores["plain_images"], truth["plain_images"]),
            "mae": float(np.abs(both_scores - both_truth).mean())}
