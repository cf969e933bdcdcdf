"""`bp-ray check`: whether a long job has what it needs, answered in seconds before it starts.

Four groups of checks, each a plain function returning `Check` rows (what, OK / WARN / MISSING, a detail that says
how to fix it): every `models.*` role resolves (a registered zoo, an imported GGUF file, a local folder, the
Hugging Face hub or its local cache, the aesthetic head's URL); the prompt data is there; the cluster has the
resources the largest stage asks for; and the run directory and checkpoint storage are writable and shared by
every node. Nothing is downloaded or built, and the hub is asked only until it fails to answer once, so an offline
machine gets its answer in a few seconds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bp_ray.config import ActorPoolConfig, ClusterConfig, DataConfig, ModelsConfig, PipelineConfig

OK, WARN, MISSING = "OK", "WARN", "MISSING"
HUB_TIMEOUT_S = 3.0
"""Per request to the hub or the aesthetic head's host; the hub gets no more requests once one goes unanswered."""
NODE_TIMEOUT_S = 30.0
"""How long the per-node storage probes may take, all together."""
URI_TIMEOUT_S = 10.0
"""Listing an s3:// or gs:// storage prefix (the client's own retries would take minutes)."""


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, OK / WARN / MISSING, and the detail (with the fix when not OK)."""

    what: str
    status: str
    detail: str


def format_checks(checks: Sequence[Check], title: str = "") -> str:
    """The report: a title, one aligned line per check, and the count of each status."""
    width = max([len("what"), *(len(c.what) for c in checks)])
    lines = [title] if title else []
    lines.append(f"{'what':<{width}}  {'status':<7}  detail")
    lines += [f"{c.what:<{width}}  {c.status:<7}  {c.detail}" for c in checks]
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, MISSING)}
    verdict = "fix the MISSING lines before the job" if counts[MISSING] else "nothing missing"
    lines.append(f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[MISSING]} MISSING: {verdict}")
    return "\n".join(lines)


def run_checks(cfg: PipelineConfig, hub_timeout_s: float = HUB_TIMEOUT_S) -> list[Check]:
    """Every check of `cfg`, in report order. Joins (or starts) Ray for the cluster and storage checks and leaves it
    as it found it."""
    import ray

    checks = check_models(cfg, HubProbe.from_env(hub_timeout_s))
    checks += check_data(cfg.data)
    was_running = ray.is_initialized()
    connected, cluster = connect_cluster(cfg.cluster)
    try:
        checks.append(connected)
        needs = stage_needs(cfg)
        if cluster is None:
            checks.append(Check("resources", WARN, f"not compared (no cluster); the stages need at most "
                                                   f"{largest_needs_text(needs)}"))
        else:
            checks += resource_checks(needs, cluster.totals, [n.resources for n in cluster.nodes], cluster.local)
        checks += check_storage(cfg, cluster)
    finally:
        if ray.is_initialized() and not was_running:
            ray.shutdown()
    return checks


# --- 1. models ------------------------------------------------------------------------------------------------

MODEL_ROLES = ("policy", "rewriter", "rm_backbone", "captioner", "diffusion", "pickscore", "pickscore_processor",
               "aesthetic", "clip_relevance")
KEY_FILE = {"diffusion": "model_index.json", "pickscore_processor": "preprocessor_config.json"}
"""The file a role's loader opens first (config.json for the others): a folder or a cached hub repo without it is
not that role's model."""
AESTHETIC_HEAD_SUFFIXES = (".pth", ".safetensors")
GGUF_PREFIX = "gguf:"
"""loading.GGUF_PREFIX: bp_ray.models.loading imports torch, a second or more of a check meant to take seconds."""


