"""Loading a configuration: dataclass defaults <- configs/<preset>.yaml <- "section.key=value" overrides.

A preset may build on another (`base: tiny`), and `${NAME}` in a value is the environment variable NAME.
Overrides are converted to each field's type; `validate()` checks every field's choices and bounds and the rules
that span sections, and raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bp_ray.config import EVAL_SYSTEMS, ConfigError, PipelineConfig
from bp_ray.extensions import registry


def available_presets() -> list[str]:
    """Names of the YAML presets shipped in bp_ray/configs/."""
    folder = resources.files("bp_ray") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(preset: str) -> str:
    if preset not in available_presets():
        raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(available_presets())}")
    return (resources.files("bp_ray") / "configs" / f"{preset}.yaml").read_text()


def load_config(preset: str | None = "tiny", overrides: Sequence[str] = (),
                config_file: str | Path | None = None) -> PipelineConfig:
    """Dataclass defaults <- configs/<preset>.yaml (or `config_file`) <- "section.key=value" overrides.

    Unknown keys, wrong types and impossible values raise ConfigError naming the key.
    """
    cfg = PipelineConfig()
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layer = _parse_yaml(path.read_text(), str(path))
    else:
        layer = _parse_yaml(preset_text(preset or "tiny"), f"preset {preset}")
        layer.setdefault("preset", preset)
    for base in _base_layers(layer):
        _apply_mapping(cfg, base, prefix="")
    _apply_mapping(cfg, layer, prefix="")
    for item in overrides:
        key, value = _split_override(item)
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def _base_layers(layer: dict[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """The presets a layer builds on (`base: <preset>`, popped from it), outermost first."""
    base = layer.pop("base", None)
    if base is None:
        return []
    if depth > 4:
        raise ConfigError(f"preset bases nest too deeply (at {base!r})")
    parent = _parse_yaml(preset_text(str(base)), f"preset {base}")
    parent.pop("preset", None)
    return [*_base_layers(parent, depth + 1), parent]


ENV_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any) -> Any:
    """`${NAME}` in any string of a YAML tree replaced by that environment variable; an unset one stays as it is,
    so the file that names it says so when it is opened (prompt_io.read_prompts)."""
    if isinstance(value, str):
        return ENV_VARIABLE.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(data).__name__}")
    return expand_env(data)


def _split_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_mapping(node: Any, mapping: Mapping[str, Any], prefix: str) -> None:
    for key, value in mapping.items():
        _set_path(node, str(key).split("."), value, prefix)


def set_value(cfg: Any, dotted_key: str, value: Any) -> None:
    """Set `section.key` on a config tree, converting `value` to the field's declared type."""
    _set_path(cfg, dotted_key.split("."), value, prefix="")


def _is_section(value: Any) -> bool:
    """A dataclass, or a mapping of them (models.zoo: one section per registered backend)."""
    return is_dataclass(value) or (isinstance(value, dict) and bool(value)
                                   and all(is_dataclass(v) for v in value.values()))


def _children(node: Any) -> list[str]:
    return list(node) if isinstance(node, dict) else [f.name for f in fields(node)]


def _child(node: Any, name: str) -> Any:
    return node[name] if isinstance(node, dict) else getattr(node, name)


def _set_path(node: Any, path: list[str], value: Any, prefix: str) -> None:
    name, rest = path[0], path[1:]
    key = f"{prefix}{name}"
    if name not in _children(node):
        raise ConfigError(_unknown_key_message(key, name, _children(node)))
    current = _child(node, name)
    if _is_section(current):
        if rest:
            _set_path(current, rest, value, prefix=f"{key}.")
        elif isinstance(value, Mapping):
            _apply_mapping(current, value, prefix=f"{key}.")
        else:
            raise ConfigError(f"{key} is a section, not a value; set its keys, e.g. "
                              f"{key}.{_children(current)[0]}=...")
        return
    if rest:
        raise ConfigError(f"{key} is a value, not a section: cannot set {key}.{'.'.join(rest)}")
    field_map = {f.name: f for f in fields(node)}
    setattr(node, name, _convert(key, value, _field_type(type(node), field_map[name])))


