"""cluster/: the KubeRay manifests against KubeRay's CRD schemas, the Serve config the RayService embeds, RayJob
entrypoints against bp-ray's own parser and the run layout, cluster sizes against the paper preset, and the VM
launcher config against Ray's ray-schema.json. Pure YAML + JSON Schema: no Ray started, no Kubernetes."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from bp_ray.cli import build_parser
from bp_ray.config_loader import load_config
from bp_ray.layout import RunLayout
from bp_ray.stages import STAGE_NAMES as STAGES
from tests.conftest import REPO, shared_path

CLUSTER = REPO / "cluster"
RAY_VERSION = "2.60.0"
CPU_BASE, GPU_BASE = f"rayproject/ray:{RAY_VERSION}-py311", f"rayproject/ray:{RAY_VERSION}-py311-gpu"
IMAGE_REPO_DIR = PurePosixPath("/home/ray/bp-ray")  # WORKDIR of cluster/Dockerfile (checked below)
SHARED_MOUNT = PurePosixPath("/mnt/shared")
RUN_DIR = SHARED_MOUNT / "bp-ray" / "paper"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# KubeRay's name limits: a cluster name leaves room for "-serve-svc" in 63 characters; RayJob and RayService
# names get a 6-character suffix for the cluster they create.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# CLI words of a stage command -> the stage folder it writes; input option -> the stage folder it reads.
STAGE_OF_COMMAND = {("data", "generate"): "data", ("rewards", "label"): "rewards", ("train", "sft"): "sft",
                    ("train", "rm"): "rm", ("train", "ppo"): "ppo", ("eval",): "eval"}
STAGE_OF_INPUT = {"corpus": "corpus", "pairs": "data", "labels": "rewards", "sft": "sft", "rm": "rm", "ppo": "ppo"}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def kuberay_files() -> list[Path]:
    """cluster/*.yaml whose `kind` is a KubeRay resource (not the Serve configs, the launcher or the PVC)."""
    docs = {path: load_yaml(path) for path in sorted(CLUSTER.glob("*.yaml"))}
    return [path for path, doc in docs.items() if isinstance(doc, dict) and doc.get("kind") in CRD_FILES]


KUBERAY_FILES = kuberay_files()


def manifests(kind: str) -> dict[str, dict]:
    return {path.name: load_yaml(path) for path in KUBERAY_FILES if load_yaml(path)["kind"] == kind}


# --- schemas --------------------------------------------------------------------------------------------------

def kubernetes_to_json_schema(schema: dict) -> dict:
    """A copy of a CRD's OpenAPI v3 schema that a plain JSON Schema validator reads the way the API server does.

    - `x-kubernetes-int-or-string: true`: the value is an integer or a string (a quantity such as 8, "8" or
      "64Gi"), so any `type` is replaced by anyOf [integer, string]; the node's `pattern` still checks strings.
    - An object schema with `properties` and no `additionalProperties` rejects unknown fields, as `kubectl
      apply`'s strict field validation does (the API server would otherwise drop a misspelt field silently),
      unless it carries `x-kubernetes-preserve-unknown-fields`.
    Walks schema keywords only, so a field that happens to be called `type` or `properties` is left alone.
    """
    out = dict(schema)
    for key in ("properties", "patternProperties", "definitions"):
        if key in out:
            out[key] = {name: kubernetes_to_json_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = kubernetes_to_json_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [kubernetes_to_json_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd(kind: str) -> tuple[str, jsonschema.protocols.Validator]:
    """(the CRD's kind name, a validator of its v1 schema) for one KubeRay resource."""
    doc = load_yaml(shared_path("data", "kuberay-crds", CRD_FILES[kind]))
    (v1,) = [version for version in doc["spec"]["versions"] if version["name"] == "v1"]
    schema = kubernetes_to_json_schema(v1["schema"]["openAPIV3Schema"])
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_cls.check_schema(schema)
    return doc["spec"]["names"]["kind"], validator_cls(schema)


def manifest_errors(doc: dict) -> list[str]:
    """Everything wrong with a KubeRay manifest that can be told without a cluster: its CRD's v1 schema, the group
    version, the kind and the name (KubeRay's DNS-1035 and length rules)."""
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    crd_kind, validator = crd(kind)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if kind != crd_kind:
        errors.append(f"kind {kind!r} is not the CRD's {crd_kind!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not name:
        errors.append("metadata.name is missing")
    elif not DNS_1035_LABEL.fullmatch(name) or len(name) > MAX_NAME[kind]:
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    return errors


@functools.cache
def launcher_validator() -> jsonschema.Draft7Validator:
    spec = importlib.util.find_spec("ray")  # locates the installed package without importing (starting) Ray
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


# --- KubeRay manifests against the CRDs ---------------------------------------------------------------------------

def test_the_expected_manifests_are_there():
    assert sorted(p.name for p in KUBERAY_FILES) == sorted(
        ["raycluster.paper.yaml", "rayservice.paper.yaml", "rayjob.pipeline.yaml",
         *(f"rayjob.{stage}.yaml" for stage in ("data", "rewards", "sft", "rm", "ppo", "eval"))])


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_manifest_validates_against_its_crd(path):
    assert manifest_errors(load_yaml(path)) == []


def test_int_or_string_quantities_are_integers_or_strings():
    _, validator = crd("RayCluster")
    quantity = validator.schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"][
        "properties"]["spec"]["properties"]["containers"]["items"]["properties"]["resources"]["properties"][
        "limits"]["additionalProperties"]
    check = type(validator)(quantity)
    assert "type" not in quantity and quantity["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    for good in (8, "8", "64Gi", "500m"):
        assert check.is_valid(good), good
    for bad in ("eight", [8], 1.5, None):  # 1.5 is neither int nor string; quantities as floats are written "1.5"
        assert not check.is_valid(bad), bad


def _worker_group(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]


def _break(mutate):
    doc = copy.deepcopy(load_yaml(CLUSTER / "raycluster.paper.yaml"))
    mutate(doc)
    return doc


BROKEN_RAYCLUSTERS = {
    # workerGroupSpecs items require groupName, minReplicas, maxReplicas and template.
    "worker group without groupName": (lambda d: _worker_group(d).pop("groupName"), "'groupName' is a required"),
    "replicas is a list": (lambda d: _worker_group(d).update(replicas=[0, 1]), "is not of type 'integer'"),
    "misspelt field": (lambda d: _worker_group(d).update(minReplica=0), "Additional properties are not allowed"),
    "headGroupSpec missing": (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required"),
    "GPU count not a quantity": (
        lambda d: d["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"nvidia.com/gpu": "eight"}), "does not match"),
    "rayStartParams value not a string": (
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "is not of type 'string'"),
    "wrong apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha2"), "is not ray.io/v1"),
    "name not a DNS-1035 label": (lambda d: d["metadata"].update(name="BP_Ray"), "DNS-1035"),
    "no name": (lambda d: d["metadata"].pop("name"), "metadata.name is missing"),
}


@pytest.mark.parametrize("case", BROKEN_RAYCLUSTERS)
def test_broken_raycluster_is_rejected(case):
    mutate, message = BROKEN_RAYCLUSTERS[case]
    errors = manifest_errors(_break(mutate))
    assert any(message in error for error in errors), errors


def test_broken_rayjob_and_rayservice_are_rejected():
    job = copy.deepcopy(load_yaml(CLUSTER / "rayjob.sft.yaml"))
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("is not of type 'boolean'" in e for e in manifest_errors(job))
    service = copy.deepcopy(load_yaml(CLUSTER / "rayservice.paper.yaml"))
    service["spec"]["serveConfigV2"] = yaml.safe_load(service["spec"]["serveConfigV2"])  # KubeRay wants a string
    assert any(e.startswith("spec/serveConfigV2") for e in manifest_errors(service))
    service["kind"] = "RayServe"
    assert manifest_errors(service) == ["kind 'RayServe' is not one of ['RayCluster', 'RayJob', 'RayService']"]


# --- what the manifests say -------------------------------------------------------------------------------------

def test_rayservice_serves_exactly_serve_paper_yaml():
    (service,) = manifests("RayService").values()
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == load_yaml(CLUSTER / "serve.paper.yaml")
    assert embedded["applications"][0]["args"]["preset"] == "paper"


def test_pipeline_job_embeds_the_raycluster_spec():
    cluster = load_yaml(CLUSTER / "raycluster.paper.yaml")
    pipeline = load_yaml(CLUSTER / "rayjob.pipeline.yaml")
    assert pipeline["spec"]["rayClusterSpec"] == cluster["spec"]
    assert pipeline["spec"]["shutdownAfterJobFinishes"] is True and pipeline["spec"]["ttlSecondsAfterFinished"] > 0


def entrypoint(job: dict) -> tuple[Path, list[str], Any]:
    """(the repository's copy of the job script, its CLI words, the parsed arguments) of a RayJob entrypoint."""
    python, script, *rest = shlex.split(job["spec"]["entrypoint"])
    assert python == "python"
    script = PurePosixPath(script)
    assert script.parent == IMAGE_REPO_DIR / "jobs", f"{script} is not a jobs/ script of the image"
    local = REPO / "jobs" / script.name
    assert local.is_file(), f"{local} does not exist"
    call = re.search(r"main\(\[(.*?)\*sys\.argv\[1:\]\]\)", local.read_text())
    assert call, f"{local} does not call bp_ray.cli.main([<words>, *sys.argv[1:]])"
    words = ast.literal_eval(f"[{call.group(1)}]")
    try:
        args = build_parser().parse_args([*words, *rest])
    except SystemExit as exc:  # argparse exits on an unknown option; say which entrypoint
        raise AssertionError(f"bp-ray {' '.join(words)} rejects {rest}") from exc
    return local, words, args


@pytest.mark.parametrize("name", sorted(manifests("RayJob")))
def test_rayjob_entrypoint_parses_with_the_paper_preset(name):
    job = manifests("RayJob")[name]
    _, _, args = entrypoint(job)
    assert args.preset == "paper" and args.config is None and args.overrides == []
    assert PurePosixPath(args.out).is_relative_to(SHARED_MOUNT)
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_stage_jobs_follow_the_run_layout_and_read_earlier_stages():
    layout = RunLayout(Path(RUN_DIR))
    stages = {}
    for name, job in manifests("RayJob").items():
        _, words, args = entrypoint(job)
        if words == ["pipeline"]:
            assert Path(args.out) == layout.root, name
            assert "rayClusterSpec" in job["spec"] and "clusterSelector" not in job["spec"], name
            continue
        stage = STAGE_OF_COMMAND[tuple(words)]
        stages[stage] = name
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "bp-ray"}, name
        assert Path(args.out) == layout.stage_dir(stage), name
        for option, input_stage in STAGE_OF_INPUT.items():
            given = getattr(args, option, None)
            if given is not None:
                assert Path(given) == layout.stage_dir(input_stage), f"{name}: --{option} {given}"
                assert STAGES.index(input_stage) < STAGES.index(stage), f"{name}: --{option} is not an earlier stage"
    assert sorted(stages) == sorted(STAGE_OF_COMMAND.values())
    (cluster,) = manifests("RayCluster").values()
    assert cluster["metadata"]["name"] == "bp-ray"


def test_every_job_script_has_a_rayjob():
    used = {entrypoint(job)[0].name for job in manifests("RayJob").values()}
    assert used == {path.name for path in (REPO / "jobs").glob("*.py")}


# --- cluster shape: autoscaling, GPUs, images, the shared volume, sizes -----------------------------------------

def cluster_specs() -> dict[str, dict]:
    """Every Ray cluster the manifests create, by where it is written."""
    specs = {name: doc["spec"] for name, doc in manifests("RayCluster").items()}
    specs |= {name: doc["spec"]["rayClusterSpec"] for name, doc in manifests("RayJob").items()
              if "rayClusterSpec" in doc["spec"]}
    specs |= {name: doc["spec"]["rayClusterConfig"] for name, doc in manifests("RayService").items()}
    return specs


def pod_groups(spec: dict) -> list[tuple[dict, dict]]:
    """(group spec, pod spec) of the head and every worker group."""
    return [(group, group["template"]["spec"]) for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpu_groups(spec: dict) -> list[tuple[dict, float, int]]:
    """(worker group, CPUs per pod, GPUs per pod) of the groups whose pods request GPUs."""
    out = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            out.append((group, cpus(limits["cpu"]), int(limits["nvidia.com/gpu"])))
    return out


@pytest.mark.parametrize("where", sorted(cluster_specs()))
def test_cluster_autoscales_from_zero_with_a_gpu_group_and_an_idle_head(where):
    spec = cluster_specs()[where]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(group["minReplicas"] == 0 for group in spec["workerGroupSpecs"])
    groups = gpu_groups(spec)
    assert groups, "no worker group requests nvidia.com/gpu"
    for group, _, gpus in groups:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert gpus >= 1 and resources["requests"]["nvidia.com/gpu"] == gpus
        assert group["maxReplicas"] >= 1


@pytest.mark.parametrize("where", sorted(cluster_specs()))
def test_every_pod_runs_the_bp_ray_image_and_mounts_the_shared_volume(where):
    claim = load_yaml(CLUSTER / "pvc.shared.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for _, pod in pod_groups(cluster_specs()[where]):
        (container,) = pod["containers"]
        wants_gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        assert container["image"].endswith(f"/bp-ray:{RAY_VERSION}-py311" + ("-gpu" if wants_gpu else ""))
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == SHARED_MOUNT]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_dockerfile_builds_the_image_the_manifests_expect():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={GPU_BASE}\n" in text and f"--build-arg BASE_IMAGE={CPU_BASE}" in text
    assert re.search(r"^WORKDIR (\S+)$", text, re.M).group(1) == str(IMAGE_REPO_DIR)
    assert f'pip install --no-cache-dir -e . "ray[train,serve,data]=={RAY_VERSION}"' in text
    assert importlib.metadata.version("ray") == RAY_VERSION  # the version the tests and the images share


def test_training_cluster_fits_the_paper_presets_stages():
    cfg = load_config("paper")
    for where in ("raycluster.paper.yaml", "rayjob.pipeline.yaml"):
        ((group, pod_cpus, pod_gpus),) = gpu_groups(cluster_specs()[where])
        total_gpus = pod_gpus * group["maxReplicas"]
        pools = [cfg.data.captioner_pool, cfg.data.rewriter_pool, cfg.data.aesthetic_pool, cfg.data.renderer_pool,
                 cfg.data.scorer_pool]
        for pool in pools:  # 2 CPUs + 1 GPU per actor: a GPU pod full of actors still has the CPUs they need
            assert pod_gpus / pool.num_gpus * pool.num_cpus <= pod_cpus
            assert pool.max_actors * pool.num_gpus <= total_gpus
        for train in (cfg.sft.resources, cfg.rm.resources, cfg.ppo.resources):  # one 8-GPU pod holds a whole run
            assert train.use_gpu and train.num_workers <= pod_gpus
            assert train.num_workers * train.cpus_per_worker <= pod_cpus


def test_serving_cluster_fits_the_paper_presets_replicas():
    serve = load_config("paper").serve
    (spec,) = [doc["spec"]["rayClusterConfig"] for doc in manifests("RayService").values()]
    ((group, pod_cpus, pod_gpus),) = gpu_groups(spec)
    assert pod_gpus >= serve.num_gpus_per_replica and pod_cpus >= serve.num_cpus_per_replica
    assert pod_gpus >= serve.render_gpus and pod_cpus >= serve.render_cpus
    # one GPU replica per pod: every generator at max_replicas plus the renderer
    assert group["maxReplicas"] * pod_gpus >= serve.max_replicas * serve.num_gpus_per_replica + serve.render_gpus
    cpu_groups = [g for g in spec["workerGroupSpecs"] if g is not group]
    cpu_capacity = sum(cpus(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) * g["maxReplicas"]
                       for g in cpu_groups)
    assert cpu_capacity >= serve.ingress_replicas * serve.ingress_cpus


# --- the VM cluster launcher ------------------------------------------------------------------------------------

def test_launcher_config_validates_against_rays_schema():
    config = load_yaml(CLUSTER / "cluster-launcher.paper.yaml")
    assert list(launcher_validator().iter_errors(config)) == []
    assert config["docker"]["image"] == CPU_BASE
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: node for name, node in node_types.items() if name != config["head_node_type"]}
    assert workers and all(node["min_workers"] == 0 for node in workers.values())
    gpu_nodes = [node for node in workers.values() if node["resources"].get("GPU", 0) > 0]
    assert gpu_nodes and all(node["docker"]["worker_image"] == GPU_BASE for node in gpu_nodes)
    assert config["file_mounts"] == {str(IMAGE_REPO_DIR): "."}
    assert any(f"pip install --no-cache-dir -e {IMAGE_REPO_DIR} " in command for command in config["setup_commands"])
    assert "--volume /mnt/shared:/mnt/shared" in config["docker"]["run_options"]


def test_broken_launcher_config_is_rejected():
    config = load_yaml(CLUSTER / "cluster-launcher.paper.yaml")
    config["setup_command"] = config.pop("setup_commands")  # misspelt top-level key
    config["available_node_types"]["gpu"]["min_workers"] = "0"
    messages = [error.message for error in launcher_validator().iter_errors(config)]
    assert any("Additional properties are not allowed ('setup_command'" in m for m in messages), messages
    assert any("'0' is not of type 'integer'" in m for m in messages), messages
