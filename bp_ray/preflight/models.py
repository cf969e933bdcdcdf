"""Whether every `models.*` role resolves, without building or downloading anything."""

from __future__ import annotations

import importlib.util
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bp_ray.config import ModelsConfig, PipelineConfig
from bp_ray.preflight.report import HUB_TIMEOUT_S, MISSING, OK, WARN, Check

MODEL_ROLES = ("policy", "rewriter", "rm_backbone", "captioner", "diffusion", "pickscore", "pickscore_processor",
               "aesthetic", "clip_relevance", "text_encoder")
KEY_FILE = {"diffusion": "model_index.json", "pickscore_processor": "preprocessor_config.json"}
"""The file a role's loader opens first (config.json for the others): a folder or a cached hub repo without it is
not that role's model."""
AESTHETIC_HEAD_SUFFIXES = (".pth", ".safetensors")
GGUF_PREFIX = "gguf:"
"""loading.GGUF_PREFIX: bp_ray.models.loading imports torch, a second or more of a check meant to take seconds."""
PACKAGED_PREFIX = "pkg:"
"""loading.PACKAGED_PREFIX, for the same reason."""


def model_spec_kind(spec: str) -> str:
    """How a `models.*` value resolves, as `loading.resolve_model` and the loaders read it: `unset`, `url`, `gguf`,
    `packaged` (`pkg:<name>`), `registered` (`tiny:bloom`: a backend's zoo), `unknown-prefix` (`name:role` that no
    installed backend registers), `local` (an existing path, or one that can only be a path) or `hub` (a Hugging
    Face id)."""
    from bp_ray.extensions import registry

    if not spec.strip():
        return "unset"
    if spec.startswith(("http://", "https://")):
        return "url"
    if spec.startswith(GGUF_PREFIX):
        return "gguf"
    if spec.startswith(PACKAGED_PREFIX):
        return "packaged"
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
    if not cfg.models.text_encoder:
        unused["text_encoder"] = "empty: no content similarity in eval-text, no text-encoder relevance in PPO"
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

        known = ", ".join(f"{p}:" for p in [*registry().model_resolvers, GGUF_PREFIX[:-1], PACKAGED_PREFIX[:-1]])
        return MISSING, (f"{spec}: no installed backend registers the prefix {spec.partition(':')[0]}: (installed: "
                         f"{known}); a Hugging Face id has no ':'")
    if kind == "gguf":
        return _gguf_status(spec, models)
    if kind == "packaged":
        return _packaged_status(spec, models)
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


def _packaged_status(spec: str, models: ModelsConfig) -> tuple[str, str]:
    from bp_ray.models.model_cache import default_zoo_dir
    from bp_ray.models.packaged import packaged_folder

    name = spec[len(PACKAGED_PREFIX):]
    try:
        source, _ = packaged_folder(name)
    except (ValueError, FileNotFoundError) as error:
        return MISSING, f"{spec}: {error}"
    folder = default_zoo_dir(models) / "pkg" / name
    if (folder / "config.json").is_file():
        return OK, f"{spec}: copied into the zoo, at {folder}"
    return OK, f"{spec}: installed at {source}, copied into the zoo on first use"


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