def _unknown_key_message(shown: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {shown!r}{hint}; valid keys here: {', '.join(valid)}"


def explain(cfg: PipelineConfig, key: str) -> str:
    """What a key means: its value in `cfg`, its default, type, allowed values and help; for a section (or "" for
    the top level), one line per key."""
    node: Any = cfg
    defaults: Any = PipelineConfig()
    found: dataclasses.Field | None = None
    owner: type = PipelineConfig
    shown = ""
    for name in [part for part in key.split(".") if part]:
        if not _is_section(node):
            raise ConfigError(f"{shown} is a value, not a section")
        shown = f"{shown}.{name}" if shown else name
        if name not in _children(node):
            raise ConfigError(_unknown_key_message(shown, name, _children(node)))
        if not isinstance(node, dict):
            owner, found = type(node), {f.name: f for f in fields(node)}[name]
        node, defaults = _child(node, name), _child(defaults, name)
    if isinstance(node, dict) and _is_section(node):
        lines = [f"{shown}: {((found.metadata.get('help') if found else '') or ' ').splitlines()[0]}"]
        lines += [f"  {name} = (section)  # {(type(value).__doc__ or '').strip().splitlines()[0]}"
                  for name, value in node.items()]
        return "\n".join(lines)
    if is_dataclass(node):
        lines = [f"{shown or '(top level)'}: {(type(node).__doc__ or '').strip().splitlines()[0]}"]
        for f in fields(node):
            value = getattr(node, f.name)
            text = "(section)" if _is_section(value) else repr(value)
            first = f.metadata.get("help", "").split("\n")[0]
            lines.append(f"  {f.name} = {text}" + (f"  # {first}" if first else ""))
        return "\n".join(lines)
    assert found is not None
    tp = _field_type(owner, found)
    meta = found.metadata
    rules = [f"one of {', '.join(map(str, meta['choices']))}" if meta.get("choices") else "",
             *(f"{sign} {meta[k]}" for k, sign in (("ge", ">="), ("gt", ">"), ("le", "<=")) if meta.get(k) is not None)]
    lines = [f"{shown} = {node!r}   (default {defaults!r})",
             f"  type: {getattr(tp, '__name__', str(tp))}" + "".join(f"; {r}" for r in rules if r)]
    if meta.get("help"):
        lines += ["  " + line for line in meta["help"].splitlines()]
    return "\n".join(lines)


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def _convert(key: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0])
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} expects a mapping, e.g. {{name: value}}, got {value!r}")
        return {str(k): _convert(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        items = value
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(items, list):
            raise ConfigError(f"{key} expects a list (YAML list or comma-separated), got {value!r}")
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's choices and bounds, then cross-field rules; raise ConfigError on the first problem."""
    for f in fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            validate(value, prefix=f"{key}.")
            continue
        if _is_section(value):
            for name, section in value.items():
                validate(section, prefix=f"{key}.{name}.")
            continue
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") and isinstance(value, list):
            wrong = [item for item in value if item not in meta["choices"]]
            if wrong or not value:
                raise ConfigError(f"{key}={value!r} is not allowed; choose a non-empty list of: "
                                  f"{', '.join(str(c) for c in meta['choices'])}")
        elif meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: "
                              f"{', '.join(str(c) for c in meta['choices'])}")
        if meta.get("ge") is not None and value < meta["ge"]:
            raise ConfigError(f"{key}={value!r} must be >= {meta['ge']}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ConfigError(f"{key}={value!r} must be > {meta['gt']}")
        if meta.get("le") is not None and value > meta["le"]:
            raise ConfigError(f"{key}={value!r} must be <= {meta['le']}")
    if isinstance(cfg, PipelineConfig):
        _validate_cross_fields(cfg)


def _validate_ppo(ppo: Any) -> None:
    if ppo.minibatch_size > ppo.rollout_batch_size:
        raise ConfigError(f"ppo.minibatch_size={ppo.minibatch_size} exceeds ppo.rollout_batch_size="
                          f"{ppo.rollout_batch_size}")
    if ppo.deepspeed.zero_stage == 3:
        raise ConfigError("ppo.deepspeed.zero_stage=3 is not supported: each worker generates its rollouts and needs "
                          "the policy's full weights (use 0-2; ZeRO-2 already partitions optimizer state and grads)")
    if ppo.async_rollout and ppo.algorithm == "ppo":
        raise ConfigError("ppo.async_rollout needs a critic-free method (ppo.algorithm=grpo or rloo): PPO's values "
                          "come from the critic the worker is updating")
    world = ppo.resources.num_workers
    if ppo.rollout_batch_size % world or ppo.minibatch_size % world:
        raise ConfigError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} and ppo.minibatch_size="
                          f"{ppo.minibatch_size} must be multiples of ppo.resources.num_workers={world}")
    if ppo.algorithm != "ppo" and ppo.rollout_batch_size % (ppo.group_size * world):
        raise ConfigError(f"ppo.algorithm={ppo.algorithm}: ppo.rollout_batch_size={ppo.rollout_batch_size} must be a "
                          f"multiple of ppo.group_size={ppo.group_size} x ppo.resources.num_workers={world} (each "
                          f"worker samples whole groups)")
    if ppo.rollout_batch_size % ppo.minibatch_size:
        raise ConfigError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of "
                          f"ppo.minibatch_size={ppo.minibatch_size}")