def model_spec_kind(spec: str) -> str:
    """How a `models.*` value resolves, as `loading.resolve_model` and the loaders read it: `unset`, `url`, `gguf`,
    `registered` (`tiny:bloom`: a backend's zoo), `unknown-prefix` (`name:role` that no installed backend
    registers), `local` (an existing path, or one that can only be a path) or `hub` (a Hugging Face id)."""
    from bp_ray.extensions import registry

    if not spec.strip():
        return "unset"
    if spec.startswith(("http://", "https://")):
        return "url"
    if spec.startswith(GGUF_PREFIX):
        return "gguf"
    prefix, sep, _ = spec.partition(":")
    if sep and prefix in registry().model_resolvers:  # loading.registered_prefix, without importing torch
        return "registered"
    # A hub id is `name` or `org/name`; transformers too takes anything that exists on disk for a folder.
    if Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        return "local"
    if ":" in spec:
        return "unknown-prefix"
    return "hub"


@dataclass
class HubProbe:
    """Asks the Hugging Face hub about model ids, one request each, until one goes unanswered: after that every
    answer is that failure, so an offline machine spends one timeout in all, not one per role."""

    endpoint: str
    timeout_s: float = HUB_TIMEOUT_S
    offline: bool = False
    unreachable: str = ""
    """Why the hub did not answer, once it did not."""
    asked: bool = False
    """Whether any model had to be looked up on the hub (was not in the local cache)."""

    @classmethod
    def from_env(cls, timeout_s: float = HUB_TIMEOUT_S) -> HubProbe:
        """HF_ENDPOINT and HF_HUB_OFFLINE as huggingface_hub reads them, read now (its constants are read once, at
        import)."""
        from huggingface_hub import constants

        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        return cls(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT, timeout_s, offline)

    def ask(self, repo_id: str) -> tuple[bool | None, str]:
        """(True, "") when the hub has the model, (False, why) when it answered that it has not (or not for this
        token), (None, why) when there was no answer."""
        self.asked = True
        if self.offline:
            return None, "HF_HUB_OFFLINE is set"
        if self.unreachable:
            return None, self.unreachable
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        try:
            HfApi(endpoint=self.endpoint).model_info(repo_id, timeout=self.timeout_s)
        except GatedRepoError:  # before RepositoryNotFoundError: it is one
            return False, f"gated on {self.endpoint}: accept its terms there and set HF_TOKEN"
        except RepositoryNotFoundError:
            return False, f"{self.endpoint} has no such model (if it is private: set HF_TOKEN)"
        except HfHubHTTPError as error:
            return None, f"{self.endpoint} answered {getattr(error.response, 'status_code', '?')}"
        except Exception as error:  # connection refused, DNS, timeout: the HTTP client's own exception types
            self.unreachable = f"{type(error).__name__}: {error}"
            return None, self.unreachable
        return True, ""

    def report(self) -> Check | None:
        """The hub's own line, when a model had to be looked up there."""
        if not self.asked:
            return None
        if not (self.offline or self.unreachable):
            return Check("models: hub", OK, f"{self.endpoint} answers")
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if self.offline else f"unreachable ({self.unreachable})"
        return Check("models: hub", WARN, f"{self.endpoint} {why}: models not in the local cache "
                                          f"({constants.HF_HUB_CACHE}) cannot be fetched; download them where the hub "
                                          "answers (`hf download ID`) and copy the cache here (HF_HOME), or point the "
                                          "roles at local folders")


