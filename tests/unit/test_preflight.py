"""`bp-ray check`'s pure parts: what each stage asks of the cluster, how a model spec resolves, the prompt data and
storage checks. No Ray cluster, no downloads: the hub is an address where nothing listens (it fails at once)."""

from __future__ import annotations

import json
import time

import pytest

from bp_ray.config_loader import load_config
from bp_ray.preflight import (
    MISSING,
    OK,
    WARN,
    Check,
    ClusterNode,
    ClusterView,
    HubProbe,
    check_data,
    format_checks,
    model_spec_kind,
    model_status,
    ray_address_problem,
    resource_checks,
    shared_path_check,
    stage_needs,
)

NOBODY = "http://127.0.0.1:9"
"""Port 9 (discard) on loopback: nothing listens there on these machines, so a request fails at once."""


def needs_by_stage(cfg) -> dict[str, tuple[float, float]]:
    return {need.stage: (need.cpus, need.gpus) for need in stage_needs(cfg)}


def test_paper_stages_need_what_their_sections_ask_for():
    cfg = load_config("paper")
    assert needs_by_stage(cfg) == {
        "data": (6, 3),      # captioner, rewriter, aesthetic filter: 1 (min_actors) x (2 CPUs, 1 GPU) each
        "rewards": (4, 2),   # renderer + scorer pools, 1 x (2 CPUs, 1 GPU) each
        "sft": (8, 8),       # 8 workers x (1 CPU, 1 GPU)
        "rm": (8, 8),
        "ppo": (16, 8),      # 8 workers x 0.75 GPU; workers_per_actor 2 -> 4 reference + 4 reward actors x 0.25 GPU
        "eval": (4, 2),      # the reward service (scorer pool) + one rewrite task (rewriter pool)
        "serve": (12, 2),    # 1 generator (4 CPUs, 1 GPU) + 2 ingress x 2 CPUs + renderer (4 CPUs, 1 GPU)
    }


def test_serve_need_is_what_bp_ray_serve_asks_ray_for():
    from bp_ray.serve.runner import required_cpus

    for preset in ("tiny", "paper"):
        cfg = load_config(preset)
        assert needs_by_stage(cfg)["serve"][0] == pytest.approx(required_cpus(cfg))


@pytest.mark.parametrize(("per_actor", "cpus", "gpus"), [(0, 10, 6.5), (1, 24, 10), (3, 14, 7.5), (8, 10, 6.5)])
def test_ppo_counts_one_reference_and_one_reward_actor_per_group_of_workers(per_actor, cpus, gpus):
    # 8 workers x (1 CPU, 0.75 GPU) + 2 x ceil(8 / per_actor) actors x (1 CPU, 0.25 GPU) (0: one of each)
    cfg = load_config("paper", [f"ppo.workers_per_actor={per_actor}"])
    assert needs_by_stage(cfg)["ppo"] == (cpus, gpus)


def test_a_local_ray_too_small_for_a_stage_is_missing_a_cluster_only_warned():
    needs = stage_needs(load_config("paper"))
    laptop = {"CPU": 8.0, "memory": 16e9}
    local = {c.what: c for c in resource_checks(needs, laptop, [laptop], local=True)}
    assert local["resources: sft"].status == MISSING and "8 GPUs (has 0)" in local["resources: sft"].detail
    assert "16 CPUs (has 8)" in local["resources: ppo"].detail
    joined = resource_checks(needs, laptop, [laptop], local=False)
    assert {c.status for c in joined} == {WARN} and "autoscales" in joined[0].detail
    node = {"CPU": 16.0, "GPU": 8.0}  # one 8-GPU pod (cluster/raycluster.paper.yaml) holds every stage
    assert {c.status for c in resource_checks(needs, node, [node], local=False)} == {OK}