def _validate_extensions(cfg: PipelineConfig) -> None:
    """Names that only an installed backend gives a meaning to (bp_ray.extensions)."""
    sources = ["prompts", *registry().prompt_sources]
    if cfg.data.corpus_kind not in sources:
        raise ConfigError(f"data.corpus_kind={cfg.data.corpus_kind!r} is not allowed; choose one of: "
                          f"{', '.join(sources)}")
    unknown = [name for name in cfg.eval.metrics if name not in registry().eval_metrics]
    if unknown:
        raise ConfigError(f"eval.metrics has unknown metric(s) {', '.join(unknown)}; installed: "
                          f"{', '.join(registry().eval_metrics) or 'none'}")


def _validate_cross_fields(cfg: PipelineConfig) -> None:
    pools = {name: getattr(cfg.data, name) for name in ("model_pool", "captioner_pool", "rewriter_pool",
                                                         "aesthetic_pool", "renderer_pool", "scorer_pool")}
    for name, pool in pools.items():
        if pool.min_actors > pool.max_actors:
            raise ConfigError(f"data.{name}.min_actors={pool.min_actors} exceeds "
                              f"data.{name}.max_actors={pool.max_actors}")
    data = cfg.data
    # The split must never call one prompt both low and high.
    if data.low_max_tags >= data.high_min_tags:
        raise ConfigError(f"data.low_max_tags={data.low_max_tags} must be below data.high_min_tags="
                          f"{data.high_min_tags}")
    if data.low_max_segments >= data.high_min_segments:
        raise ConfigError(f"data.low_max_segments={data.low_max_segments} must be below "
                          f"data.high_min_segments={data.high_min_segments}")
    for key in ("pair_low_words", "pair_high_words"):
        bounds = getattr(data, key)
        if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1]:
            raise ConfigError(f"data.{key}={bounds} must be [min, max] with 0 <= min <= max")
    if cfg.serve.default_max_new_tokens > cfg.serve.max_new_tokens:
        raise ConfigError(f"serve.default_max_new_tokens={cfg.serve.default_max_new_tokens} exceeds "
                          f"serve.max_new_tokens={cfg.serve.max_new_tokens}")
    if cfg.serve.min_replicas > cfg.serve.max_replicas:
        raise ConfigError(f"serve.min_replicas={cfg.serve.min_replicas} exceeds "
                          f"serve.max_replicas={cfg.serve.max_replicas}")
    _validate_ppo(cfg.ppo)
    for render_key, render in (("data.render", cfg.data.render), ("eval.render", cfg.eval.render),
                               ("serve.render", cfg.serve.render)):
        if render.height % 8 or render.width % 8:
            raise ConfigError(f"{render_key}.height and .width must be multiples of 8 "
                              f"(got {render.height}x{render.width})")
    if "{raw}" not in cfg.sft.instruction:
        raise ConfigError("sft.instruction must contain the placeholder {raw} (where the user prompt goes)")
    for key in ("summarise_template", "expand_template"):
        if "{prompt}" not in getattr(cfg.data, key):
            raise ConfigError(f"data.{key} must contain the placeholder {{prompt}}")
    if "{prompt}" not in cfg.eval.llm_instruction:
        raise ConfigError("eval.llm_instruction must contain the placeholder {prompt}")
    _validate_extensions(cfg)
    unknown = sorted(set(cfg.eval.systems) - set(EVAL_SYSTEMS))
    if unknown:
        raise ConfigError(f"eval.systems has unknown system(s) {', '.join(unknown)}; "
                          f"choose from: {', '.join(EVAL_SYSTEMS)}")