def hub_cache_path(repo_id: str, filename: str) -> str | None:
    """The file of a hub model in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub would refuse (HFValidationError) is simply not cached
        return None
    return found if isinstance(found, str) else None


def unused_roles(cfg: PipelineConfig) -> dict[str, str]:
    """Roles this config never loads, with why: their models need not be there."""
    unused = {}
    data_rewrites = cfg.data.llm_backend == "local" and (cfg.data.use_summaries or cfg.data.use_expansions)
    eval_rewrites = "llm" in cfg.eval.systems and cfg.eval.llm_backend == "local"
    if not (data_rewrites or eval_rewrites):
        unused["rewriter"] = (f"data.llm_backend={cfg.data.llm_backend}" if cfg.data.llm_backend != "local"
                              else "data.use_summaries and data.use_expansions are off")
    if not cfg.data.use_captions:
        unused["captioner"] = "data.use_captions=false"
    if not cfg.models.pickscore_processor:
        unused["pickscore_processor"] = "empty: the pickscore model's own processor"
    return unused


def check_models(cfg: PipelineConfig, hub: HubProbe) -> list[Check]:
    """One check per `models.*` role, then serve.model (a WARN at worst: `bp-ray serve` only)."""
    unused = unused_roles(cfg)
    answers: dict[tuple[str, str], tuple[str, str]] = {}  # (role, spec) -> (status, detail); roles share specs

    def check(role: str, spec: str) -> tuple[str, str]:
        key = (role if role in ("diffusion", "aesthetic", "pickscore_processor") else "", spec)
        if key not in answers:
            answers[key] = model_status(role, spec, cfg.models, hub)
        return answers[key]

    checks = []
    for role in MODEL_ROLES:
        spec = getattr(cfg.models, role)
        if role in unused:
            checks.append(Check(f"models.{role}", OK, f"{spec or '-'}: not used ({unused[role]})"))
            continue
        checks.append(Check(f"models.{role}", *check(role, spec)))
    if cfg.serve.model:
        status, detail = check("policy", cfg.serve.model)
        checks.append(Check("serve.model", WARN if status == MISSING else status,
                            detail + ("; only `bp-ray serve` loads it" if status == MISSING else "")))
    hub_line = hub.report()
    return [*checks, hub_line] if hub_line else checks


def model_status(role: str, spec: str, models: ModelsConfig, hub: HubProbe) -> tuple[str, str]:
    """(status, detail) of one role's model; reads the disk and, for a hub id not in the local cache, asks `hub`."""
    kind = model_spec_kind(spec)
    if kind == "unset":
        return MISSING, f"models.{role} is empty: set it to a Hugging Face id, a folder, gguf:<name> or <zoo>:<role>"
    if kind == "registered":
        return _registered_status(spec, models)
    if kind == "unknown-prefix":
        from bp_ray.extensions import registry

        known = ", ".join(f"{p}:" for p in [*registry().model_resolvers, GGUF_PREFIX[:-1]])
        return MISSING, (f"{spec}: no installed backend registers the prefix {spec.partition(':')[0]}: (installed: "
                         f"{known}); a Hugging Face id has no ':'")
    if kind == "gguf":
        return _gguf_status(spec, models)
    if kind == "url":
        return _url_status(spec, hub.timeout_s)
    if kind == "local":
        return _local_status(role, spec)
    if role == "aesthetic":
        return MISSING, (f"{spec}: no such file or folder (the aesthetic scorer is a folder made by `bp-ray models "
                         "convert-aesthetic`, a LAION head file or its URL; it is not loaded from the hub)")
    cached = hub_cache_path(spec, KEY_FILE.get(role, "config.json"))
    if cached:
        return OK, f"{spec}: in the local Hugging Face cache ({Path(cached).parent})"
    found, why = hub.ask(spec)
    if found:
        return OK, f"{spec}: on the hub ({hub.endpoint}), downloaded on first use by every node that loads it"
    if found is False:
        return MISSING, f"{spec}: {why}"
    if hub.offline or hub.unreachable:  # said once, on the hub's own line
        return MISSING, f"{spec}: not in the local Hugging Face cache, and the hub does not answer (see models: hub)"
    return MISSING, f"{spec}: not in the local Hugging Face cache, and {why}"


def _registered_status(spec: str, models: ModelsConfig) -> tuple[str, str]:
    from bp_ray.extensions import registry
    from bp_ray.models.model_cache import default_zoo_dir

    prefix, _, name = spec.partition(":")
    resolver = registry().model_resolvers[prefix]
    if name not in resolver.roles:
        return MISSING, f"{spec}: the {prefix} zoo has no {name!r}; it has {', '.join(resolver.roles)}"
    # Every zoo and imported model lives at <zoo dir>/<prefix>/<role> (as `bp-ray models list` shows it).
    folder = default_zoo_dir(models) / prefix / name
    if folder.is_dir():
        return OK, f"{spec}: built ({folder})"
    return OK, f"{spec}: not built yet; the {prefix} backend builds it on first use, into {folder}"