def test_an_actor_no_single_node_can_hold_is_flagged_even_when_the_totals_fit():
    needs = [n for n in stage_needs(load_config("paper")) if n.stage == "data"]
    # 17 CPUs and 8 GPUs in all, but the GPU node has 1 CPU: no node holds one 2-CPU + 1-GPU pool actor
    nodes = [{"CPU": 16.0}, {"CPU": 1.0, "GPU": 8.0}]
    (check,) = resource_checks(needs, {"CPU": 17.0, "GPU": 8.0}, nodes, local=False)
    assert check.status == WARN and "no single node fits one captioner, rewriter, aesthetic filter" in check.detail


def test_model_specs_resolve_as_the_loaders_read_them(tmp_path):
    folder = tmp_path / "bloom"
    folder.mkdir()
    assert model_spec_kind("tiny:bloom") == "registered"
    assert model_spec_kind("gguf:smollm2") == "gguf"
    assert model_spec_kind("https://example.com/head.pth") == "url"
    assert model_spec_kind("") == "unset"
    assert model_spec_kind(str(folder)) == "local"
    assert model_spec_kind("/nowhere/bloom") == "local" and model_spec_kind("runs/paper/ppo/model") == "local"
    assert model_spec_kind("bigscience/bloom-1b1") == "hub" and model_spec_kind("gpt2") == "hub"
    assert model_spec_kind("nosuchzoo:bloom") == "unknown-prefix"


def test_the_gguf_prefix_is_the_loaders():
    from bp_ray.models.loading import GGUF_PREFIX
    from bp_ray.preflight.models import GGUF_PREFIX as CHECKED

    assert CHECKED == GGUF_PREFIX  # kept apart only so that the check need not import torch


def test_a_local_folder_must_hold_what_its_loader_reads(tmp_path):
    from bp_ray.models.aesthetic import CONFIG_NAME, HEAD_NAME

    hub = HubProbe(NOBODY, timeout_s=1)
    models = load_config("tiny").models
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_status("policy", str(folder), models, hub)[0] == OK
    status, detail = model_status("diffusion", str(folder), models, hub)
    assert status == MISSING and "no model_index.json" in detail
    status, detail = model_status("aesthetic", str(folder), models, hub)
    assert status == MISSING and CONFIG_NAME in detail and "convert-aesthetic" in detail
    (folder / CONFIG_NAME).write_text("{}")
    (folder / HEAD_NAME).write_bytes(b"")
    assert model_status("aesthetic", str(folder), models, hub)[0] == OK
    gone = tmp_path / "gone"
    assert model_status("policy", str(gone), models, hub) == (MISSING, f"{gone}: does not exist")
    assert not hub.asked  # nothing here needed the hub


def test_zoo_specs_are_checked_without_building_anything(tmp_path):
    models = load_config("tiny", [f"models.zoo_dir={tmp_path}"]).models
    hub = HubProbe(NOBODY, timeout_s=1)
    status, detail = model_status("policy", "tiny:bloom", models, hub)
    assert status == OK and "builds it on first use" in detail and not list(tmp_path.iterdir())
    (tmp_path / "tiny" / "bloom").mkdir(parents=True)
    assert model_status("policy", "tiny:bloom", models, hub) == (OK, f"tiny:bloom: built ({tmp_path}/tiny/bloom)")
    status, detail = model_status("policy", "tiny:gpt", models, hub)
    assert status == MISSING and "the tiny zoo has no 'gpt'" in detail


def test_an_unreachable_hub_is_asked_once_and_named_in_every_missing_model():
    hub = HubProbe(NOBODY, timeout_s=3)
    models = load_config("tiny").models
    start = time.perf_counter()
    first = model_status("policy", "bp-ray-tests/never-cached-a", models, hub)
    second = model_status("captioner", "bp-ray-tests/never-cached-b", models, hub)
    assert time.perf_counter() - start < 3  # connection refused: no timeout waited out
    for spec, (status, detail) in (("a", first), ("b", second)):
        assert status == MISSING and f"never-cached-{spec}: not in the local Hugging Face cache" in detail
    assert hub.unreachable  # the HTTP client's connection error, whichever client huggingface_hub uses
    line = hub.report()
    assert line is not None and line.status == WARN and line.detail.startswith(f"{NOBODY} unreachable")


