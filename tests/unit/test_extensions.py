"""The extension points (bp_ray.extensions) and the layering they make possible: the core finds the embedded backend
only through the registry, and a third backend plugs in the same way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bp_ray.config import ConfigError
from bp_ray.config_loader import explain, load_config
from bp_ray.extensions import EvalMetric, ModelResolver, registry

REPO = Path(__file__).resolve().parents[2]


def test_the_import_layering_contracts_hold():
    """No upward imports, no cycles between layers, and no core module importing the embedded backend."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is missing: `make install` installs it with the dev extras")
    done = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout


def test_the_embedded_backend_registers_itself():
    found = registry()
    assert {"tiny", "world"} <= set(found.model_resolvers) and "world" in found.prompt_sources
    assert found.eval_metrics["world_truth"].columns == ("true_aesthetic", "colour_match", "shape_match",
                                                         "count_match")
    cfg = load_config("world")
    assert set(cfg.models.zoo) >= {"tiny", "world"} and cfg.models.zoo["world"].unet_steps == 9000


def test_backend_sections_are_set_validated_and_explained_like_any_other():
    cfg = load_config("tiny", ["models.zoo.tiny.lm_layers=1", "models.zoo.world.seed=4"])
    assert cfg.models.zoo["tiny"].lm_layers == 1 and cfg.models.zoo["world"].seed == 4
    with pytest.raises(ConfigError, match=r"models\.zoo\.tinny.*did you mean 'tiny'"):
        load_config("tiny", ["models.zoo.tinny.lm_layers=1"])
    with pytest.raises(ConfigError, match=r"models\.zoo\.tiny\.lm_layers.*>= 1"):
        load_config("tiny", ["models.zoo.tiny.lm_layers=0"])
    assert "same seed builds the same files" in explain(cfg, "models.zoo.world.seed")
    assert "world = (section)" in explain(cfg, "models.zoo")


def test_a_registered_prompt_source_makes_the_corpus_and_the_eval_set(monkeypatch):
    from bp_ray.data.corpus import CorpusSpec, generate_corpus_rows
    from bp_ray.eval.prompts import load_eval_prompts

    class Fruit:
        def plain(self, rng):
            return f"a {rng.choice(['pear', 'plum'])}"

        def rich(self, rng):
            return f"a ripe {rng.choice(['pear', 'plum'])}, still life, oil on canvas"

        def image(self, prompt, seed, size):
            return None

        def eval_prompts(self, size, seed, exclude):
            return [f"fruit {i}" for i in range(size)]

        def style_tags(self):
            return ("oil on canvas",)

    monkeypatch.setitem(registry().prompt_sources, "fruit", Fruit())
    rows = generate_corpus_rows(CorpusSpec(num_rows=40, seed=1, prompt_source="fruit", with_images=False))
    assert any("pear" in p or "plum" in p for p in rows["prompt"])
    cfg = load_config("tiny", ["data.corpus_kind=fruit", "eval.num_prompts=3"])
    assert load_eval_prompts(cfg.eval, cfg.data)[0] == ["fruit 0", "fruit 1", "fruit 2"]
    with pytest.raises(ConfigError, match=r"data\.corpus_kind='vegetable'.*prompts, .*fruit"):
        load_config("tiny", ["data.corpus_kind=vegetable"])


def test_a_registered_model_resolver_resolves_its_prefix(monkeypatch, tmp_path):
    from bp_ray.models.loading import registered_prefix, resolve_model

    monkeypatch.setitem(registry().model_resolvers, "mine",
                        ModelResolver("mine", ("lm",), lambda role, models_cfg: tmp_path / role))
    assert resolve_model("mine:lm") == str(tmp_path / "lm") and registered_prefix("mine:lm") == "mine"
    with pytest.raises(ValueError, match="mine:lm"):
        resolve_model("mine:vae")
    assert resolve_model("org/model") == "org/model" and resolve_model("C:/models/x") == "C:/models/x"


def test_eval_metrics_must_be_registered(monkeypatch):
    from bp_ray.eval.run import image_metrics

    with pytest.raises(ConfigError, match=r"eval\.metrics has unknown metric"):
        load_config("tiny", ["eval.metrics=[sharpness]"])

    def sharpness(pixels, prompts):
        return np.zeros((*pixels.shape[:2], 1))

    monkeypatch.setitem(registry().eval_metrics, "sharpness", EvalMetric("sharpness", ("sharpness",), sharpness))
    cfg = load_config("tiny", ["eval.metrics=[sharpness]"])
    assert image_metrics(cfg.eval)[-1] == "sharpness"