def _gguf_status(spec: str, models: ModelsConfig) -> tuple[str, str]:
    from bp_ray.models.gguf_import import gguf_dir, packaged_gguf

    name = spec[len(GGUF_PREFIX):]
    try:
        source = packaged_gguf(name)
    except (ValueError, FileNotFoundError) as error:
        return MISSING, f"{spec}: {error}"
    folder = gguf_dir(name, models)
    if (folder / "config.json").is_file():
        return OK, f"{spec}: imported, at {folder}"
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through it
        return MISSING, f"{spec}: {source.name} is installed but importing it needs the gguf package: pip install gguf"
    return OK, f"{spec}: {source.name} installed, imported on first use (now: bp-ray models import-gguf --name {name})"


def _local_status(role: str, spec: str) -> tuple[str, str]:
    path = Path(spec).expanduser()
    if not path.exists():
        return MISSING, f"{spec}: does not exist"
    if role == "aesthetic":
        from bp_ray.models.aesthetic import CONFIG_NAME, HEAD_NAME  # imports torch: only for this role

        if path.is_file():
            if path.suffix in AESTHETIC_HEAD_SUFFIXES:
                return OK, f"{spec}: a LAION aesthetic head file (CLIP ViT-L/14 assumed)"
            return MISSING, f"{spec}: neither a LAION head file ({', '.join(AESTHETIC_HEAD_SUFFIXES)}) nor a folder"
        needed = [CONFIG_NAME, HEAD_NAME]
    else:
        needed = [KEY_FILE.get(role, "config.json")]
    absent = [name for name in needed if not (path / name).is_file()]
    if absent:
        what = ("an aesthetic scorer folder (`bp-ray models convert-aesthetic` writes one)" if role == "aesthetic"
                else "a Hugging Face model folder (save_pretrained)")
        return MISSING, f"{spec}: no {' or '.join(absent)} in it: not {what}"
    return OK, f"{spec}: local folder with {', '.join(needed)}"


def aesthetic_cache_file(url: str) -> Path:
    """Where `load_aesthetic_scorer` keeps a head fetched from `url` (its default cache, the URL's file name)."""
    name = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
    return Path.home() / ".cache" / "bp-ray" / "aesthetic" / name