def test_hf_hub_offline_asks_nothing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", NOBODY)
    hub = HubProbe.from_env()
    assert hub.offline and hub.endpoint == NOBODY
    assert hub.ask("bigscience/bloom-1b1") == (None, "HF_HUB_OFFLINE is set")
    assert "HF_HUB_OFFLINE is set" in hub.report().detail


def test_paper_without_a_source_is_missing_and_says_how_to_give_one():
    (check,) = check_data(load_config("paper").data)
    assert check.status == MISSING and "data.source is not set" in check.detail and "--prompts" in check.detail


def test_a_diffusiondb_folder_and_a_prompt_file_are_read_and_a_missing_path_named(tmp_path):
    from bp_ray.data.corpus import CorpusSpec, write_corpus

    write_corpus(tmp_path / "ddb", CorpusSpec(num_rows=10, image_size=8))
    (tmp_path / "more.txt").write_text("a cat on a sofa\n")
    data = load_config("paper", [f"data.source={tmp_path / 'ddb'}",
                                 f"data.extra_sources={json.dumps([str(tmp_path / 'more.txt'), '/nowhere/ddb'])}"]).data
    folder, text, gone = check_data(data)
    assert folder.status == OK and "DiffusionDB folder, 10 prompts in metadata.parquet, 1 image parts" in folder.detail
    assert text.status == OK and text.what == "data.extra_sources[0]"
    assert gone.status == MISSING and "prompt source not found: /nowhere/ddb" in gone.detail
    # the paper captions DiffusionDB's images: metadata without them is a WARN
    for part in (tmp_path / "ddb" / "images").iterdir():
        part.unlink()
    assert check_data(data)[0].status == WARN


def test_the_corpus_is_ok_and_says_it_is_synthetic():
    (check,) = check_data(load_config("tiny").data)
    assert check.status == OK and "synthetic corpus" in check.detail


def test_storage_is_shared_trivially_on_one_node_and_not_checked_without_a_cluster(tmp_path):
    node = ClusterNode("0" * 56, "127.0.0.1", {"CPU": 2.0})
    one = ClusterView("", True, {"CPU": 2.0}, [node])
    check = shared_path_check("storage: output_dir", str(tmp_path / "run"), one)
    assert check.status == OK and "1 node: shared trivially" in check.detail and not (tmp_path / "run").exists()
    assert shared_path_check("storage: output_dir", str(tmp_path), None).status == WARN
    (tmp_path / "file").write_text("")
    check = shared_path_check("storage: cluster.storage_path", str(tmp_path / "file" / "ckpt"), one)
    assert check.status == MISSING and "is not a folder" in check.detail and "cluster.storage_path" in check.detail


def test_a_ray_address_nobody_listens_at_is_reported_at_once(monkeypatch):
    start = time.perf_counter()
    for address in ("127.0.0.1:9", "ray://127.0.0.1:9"):
        problem = ray_address_problem(address)
        assert problem and "nothing answers there" in problem and "ray start --head" in problem
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # what "auto" finds first
    assert ":9, but nothing answers" in ray_address_problem("auto")  # (loopback as Ray names it: the node's IP)
    assert time.perf_counter() - start < 3


def test_the_report_lines_up_and_counts_each_status():
    text = format_checks([Check("models.policy", OK, "tiny:bloom: built"), Check("data.source", MISSING, "not set")],
                         "bp-ray check (tiny)")
    assert text.splitlines() == ["bp-ray check (tiny)",
                                 "what           status   detail",
                                 "models.policy  OK       tiny:bloom: built",
                                 "data.source    MISSING  not set",
                                 "1 OK, 0 WARN, 1 MISSING: fix the MISSING lines before the job"]
