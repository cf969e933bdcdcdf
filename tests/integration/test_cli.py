"""The bp-ray CLI: every stage command exists, shares the option convention, and fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bp_ray.cli import main

pytestmark = pytest.mark.integration


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_lists_every_stage():
    # the console script installed beside this interpreter, not whatever bp-ray is first on PATH
    exe = str(Path(sys.executable).parent / "bp-ray")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "rewards", "train", "eval", "serve", "client", "pipeline", "status", "models",
                    "config"):
        assert command in result.stdout


def test_config_show_applies_overrides(capsys):
    code, out, _ = run_cli(capsys, "config", "show", "--preset", "tiny", "--set", "ppo.kl_target=6",
                           "--set", "data.num_seeds=4")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["ppo"]["kl_target"] == 6.0 and shown["data"]["num_seeds"] == 4
    code, out, _ = run_cli(capsys, "config", "show", "--preset", "paper", "--format", "json")
    assert json.loads(out)["models"]["policy"] == "bigscience/bloom-1b1"


@pytest.mark.parametrize(("argv", "message"), [
    (["config", "show", "--set", "ppo.kl_targt=6"], "did you mean 'kl_target'?"),
    (["config", "show", "--preset", "huge"], "available presets: paper, paper-shapes, small, tiny, world"),
    (["config", "show", "--set", "data.num_seeds=x"], "data.num_seeds expects an integer"),
    (["train", "sft", "--set", "sft.lr=-1"], "sft.lr=-1.0 must be > 0"),
])
def test_config_errors_exit_2_with_a_message_not_a_traceback(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--systems", "original,ppo"], "system(s) ppo need a checkpoint: pass --ppo DIR"),
    (["eval", "--sft", "missing-sft", "--systems", "original,sft"], "no Hugging Face model at missing-sft"),
    (["eval", "--prompts", "missing.jsonl", "--systems", "original"], "prompt source not found: missing.jsonl"),
    (["eval", "--set", "eval.llm_instruction=rewrite"], "eval.llm_instruction must contain the placeholder"),
])
def test_eval_with_missing_inputs_says_what_is_missing(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv, "--out", str(tmp_path / "eval"))
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_client_without_an_endpoint_says_it_cannot_reach_it(capsys):
    # Port 9 (discard) on loopback: nothing listens there on these machines.
    code, out, err = run_cli(capsys, "client", "a cat", "--url", "http://127.0.0.1:9")
    assert code == 1 and out == ""
    assert "cannot reach http://127.0.0.1:9" in err and "Traceback" not in err


def test_stage_commands_share_the_option_convention(capsys):
    for argv in (["eval", "--sft", "x", "--ppo", "y"],):
        code, _, err = run_cli(capsys, *argv, "--preset", "tiny", "--set", "seed=1", "--out", "o")
        assert code == 2 and "no Hugging Face model at x" in err, err  # parsed fine, then the input is checked


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "sft", "--pairs", "missing-pairs"], "run `bp-ray data generate` first"),
    (["train", "rm", "--labels", "missing-labels"], "run `bp-ray rewards label` first"),
    (["train", "ppo", "--sft", "missing-sft"], "run `bp-ray train sft` first"),
    (["train", "rm", "--set", "rm.label_roles=mid"], "rm.label_roles=['mid'] is not allowed"),
])
def test_training_without_inputs_says_which_stage_to_run(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and "Traceback" not in err


def test_data_corpus_writes_the_diffusiondb_layout(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "data", "corpus", "--set", "data.corpus_rows=50", "--out", str(tmp_path))
    assert code == 0 and "corpus: 50 rows" in out
    frame = pd.read_parquet(tmp_path / "metadata.parquet")
    assert len(frame) == 50 and {"prompt", "seed", "image_name", "prompt_nsfw"} <= set(frame.columns)


def test_status_of_a_missing_run_is_a_clear_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "status", str(tmp_path / "nope"))
    assert code == 2 and "no run directory" in err


def test_models_list_and_build_tiny(capsys, tmp_path, tiny_models_cfg):
    code, out, _ = run_cli(capsys, "models", "list")
    assert code == 0 and "policy" in out and "tiny:bloom" in out
    code, out, _ = run_cli(capsys, "models", "build-tiny", "--out", str(tmp_path / "zoo"),
                           "--set", "models.zoo.tiny.lm_layers=1")
    assert code == 0 and "tiny zoo built in" in out and "bloom" in out
    code, out, _ = run_cli(capsys, "models", "build-tiny", "--out", str(tmp_path / "zoo"),
                           "--set", "models.zoo.tiny.lm_layers=1")
    assert code == 0 and "up to date (cached)" in out