def url_answers(url: str, timeout_s: float) -> tuple[bool, str]:
    """(True, "") when a HEAD request for `url` succeeds (redirects followed), else (False, why)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return True, ""
    except Exception as error:  # URLError, HTTPError, timeouts: what failed is the answer
        return False, f"{type(error).__name__}: {getattr(error, 'reason', error)}"


def _url_status(url: str, timeout_s: float) -> tuple[str, str]:
    cached = aesthetic_cache_file(url)
    if cached.is_file():
        return OK, f"{cached.name}: fetched earlier, at {cached}"
    answered, why = url_answers(url, timeout_s)
    if answered:
        return OK, f"{cached.name}: its URL answers; fetched on first use into {cached.parent}"
    return MISSING, (f"{cached.name}: not fetched yet, and its URL does not answer ({why}): download it where it "
                     f"does into {cached.parent}, or set models.aesthetic to the file or to a folder made by `bp-ray "
                     "models convert-aesthetic`")


# --- 2. prompt data -------------------------------------------------------------------------------------------

def check_data(data: DataConfig) -> list[Check]:
    """data.source, data.extra_sources and data.pair_files: each opened and its first rows read, as the data stage
    will."""
    from bp_ray.data.pipeline import source_problem

    problem = source_problem(data)
    if problem:
        return [Check("data.source", MISSING, problem)]
    needs_images = data.use_captions or data.aesthetic_threshold is not None
    if data.source == "corpus":
        checks = [Check("data.source", OK, f"corpus: the embedded synthetic corpus ({data.corpus_rows:,} generated "
                                           f"rows, data.corpus_kind={data.corpus_kind}), not DiffusionDB")]
    else:
        checks = [prompt_source_check("data.source", data.source, needs_images)]
    checks += [prompt_source_check(f"data.extra_sources[{i}]", s, needs_images)
               for i, s in enumerate(data.extra_sources)]
    checks += [prompt_source_check(f"data.pair_files[{i}]", s, False) for i, s in enumerate(data.pair_files)]
    return checks


def prompt_source_check(what: str, source: str, needs_images: bool) -> Check:
    """A DiffusionDB folder or prompt file: its first rows read with the data stage's reader; for a folder, whether
    its images are there when captions or the aesthetic filter need them."""
    import pyarrow.parquet as pq

    from bp_ray.data import columns as C
    from bp_ray.data.prompt_io import METADATA_FILES, SUPPORTED_FORMATS, read_prompts

    try:
        table, _ = read_prompts(source, limit=5)
    except Exception as error:  # whatever stops the reader stops the data stage: that is the answer
        formats = "" if "expected" in str(error) else f" (expected {SUPPORTED_FORMATS})"
        return Check(what, MISSING, f"{error}{formats}")
    path = Path(source)
    if not path.is_dir():
        return Check(what, OK, f"{source}: a {path.suffix or 'text'} prompt file, its first rows read")
    metadata = next(path / name for name in METADATA_FILES if (path / name).is_file())
    rows = pq.ParquetFile(metadata).metadata.num_rows
    parts = sum(1 for pattern in ("images/part-*", "diffusiondb-large-part-*/part-*", "part-*")
                for _ in path.glob(pattern))
    if needs_images and not (table[C.IMAGE_REF] != "").any():
        return Check(what, WARN, f"{source}: DiffusionDB metadata ({rows:,} rows in {metadata.name}) but not the "
                                 "images of its first rows (images/part-*.zip): download them, or turn off what needs "
                                 "them (data.use_captions=false, data.aesthetic_threshold=null)")
    return Check(what, OK, f"{source}: DiffusionDB folder, {rows:,} prompts in {metadata.name}, {parts:,} image parts")


# --- 3. cluster and resources ---------------------------------------------------------------------------------

@dataclass
class Need:
    """What one stage holds at once to make progress. Stages run one after another (the pipeline runs them in
    turn), so the cluster must fit the largest, not their sum."""

    stage: str
    cpus: float = 0.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources (an actor pool's `resources`, e.g. a node type)."""
    units: list[tuple[str, float, float, dict[str, float]]] = field(default_factory=list)
    """(what, CPUs, GPUs, custom) of one actor or worker: each must fit on one node."""
    parts: list[str] = field(default_factory=list)

    def add(self, what: str, count: int, cpus: float, gpus: float, custom: Mapping[str, float] | None = None) -> None:
        if count <= 0:
            return
        custom = dict(custom or {})
        self.cpus += count * cpus
        self.gpus += count * gpus
        for name, amount in custom.items():
            self.custom[name] = self.custom.get(name, 0.0) + count * amount
        self.units.append((what, cpus, gpus, custom))
        self.parts.append(f"{count} x {what} ({resources_text(cpus, gpus, custom)})")

    def add_pool(self, what: str, pool: ActorPoolConfig) -> None:
        """An autoscaling pool holds at least min_actors actors."""
        self.add(what, pool.min_actors, pool.num_cpus, pool.num_gpus, pool.resources)


