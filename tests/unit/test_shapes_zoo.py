"""The shapes zoo's architecture files give the real models' sizes, and its tokenizers the real vocabularies."""

import pytest
import torch

from bp_ray.embedded.config import ShapesConfig
from bp_ray.embedded.shapes_zoo import (
    architecture,
    blip_model,
    bloom_model,
    clip_model,
    role_key,
    sd_models,
)
from bp_ray.models.tokenizers import train_bert_tokenizer, train_bloom_tokenizer, train_clip_tokenizer


def _params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize(("build", "role", "expected"), [
    # the published parameter counts of the real checkpoints
    (lambda: bloom_model(architecture("bloom")), "bloom", 1_065_314_304),
    (lambda: clip_model(architecture("clip")), "clip", 427_616_513),            # openai/clip-vit-large-patch14
    (lambda: clip_model(architecture("pickscore")), "pickscore", 986_109_441),  # CLIP ViT-H/14
    # BLIP-large: 469,732,924 stored, of which the decoder's 30,524 × 768 output matrix is tied to its embeddings
    (lambda: blip_model(architecture("blip")), "blip", 469_732_924 - 30_524 * 768),
])
def test_architectures_have_the_real_parameter_counts(build, role, expected):
    with torch.device("meta"):
        assert _params(build()) == expected


def test_stable_diffusion_parts_have_the_real_parameter_counts():
    with torch.device("meta"):
        unet, vae, text_encoder = sd_models(architecture("sd"))
    assert (_params(unet), _params(vae), _params(text_encoder)) == (859_520_964, 83_653_863, 123_060_480)


def test_fewer_lm_layers_keep_the_real_width_heads_and_vocabulary():
    with torch.device("meta"):
        model = bloom_model(architecture("bloom"), layers=2)
    assert (model.config.n_layer, model.config.hidden_size, model.config.n_head, model.config.vocab_size) == \
        (2, 1536, 16, 250_880)
    assert model.get_output_embeddings().weight.shape == (250_880, 1536)


def test_only_the_lm_is_rebuilt_when_its_layers_change():
    full, fewer = ShapesConfig(), ShapesConfig(lm_layers=2)
    assert role_key("bloom", full) != role_key("bloom", fewer)
    for role in ("sd", "blip", "pickscore", "clip", "aesthetic"):
        assert role_key(role, full) == role_key(role, fewer)


def test_tokenizers_reach_the_real_vocabulary_sizes_and_every_id_decodes():
    texts = ["a cat on a sofa, oil painting, highly detailed", "a red car at night, cinematic lighting"] * 20
    bloom = train_bloom_tokenizer(texts, 400, pad_to=250_680)
    clip = train_clip_tokenizer(texts, 400, pad_to=49_408)
    bert = train_bert_tokenizer(texts, 400, pad_to=30_524)
    assert (len(bloom), len(clip), len(bert)) == (250_680, 49_408, 30_524)
    # the highest ids are filler words: sampled by a random model, they still decode to text
    assert bloom.decode([250_679]).strip() and clip.decode([49_407]).strip() and bert.decode([30_523]).strip()
    # the learnt merges still tokenize text as before
    assert bloom("a cat on a sofa")["input_ids"] == train_bloom_tokenizer(texts, 400)("a cat on a sofa")["input_ids"]
