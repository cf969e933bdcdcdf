"""The aesthetic head is LAION's architecture: the published weights load, convert to safetensors, and agree."""

from __future__ import annotations

import json

import pytest
import torch

from bp_ray.models.aesthetic import (
    AestheticHead,
    convert_laion_head,
    load_aesthetic_head,
    load_laion_state_dict,
)
from tests.conftest import shared_path

LAION_FILE = ("data", "weights", "sac+logos+ava1-l14-linearMSE.pth")


def test_head_has_laions_layer_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in AestheticHead(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_real_laion_weights_load_convert_and_match(tmp_path):
    pth = shared_path(*LAION_FILE)
    state = load_laion_state_dict(pth)  # weights_only=True, mapped to CPU
    out = convert_laion_head(pth, tmp_path / "aesthetic")
    assert (out / "aesthetic_head.safetensors").exists()
    config = json.loads((out / "aesthetic_config.json").read_text())
    assert (config["clip_model"], config["clip_pretrained"], config["embed_dim"]) == ("ViT-L-14", "openai", 768)
    assert "sha256:21dd590f" in config["head_source"]

    head, _ = load_aesthetic_head(out)
    from_pth, _ = load_aesthetic_head(pth)
    x = torch.nn.functional.normalize(torch.randn(6, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    # The published MLP has no activations: the head must equal the plain chain of affine maps.
    expected = x
    for index in (0, 2, 4, 6, 7):
        expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    with torch.no_grad():
        assert torch.allclose(head(x), expected.squeeze(-1), atol=1e-5)
        assert torch.equal(head(x), from_pth(x))


def test_a_state_dict_of_something_else_is_refused(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        load_laion_state_dict(other)


def test_missing_scorer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="aesthetic scorer not found"):
        load_aesthetic_head(tmp_path / "nope")