def resources_text(cpus: float, gpus: float, custom: Mapping[str, float] | None = None) -> str:
    text = f"{cpus:g} CPU{'' if cpus == 1 else 's'}" + (f", {gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus else "")
    return text + "".join(f", {amount:g} {name}" for name, amount in (custom or {}).items())


def stage_needs(cfg: PipelineConfig) -> list[Need]:
    """Each stage's simultaneous need (and `bp-ray serve`'s at its minimum size), as each stage asks Ray for it:
    the data and reward pools at their min_actors, the Ray Train workers (one GPU each with use_gpu: train/loop.py
    fit), PPO's workers with its reference and reward actors (train/ppo.py run_ppo), the evaluation's reward
    service beside one rewrite task (eval/run.py), Serve's replicas (serve/runner.py start_serve)."""
    d, ppo, s = cfg.data, cfg.ppo, cfg.serve
    data = Need("data")
    if d.use_captions:
        data.add_pool("captioner", d.captioner_pool)
    if d.use_summaries or d.use_expansions:
        data.add_pool("rewriter", d.rewriter_pool)
    if d.aesthetic_threshold is not None:
        data.add_pool("aesthetic filter", d.aesthetic_pool)

    rewards = Need("rewards")
    if cfg.rewards.fused:
        rewards.add_pool("fused renderer-scorer", d.renderer_pool)
    else:
        rewards.add_pool("renderer", d.renderer_pool)
        rewards.add_pool("scorer", d.scorer_pool)

    training = []
    for name in ("sft", "rm", "ppo"):
        r = getattr(cfg, name).resources
        need = Need(name)
        need.add("train worker", r.num_workers, r.cpus_per_worker, r.gpus_per_worker if r.use_gpu else 0.0)
        training.append(need)
    # K workers share one reference and one reward actor when ppo.workers_per_actor is K (absent or 0: one of each).
    per_actor = ppo.workers_per_actor
    groups = math.ceil(ppo.resources.num_workers / per_actor) if per_actor > 0 else 1
    online = ppo.reward_source == "online"
    training[2].add("reference actor", groups, ppo.actor_cpus, ppo.actor_gpus)
    training[2].add("reward actor", groups, ppo.actor_cpus, ppo.actor_gpus, d.scorer_pool.resources if online else None)
    if ppo.async_rollout:
        training[2].add("rollout actor", ppo.resources.num_workers, ppo.actor_cpus, ppo.actor_gpus)

    # One reward service with the scorer pool's resources, and the rewrite tasks one at a time at least.
    evaluation = Need("eval")
    evaluation.add("reward service", 1, d.scorer_pool.num_cpus, d.scorer_pool.num_gpus, d.scorer_pool.resources)
    if {"sft", "ppo", "llm"} & set(cfg.eval.systems):
        evaluation.add("rewrite task", 1, d.rewriter_pool.num_cpus, d.rewriter_pool.num_gpus, d.rewriter_pool.resources)

    serve = Need("serve")
    serve.add("generator replica", max(1, s.min_replicas), s.num_cpus_per_replica, s.num_gpus_per_replica)
    serve.add("ingress replica", s.ingress_replicas, s.ingress_cpus, 0.0)
    if s.enable_render:
        serve.add("renderer", 1, s.render_cpus, s.render_gpus)
    return [data, rewards, *training, evaluation, serve]


def largest_needs_text(needs: Sequence[Need]) -> str:
    cpus = max(needs, key=lambda n: n.cpus)
    gpus = max(needs, key=lambda n: n.gpus)
    return f"{cpus.cpus:g} CPUs ({cpus.stage}) and {gpus.gpus:g} GPUs ({gpus.stage})"


def shortfalls(need: Need, have: Mapping[str, float]) -> list[str]:
    """What `need` asks beyond `have` (Ray's resource names: CPU, GPU, custom), e.g. ["8 GPUs (has 0)"]."""
    short = []
    for name, amount in (("CPU", need.cpus), ("GPU", need.gpus), *need.custom.items()):
        if amount > have.get(name, 0.0) + 1e-9:
            short.append(f"{amount:g} {name}{'s' if name in ('CPU', 'GPU') and amount != 1 else ''} "
                         f"(has {have.get(name, 0.0):g})")
    return short


def resource_checks(needs: Sequence[Need], totals: Mapping[str, float], nodes: Sequence[Mapping[str, float]],
                    local: bool) -> list[Check]:
    """One check per stage: does its need fit the cluster's totals, and each of its actors on some node. On a local
    Ray a shortfall is MISSING (the stage would wait forever); a cluster may autoscale, so there it is a WARN."""
    checks = []
    bad = MISSING if local else WARN
    fix = ("lower the stage's resources (num_workers, cpus_per_worker, actor_cpus, the pools' num_cpus / num_gpus / "
           "min_actors) or join a cluster (cluster.address)" if local else
           "enough only if the cluster autoscales to it; else add nodes or lower the stage's resources")
    for need in needs:
        asks = f"{resources_text(need.cpus, need.gpus, need.custom)}: {'; '.join(need.parts) or 'nothing'}"
        short = shortfalls(need, totals)
        if short:
            checks.append(Check(f"resources: {need.stage}", bad, f"needs {', '.join(short)}; asks {asks}; {fix}"))
            continue
        no_node = [what for what, cpus, gpus, custom in need.units
                   if not any(not shortfalls(Need("", cpus, gpus, custom), node) for node in nodes)]
        if no_node:
            checks.append(Check(f"resources: {need.stage}", bad, f"no single node fits one {', '.join(no_node)}; asks "
                                                                 f"{asks}; {fix}"))
            continue
        checks.append(Check(f"resources: {need.stage}", OK, f"asks {asks}"))
    return checks


@dataclass
class ClusterNode:
    node_id: str
    ip: str
    resources: dict[str, float]


@dataclass
class ClusterView:
    """The Ray cluster the check joined (or started): totals and alive nodes."""

    address: str
    local: bool
    totals: dict[str, float]
    nodes: list[ClusterNode]


def connect_cluster(cluster: ClusterConfig) -> tuple[Check, ClusterView | None]:
    """Join cluster.address (or RAY_ADDRESS) as the stages do, or, with neither, start the local Ray a stage would
    start; (the check, the cluster or None). An address nobody answers at is reported without waiting out Ray's
    own connection retries (minutes)."""
    import ray

    from bp_ray.ray_runtime import init_ray

    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    local = address in ("", "local")
    if not local:
        problem = ray_address_problem(address)
        if problem:
            return Check("cluster", MISSING, problem), None
    try:
        init_ray(cluster)
    except Exception as error:  # whatever ray.init raises is what the stages would hit
        return Check("cluster", MISSING, f"cannot {'start a local Ray' if local else 'join ' + address}: {error}"), None
    nodes = [ClusterNode(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]
    view = ClusterView(address, local, dict(ray.cluster_resources()), nodes)
    how = ("started a local Ray for this check (each command starts its own: cluster.address is empty)" if local
           else f"joined {address}" + ("" if "://" in address or address[-1:].isdigit()
                                        else f" ({ray.get_runtime_context().gcs_address})"))
    memory_gib = view.totals.get("memory", 0.0) / 2**30
    return Check("cluster", OK, f"{how}: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
                                f"{view.totals.get('CPU', 0):g} CPUs, {view.totals.get('GPU', 0):g} GPUs, "
                                f"{memory_gib:.0f} GiB memory (no stage reserves memory)"), view


START_HINT = ("start one (`ray start --head` here, `ray start --address=<head>:6379` on every other node) or name "
              "it (--set cluster.address=<head>:6379, or RAY_ADDRESS); --set cluster.address= runs the stages on a "
              "local Ray instead")


def ray_address_problem(address: str, timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """Why nothing will answer at a Ray address (`auto`, host:port, ray://host:port), found with one TCP connection;
    None when something listens there."""
    if address == "auto":
        try:
            # Private, but the only way to learn what "auto" means without connecting: ray.init retries a stale
            # record of a stopped cluster for minutes.
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:
            return None
        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:  # no running instance to be found
            target = None
        except Exception as error:
            return f"cluster.address=auto: {error}"
        if target is None:
            return f"cluster.address=auto, but no Ray cluster is running on this machine: {START_HINT}"
        where = f"cluster.address=auto finds {target}"
    else:
        target = address.split("://", 1)[-1]
        where = f"cluster.address={address}"
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return None  # a form ray.init knows better than this check: let it say
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        return f"{where}, but nothing answers there ({error}): {START_HINT}"
    return None


# --- 4. storage -----------------------------------------------------------------------------------------------

def check_storage(cfg: PipelineConfig, cluster: ClusterView | None) -> list[Check]:
    """The run directory (every stage writes there, Ray Data tasks included) and cluster.storage_path (Ray Train
    checkpoints; empty: under the run directory): writable, and the same files on every alive node."""
    paths = {"storage: output_dir": cfg.output_dir}
    if cfg.cluster.storage_path:
        paths["storage: cluster.storage_path"] = cfg.cluster.storage_path
    return [uri_check(what, path) if "://" in path else shared_path_check(what, path, cluster)
            for what, path in paths.items()]


def uri_check(what: str, uri: str, timeout_s: float = URI_TIMEOUT_S) -> Check:
    """An s3:// or gs:// prefix listed with pyarrow.fs (as Ray Train will write it) in a child process, so that a
    client retrying for minutes can be stopped."""
    code = ("import sys, pyarrow.fs as f; fs, p = f.FileSystem.from_uri(sys.argv[1]); "
            "fs.get_file_info(f.FileSelector(p, allow_not_found=True))")
    try:
        done = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Check(what, MISSING, f"{uri}: no answer in {timeout_s:g} s (network, region or credentials?)")
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return Check(what, MISSING, f"{uri}: cannot list it: {last}")
    return Check(what, OK, f"{uri}: listable from here (every node needs the same credentials)")


def writable_folder(path: Path) -> tuple[Path, str]:
    """(the folder a probe file can go in: `path`, else its nearest existing parent, which the first stage creates
    it in; why it cannot be written, or "")."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return folder, f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return folder, f"{folder} is not writable"
    return folder, ""


def shared_path_check(what: str, path_text: str, cluster: ClusterView | None) -> Check:
    """A local path: writable here, and on a multi-node cluster a file written here is seen by every alive node (a
    zero-CPU task pinned to each reads it back)."""
    path = Path(path_text).expanduser().resolve()  # Ray workers run in other working directories
    folder, problem = writable_folder(path)
    where = path_text if folder == path else f"{path_text} (not there yet, to be created under {folder})"
    if problem:
        return Check(what, MISSING, f"{where}: {problem}: mount the storage there or point {what.split(': ')[1]} at "
                                    "a writable folder")
    if cluster is None:
        return Check(what, WARN, f"{where}: writable here; whether every node shares it was not checked (no cluster)")
    if len(cluster.nodes) <= 1:
        return Check(what, OK, f"{where}: writable; 1 node: shared trivially")
    token = uuid.uuid4().hex
    probe = folder / f".bp-ray-check-{token}"
    try:
        probe.write_text(token)
        blind = nodes_not_seeing(probe, token, cluster.nodes)
    except OSError as error:
        return Check(what, MISSING, f"{where}: cannot write a file there: {error}")
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        return Check(what, MISSING, f"{where}: not shared: node(s) {', '.join(blind)} cannot read a file written "
                                    "here; put it on storage every node mounts (NFS) at the same path, or use "
                                    "s3:// / gs:// for cluster.storage_path")
    return Check(what, OK, f"{where}: writable, and all {len(cluster.nodes)} nodes read the same files")


def nodes_not_seeing(probe: Path, token: str, nodes: Sequence[ClusterNode],
                     timeout_s: float = NODE_TIMEOUT_S) -> list[str]:
    """IPs of the nodes where `probe` cannot be read back as `token` (or whose task did not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Defined here, not at module level, so that cloudpickle sends it by value: a node without bp-ray installed
    # (or another version of it) can still run it.
    def read(path: str) -> str:
        try:
            with open(path) as handle:
                return handle.read()
        except OSError:
            return ""

    task = ray.remote(read)
    refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node.node_id, soft=False)).remote(str(probe)): node for node in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    seen = {refs[ref].node_id for ref in ready if _get_or_empty(ref) == token}
    return [node.ip for node in nodes if node.node_id not in seen]


def _get_or_empty(ref: Any) -> str:
    import ray

    try:
        return ray.get(ref)
    except Exception:  # a task that failed on its node: that node did not read the file
        return ""
