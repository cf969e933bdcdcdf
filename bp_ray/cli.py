"""`bp-ray <stage>`: one command per pipeline stage, sharing one convention.

Every stage command takes `--preset NAME` or `--config FILE`, repeatable `--set section.key=value`, `--out DIR`
(the stage's output folder; defaults to <output_dir>/<stage>), and its inputs as folders written by earlier stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bp_ray.config import ConfigError, PipelineConfig
from bp_ray.config_loader import available_presets, load_config
from bp_ray.layout import RunLayout
from bp_ray.stages import BY_NAME, STAGE_NAMES, Stage, run_stage
from bp_ray.summaries import (
    eval_summary,
    example_rewrites,
    logs_summary,
    stage_outcome,
    stage_summary,
    text_eval_summary,
    truncation_summary,
    zoo_summary,
)

logger = logging.getLogger("bp_ray")

# --- shared options -------------------------------------------------------------------------------------------

def _config_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    source = parent.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help=f"named preset ({', '.join(available_presets())}); "
                                                        "default tiny")
    source.add_argument("--config", default=None, metavar="FILE", help="a YAML config file instead of a preset")
    parent.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set ppo.kl_target=6 (repeatable)")
    return parent


def _stage_options(stage: Stage | None, *inputs: str) -> argparse.ArgumentParser:
    """--preset / --config / --set, --out, and an input option per folder the stage reads (or per name given)."""
    parent = argparse.ArgumentParser(add_help=False, parents=[_config_options()])
    parent.add_argument("--out", default=None, metavar="DIR", help="output folder of this stage")
    for option, read in (stage.reads.items() if stage else ((name, name) for name in inputs)):
        parent.add_argument(f"--{option}", default=None, metavar="DIR", help=f"input: the {read} stage's folder "
                            "(default: beside --out, else in the run directory)")
    return parent


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.overrides)
    sources = getattr(args, "source_prompts", None)
    if sources:
        overrides += [f"data.source={sources[0]}", f"data.extra_sources={json.dumps(sources[1:])}"]
    return load_config(args.preset or "tiny", overrides, config_file=args.config)


def _source_prompts_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", dest="source_prompts", nargs="+", default=None, metavar="FILE",
                        help="prompt files or DiffusionDB folders the pairs are built from (sets data.source and "
                        "data.extra_sources; default: the preset's)")


# --- commands -------------------------------------------------------------------------------------------------

def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(json.dumps(cfg.to_dict(), indent=2) if args.format == "json" else cfg.to_yaml(), end="")
    return 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    from bp_ray.config_loader import explain

    print(explain(config_from_args(args), args.key))
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    for name in available_presets():
        print(name)
    return 0


def cmd_models_build_tiny(args: argparse.Namespace) -> int:
    from bp_ray.embedded.tiny_zoo import build_tiny_zoo
    from bp_ray.models.model_cache import default_zoo_dir

    cfg = config_from_args(args)
    root = Path(args.out) if args.out else default_zoo_dir(cfg.models) / "tiny"
    summary = build_tiny_zoo(root, cfg.models.zoo["tiny"], force=args.force)
    verb = f"built in {summary.seconds:.1f} s" if summary.built else "up to date (cached)"
    print(f"tiny zoo {verb}: {summary.path} ({summary.bytes / 1e6:.1f} MB)")
    for role, count in summary.parameters.items():
        print(f"  {role:<10} {count:>10,} parameters")
    return 0


def cmd_models_build_world(args: argparse.Namespace) -> int:
    from bp_ray.embedded.world.zoo import BUILD_ORDER, build_world_zoo, world_zoo_dir

    cfg = config_from_args(args)
    root = Path(args.out) if args.out else world_zoo_dir(cfg.models)
    roles = tuple(args.roles.split(",")) if args.roles else BUILD_ORDER
    summary = build_world_zoo(root, cfg.models.zoo["tiny"], cfg.models.zoo["world"], force=args.force, roles=roles)
    verb = f"built and trained in {summary.seconds:.1f} s" if summary.built else "up to date (cached)"
    print(f"world zoo {verb}: {summary.path} ({summary.bytes / 1e6:.1f} MB)")
    manifest = json.loads((root / "zoo.json").read_text())
    for role, count in summary.parameters.items():
        seconds = manifest["seconds"].get(role, manifest["seconds"].get("pickscore") if role == "clip" else None)
        timing = f"  trained in {seconds:.1f} s" if seconds is not None else ""
        print(f"  {role:<10} {count:>10,} parameters{timing}" + ("  (a copy of pickscore)" if role == "clip" else ""))
    return 0


def cmd_models_build_shapes(args: argparse.Namespace) -> int:
    from bp_ray.embedded.shapes_zoo import SHAPES_ROLES, build_shapes_role, shapes_dir

    cfg = config_from_args(args)
    root = Path(args.out) if args.out else shapes_dir(cfg.models)
    roles = tuple(args.roles.split(",")) if args.roles else SHAPES_ROLES
    unknown = sorted(set(roles) - set(SHAPES_ROLES))
    if unknown:
        raise ValueError(f"unknown shapes role(s) {', '.join(unknown)}; roles: {', '.join(SHAPES_ROLES)}")
    for role in roles:
        summary = build_shapes_role(root / role, role, cfg.models.zoo["shapes"], force=args.force)
        verb = f"built in {summary.seconds:.1f} s" if summary.built else "up to date (cached)"
        print(f"  {role:<10} {summary.parameters[role]:>13,} parameters  {summary.bytes / 1e9:5.2f} GB  {verb}",
              flush=True)
    print(f"shapes zoo: {root}")
    return 0


def cmd_models_import_gguf(args: argparse.Namespace) -> int:
    from bp_ray.models.gguf_import import gguf_dir, import_gguf, packaged_gguf

    cfg = config_from_args(args)
    source = Path(args.gguf) if args.gguf else packaged_gguf(args.name)
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    root = Path(args.out) if args.out else gguf_dir(args.name, cfg.models)
    summary = import_gguf(source, root, force=args.force)
    manifest = json.loads((root / "zoo.json").read_text())
    verb = f"imported in {summary.seconds:.1f} s" if summary.built else "up to date (same source file)"
    print(f"{source.name} {verb}: {summary.path} ({summary.bytes / 1e6:.1f} MB, "
          f"{summary.parameters['model']:,} parameters, {manifest['architecture'][0]})")
    conversion = manifest["conversion"]
    print(f"  source sha256 {manifest['source']['sha256']}; de-quantized from {conversion['dequantized_from']}"
          f" to {conversion['dtype']} safetensors")
    if not args.out:
        print(f"  use it as gguf:{args.name} in any model field, e.g. --set models.policy=gguf:{args.name}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from bp_ray.models.loading import GGUF_PREFIX, registered_prefix
    from bp_ray.models.model_cache import default_zoo_dir

    cfg = config_from_args(args)
    for role in ("policy", "rewriter", "rm_backbone", "captioner", "diffusion", "pickscore", "aesthetic",
                 "clip_relevance"):
        spec = getattr(cfg.models, role)
        # zoo roles and imported GGUF models both live at <zoo dir>/<prefix>/<name>
        prefix = registered_prefix(spec) or (GGUF_PREFIX[:-1] if spec.startswith(GGUF_PREFIX) else None)
        where = f"  -> {default_zoo_dir(cfg.models) / prefix / spec.partition(':')[2]}" if prefix else ""
        print(f"{role:<15} {spec}{where}")
    return 0


def cmd_models_convert_aesthetic(args: argparse.Namespace) -> int:
    from bp_ray.models.aesthetic import convert_laion_head

    out = convert_laion_head(args.pth, args.out, clip_model=args.clip_model,
                             clip_pretrained=args.clip_pretrained)
    print(f"wrote aesthetic scorer folder {out} (head in safetensors; CLIP {args.clip_model}/"
          f"{args.clip_pretrained} loaded by open_clip at use)")
    return 0


def stage_folders(cfg: PipelineConfig, args: argparse.Namespace, stage: Stage) -> tuple[Path, dict[str, Path]]:
    """(output folder, input folders by stage) of a stage command: --out, else the stage's folder of the run
    directory; each input as its option gives it, else that stage's folder beside the output."""
    layout = RunLayout(Path(args.out).parent) if args.out else RunLayout(Path(cfg.output_dir))
    out = Path(args.out) if args.out else layout.stage_dir(stage.name)
    inputs = {}
    for option, input_stage in stage.reads.items():
        given = getattr(args, option, None)
        inputs[input_stage] = Path(given) if given else layout.stage_dir(input_stage)
    return out, inputs


def cmd_stage(args: argparse.Namespace) -> int:
    """`bp-ray data corpus`, `data generate`, `rewards label`, `train sft|rm|ppo`: the declared stage, alone."""
    stage = BY_NAME[args.stage]
    cfg = config_from_args(args)
    out, inputs = stage_folders(cfg, args, stage)
    out.mkdir(parents=True, exist_ok=True)
    manifest = run_stage(stage, cfg, inputs, out, getattr(args, "resume", False))
    print(stage_summary(stage.name, manifest, out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bp_ray.eval.run import run_evaluation

    cfg = config_from_args(args)
    out, _ = stage_folders(cfg, args, BY_NAME["eval"])
    layout = RunLayout(out.parent) if args.out else RunLayout(Path(cfg.output_dir))
    sft = args.sft or _if_done(layout, "sft")
    ppo = args.ppo or _if_done(layout, "ppo")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    if systems is None:  # the configured systems, less the checkpoints this run does not have
        systems = [s for s in cfg.eval.systems if {"sft": sft, "ppo": ppo}.get(s, True)]
    training = {stage: Path(d) for stage, d in (("sft", sft), ("rm", args.rm or _if_done(layout, "rm")), ("ppo", ppo))
                if d}
    manifest = run_evaluation(cfg.eval, cfg.sft, cfg.data, cfg.rewards, cfg.models, cfg.cluster, out,
                              preset=cfg.preset, sft_dir=Path(sft) if sft else None,
                              ppo_dir=Path(ppo) if ppo else None, prompts_file=args.prompts, systems=systems,
                              training_dirs=training)
    print(eval_summary(out))
    return 0 if manifest else 1


def cmd_eval_human(args: argparse.Namespace) -> int:
    from bp_ray.eval.human_cli import serve_study

    return serve_study(Path(args.run), args.human_systems, args.host, args.port)


def cmd_eval_human_results(args: argparse.Namespace) -> int:
    from bp_ray.eval.human_cli import report_results

    return report_results(Path(args.run), Path(args.csv) if args.csv else None)


def cmd_eval_text(args: argparse.Namespace) -> int:
    from bp_ray.eval.systems import checkpoint_model_dir
    from bp_ray.eval.text_quality import format_table, run_text_evaluation
    from bp_ray.models.loading import resolve_model

    cfg = config_from_args(args)
    layout = RunLayout(Path(args.run or cfg.output_dir))
    checkpoints = {"base": Path(resolve_model(cfg.models.policy, cfg.models))}
    for stage in ("sft", "ppo"):
        folder = getattr(args, stage) or _if_done(layout, stage)
        if folder:
            checkpoints[stage] = checkpoint_model_dir(folder)
    rm = args.rm or _if_done(layout, "rm")
    pairs = args.pairs or _if_done(layout, "data")
    files = args.prompts or cfg.eval.text_prompts or ([cfg.eval.prompts] if cfg.eval.prompts else [])
    if not files:
        raise SystemExit("bp-ray eval-text: no prompt files; pass --prompts FILE... or set eval.text_prompts")
    limit = cfg.eval.text_num_prompts if args.num_prompts is None else args.num_prompts
    results = run_text_evaluation(cfg, Path(args.out) if args.out else layout.root / "eval_text", files,
                                  checkpoints, Path(rm) if rm else None, Path(pairs) if pairs else None, limit)
    print(text_eval_summary(results))
    print(format_table(results))
    return 0


def _if_done(layout: RunLayout, stage: str) -> str | None:
    """A finished stage's folder of the run directory, else None."""
    return str(layout.stage_dir(stage)) if layout.is_done(stage) else None


def cmd_serve(args: argparse.Namespace) -> int:
    from bp_ray.serve.runner import run_serve

    overrides = list(args.overrides)
    for key, value in (("model", args.model), ("host", args.host), ("port", args.port)):
        if value is not None:
            overrides.append(f"serve.{key}={value}")
    cfg = load_config(args.preset or "tiny", overrides, config_file=args.config)
    run_serve(cfg)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from bp_ray.serve.client import CONTROLS, EndpointError, beautify_remote, print_response

    cfg = config_from_args(args)
    url = args.url or f"http://{cfg.serve.host}:{cfg.serve.port}"
    fields = {key: getattr(args, key) for key in CONTROLS}
    if args.no_avoid:
        fields["avoid"] = []
    try:
        body = beautify_remote(url, args.prompt, n=args.n, **fields)
    except EndpointError as error:
        print(f"bp-ray client: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print_response(body)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The main job: every stage in order on one run directory; done stages are skipped, a cut-off one resumes."""
    from bp_ray.console import LOGS_DIR, pipeline_console
    from bp_ray.pipeline import run_pipeline

    cfg = config_from_args(args)
    if args.out:
        cfg.output_dir = args.out
    layout = RunLayout(Path(cfg.output_dir))
    if args.dry_run:
        return _dry_run(cfg, RunLayout(layout.root / "dry-run"), args.verbose)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(cfg.to_yaml())
    start = time.perf_counter()
    folder = layout.stage_dir
    with pipeline_console(layout.root, args.verbose) as (console, warnings):
        console.print(f"bp-ray pipeline ({cfg.preset}) -> {layout.root}   library logs: {layout.root / LOGS_DIR}"
                      + ("" if args.verbose else " (bp-ray -v pipeline shows them here)"))
        try:
            console.start("models")
            started = time.perf_counter()
            zoo = _ensure_zoo(cfg)
            console.finish("models", f"ready in {time.perf_counter() - started:.1f} s")
            runs = run_pipeline(cfg, None, layout, on_stage=console.start,
                                on_done=lambda run: console.finish(run.stage, stage_outcome(run)))
        except BaseException as error:
            console.fail(error)
            raise
        console.print()
        console.print(zoo_summary(cfg, zoo))
        for run in runs:
            line = stage_summary(run.stage, run.manifest, folder(run.stage))
            when = "skipped: done earlier with this config" if run.action == "skipped" else \
                f"{run.action} in {run.seconds:.1f} s"
            console.print(f"{line}\n  [{run.stage} {when}]" if run.stage == "eval" else f"{line}   [{when}]")
        console.print(example_rewrites(folder("eval") / "rewrites.jsonl"))
        truncated = truncation_summary(layout)
        if truncated:
            console.print(truncated)
        console.print(logs_summary(layout.root / LOGS_DIR, warnings.count))
        console.print(f"done in {time.perf_counter() - start:.1f} s")
        console.print(f"serve the trained beautifier: bp-ray serve --preset {cfg.preset} --set "
                      f"output_dir={layout.root}   (or --model {layout.model_dir('ppo')})")
    return 0


def _dry_run(cfg: PipelineConfig, layout: RunLayout, verbose: bool) -> int:
    """`pipeline --dry-run`: every stage once at the smallest counts, one Serve request, and the table."""
    from bp_ray.console import LOGS_DIR, pipeline_console
    from bp_ray.dry_run import cluster_gpus, format_table, run_dry_run

    start = time.perf_counter()
    layout.root.mkdir(parents=True, exist_ok=True)
    with pipeline_console(layout.root, verbose) as (console, _):
        gpus = cluster_gpus(cfg)
        console.print(f"bp-ray pipeline --dry-run ({cfg.preset}, {gpus} GPUs) -> {layout.root}   library logs: "
                      f"{layout.root / LOGS_DIR}")
        try:
            console.start("models")
            started = time.perf_counter()
            _ensure_zoo(cfg)
            console.finish("models", f"ready in {time.perf_counter() - started:.1f} s")
            measures = run_dry_run(cfg, layout, gpus, on_stage=console.start,
                                   on_done=lambda run: console.finish(run.stage, f"{run.seconds:.1f} s"))
        except BaseException as error:
            console.fail(error)
            raise
        console.print()
        console.print(format_table(measures))
        console.print(f"peak RSS: the driver and every Ray process under it, summed (largest: one process); "
                      f"GPU est.: per GPU at the {cfg.preset} preset's batch sizes and precision "
                      f"(bp_ray/memory_estimate.py)")
        console.print(f"dry run done in {time.perf_counter() - start:.1f} s; table in {layout.root / 'dry_run.json'}")
    return 0


def _ensure_zoo(cfg: PipelineConfig) -> Path | None:
    """Build the zoos the config names before Ray starts, so actors never race to build them."""
    from bp_ray.models.loading import registered_prefix, resolve_model

    specs = [v for v in cfg.models.__dict__.values() if isinstance(v, str) and registered_prefix(v)]
    roots = list(dict.fromkeys(Path(resolve_model(spec, cfg.models)).parent for spec in specs))
    return roots[0] if roots else None


def cmd_status(args: argparse.Namespace) -> int:
    layout = RunLayout(Path(args.run_dir))
    if not layout.root.is_dir():
        raise FileNotFoundError(f"no run directory at {layout.root}")
    for stage in STAGE_NAMES:
        info = layout.stage_status(stage)
        size = f"{info['bytes'] / 1e6:8.1f} MB" if "bytes" in info else ""
        print(f"{stage:<8} {info['state']:<8} {size}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Preflight: models, prompt data, cluster resources and shared storage, in seconds; 1 when anything is missing."""
    from bp_ray.preflight import MISSING, format_checks, run_checks

    cfg = config_from_args(args)
    if args.out:
        cfg.output_dir = args.out
    start = time.perf_counter()
    checks = run_checks(cfg)
    print(format_checks(checks, f"bp-ray check ({cfg.preset}), {time.perf_counter() - start:.1f} s"))
    return 1 if any(check.status == MISSING for check in checks) else 0


# --- parser ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bp-ray", description="BeautifulPrompt on Ray: generate data, label "
                                     "rewards, train SFT / reward model / PPO, evaluate and serve a prompt "
                                     "beautifier.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="prompt data: embedded corpus, prompt-pair generation")
    data_sub = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = data_sub.add_parser("corpus", parents=[_stage_options(BY_NAME["corpus"])],
                            help="write the embedded DiffusionDB-shaped corpus (metadata.parquet + image zips)")
    p.set_defaults(func=cmd_stage, stage="corpus")
    p = data_sub.add_parser("generate", parents=[_stage_options(BY_NAME["data"])],
                            help="low->high prompt pairs on Ray Data (resumes where a killed run stopped)")
    p.add_argument("--fresh", dest="resume", action="store_false",
                   help="discard committed work and start over (default: go on from it)")
    _source_prompts_option(p)
    p.set_defaults(func=cmd_stage, stage="data")

    rewards = sub.add_parser("rewards", help="render prompts with N seeds and score the images")
    rewards_sub = rewards.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = rewards_sub.add_parser("label", parents=[_stage_options(BY_NAME["rewards"])],
                               help="render every pair prompt with N seeds and score it (cached)")
    p.set_defaults(func=cmd_stage, stage="rewards")

    train = sub.add_parser("train", help="train the SFT policy, the reward model or PPO")
    train_sub = train.add_subparsers(dest="action", metavar="STAGE", required=True)
    for name in ("sft", "rm", "ppo"):
        help_text = {"sft": "SFT on Ray Train + DeepSpeed",
                     "rm": "reward models (PickScore, aesthetic) on Ray Train + DeepSpeed",
                     "ppo": "PPO with an adaptive KL penalty, reference and reward actors"}[name]
        p = train_sub.add_parser(name, parents=[_stage_options(BY_NAME[name])], help=help_text)
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        p.set_defaults(func=cmd_stage, stage=name)

    p = sub.add_parser("eval", parents=[_stage_options(BY_NAME["eval"])],
                       help="rewrite user prompts with each system, render with N seeds, score against the user "
                       "prompt; results.json / results.csv / report.html")
    p.add_argument("--prompts", default=None, metavar="FILE", help="JSON Lines / CSV / TSV / text file of user "
                   "prompts (default eval.prompts, else the embedded evaluation set)")
    p.add_argument("--systems", default=None, help="comma-separated, from original,tags,sft,ppo,llm (default "
                   "eval.systems, less sft/ppo when the run has no such checkpoint)")
    p.set_defaults(func=cmd_eval)
    # Optional: `bp-ray eval [options]` still runs the evaluation; `bp-ray eval human ...` is the human study.
    human_sub = p.add_subparsers(dest="eval_action", metavar="[human | human-results]", required=False)
    h = human_sub.add_parser("human", help="serve the human pairwise study of an evaluation (a web page: two "
                             "images of one prompt, systems hidden; votes in <eval>/human/votes.sqlite)")
    h.add_argument("--run", required=True, metavar="DIR", help="run folder (its eval/) or an evaluation folder")
    h.add_argument("--systems", dest="human_systems", default=None, metavar="A,B,...", help="systems to compare "
                   "pairwise (default: original and ppo, else sft, else the first two evaluated)")
    h.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    h.add_argument("--port", type=int, default=8600, help="port (default 8600)")
    h.set_defaults(func=cmd_eval_human)
    h = human_sub.add_parser("human-results", help="the human study's results: print them, add them to "
                             "report.html, optionally export the votes as CSV")
    h.add_argument("--run", required=True, metavar="DIR", help="run folder (its eval/) or an evaluation folder")
    h.add_argument("--csv", default=None, metavar="FILE", help="also write every vote to this CSV file")
    h.set_defaults(func=cmd_eval_human_results)

    p = sub.add_parser("eval-text", parents=[_stage_options(None, "sft", "ppo", "rm", "pairs")],
                       help="judge the rewrites as text, no rendering: subject kept, tags, length, repetition and the "
                       "reward model's score for original / base / sft / ppo; results_text.json")
    p.add_argument("--run", default=None, metavar="DIR", help="run directory whose finished sft / ppo / rm / data "
                   "stages are used (default output_dir)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="FILE", help="prompt files (default "
                   "eval.text_prompts); prompts of the run's training pairs are left out")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts drawn from each file (default "
                   "eval.text_num_prompts; 0: all)")
    p.set_defaults(func=cmd_eval_text)

    p = sub.add_parser("serve", parents=[_config_options()], help="the beautifier endpoint on Ray Serve (foreground "
                       "until Ctrl-C or SIGTERM)")
    p.add_argument("--model", default=None, metavar="DIR", help="checkpoint to serve (default: serve.model, else "
                   "the run's PPO, else its SFT model, else models.policy)")
    p.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", parents=[_config_options()], help="beautify a prompt with a running endpoint")
    p.add_argument("prompt", nargs="?", default=None, help="<keep>...</keep> marks text every rewrite keeps")
    p.add_argument("--url", default=None, help="endpoint (default http://<serve.host>:<serve.port>)")
    p.add_argument("-n", type=int, default=1, help="number of rewrites")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--keep", action="append", default=None, metavar="TEXT", help="text every rewrite keeps verbatim")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="token budget in the renderer's text encoder")
    p.add_argument("--negative-prompt", default=None, help="passed unchanged to the renderer")
    p.add_argument("--rank", choices=("none", "reward_model", "online"), default=None, help="score and order rewrites")
    p.add_argument("--best-of", type=int, default=None, help="return the best K of the -n rewrites (needs --rank)")
    p.add_argument("--detail", choices=("low", "medium", "high"), default=None, help="fewer or more added words")
    p.add_argument("--style", choices=("photo", "painting", "anime", "3d"), default=None)
    p.add_argument("--avoid", action="append", default=None, metavar="WORD", help="never add this (repeatable; "
                   "default: the overused keyword-soup list)")
    p.add_argument("--no-avoid", action="store_true", help="avoid nothing")
    p.add_argument("--keep-colours", action=argparse.BooleanOptionalAction, default=None, help="a prompt that gives "
                   "something a colour gets no other colour word (default: the server's serve.decoding)")
    p.add_argument("--render", action="store_true", default=None, help="also render each rewrite (in --json)")
    p.add_argument("--edit-of", default=None, metavar="ID", help="score --text, an edit of the rewrite with this id")
    p.add_argument("--text", default=None, help="with --edit-of: the edited text")
    p.add_argument("--json", action="store_true", help="print the whole response body")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("pipeline", parents=[_stage_options(None)], help="the main job: every stage in order "
                       "on one run directory (--out)")
    _source_prompts_option(p)
    p.add_argument("--dry-run", action="store_true",
                   help="every stage once at the smallest counts (one step each, one 8-seed render, one Serve "
                        "request) at the config's real model sizes; prints peak memory, times and per-GPU estimates")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("status", help="summarise a run directory")
    p.add_argument("run_dir", metavar="DIR")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", parents=[_stage_options(None)], help="before a long job, in seconds: every model "
                       "resolves, the prompt data is there, the cluster fits the largest stage and every node shares "
                       "the run directory (--out) and checkpoint storage; exit 1 when anything is missing")
    _source_prompts_option(p)
    p.set_defaults(func=cmd_check)

    models = sub.add_parser("models", help="the model zoo")
    models_sub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = models_sub.add_parser("build-tiny", parents=[_config_options()],
                              help="build the random-init tiny zoo (cached; rebuilt when its config changes)")
    p.add_argument("--out", default=None, metavar="DIR", help="zoo folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date zoo exists")
    p.set_defaults(func=cmd_models_build_tiny)
    p = models_sub.add_parser("build-world", parents=[_config_options()],
                              help="build the tiny zoo's models and train each in the miniature world (cached)")
    p.add_argument("--out", default=None, metavar="DIR", help="zoo folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date zoo exists")
    p.add_argument("--roles", default=None, metavar="ROLE,...",
                   help="retrain only these roles (bloom, blip, pickscore, sd, aesthetic) in the zoo at --out and keep "
                        "the others: after changing only these roles' trainers or settings")
    p.set_defaults(func=cmd_models_build_world)
    p = models_sub.add_parser("build-shapes", parents=[_config_options()],
                              help="build the paper's models at their real sizes with random weights (cached per role; "
                                   "`shapes:<role>`, the paper-shapes preset)")
    p.add_argument("--out", default=None, metavar="DIR", help="zoo folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date role exists")
    p.add_argument("--roles", default=None, metavar="ROLE,...",
                   help="build only these roles (bloom, blip, sd, pickscore, clip, aesthetic)")
    p.set_defaults(func=cmd_models_build_shapes)
    p = models_sub.add_parser("import-gguf", parents=[_config_options()],
                              help="convert a GGUF checkpoint once into a Hugging Face safetensors folder (cached)")
    p.add_argument("--name", default="smollm2", help="the packaged model to import (gguf:<name>; default smollm2)")
    p.add_argument("--gguf", default=None, metavar="FILE", help="another GGUF file instead of the packaged one")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the cache, as gguf:<name>)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder is up to date")
    p.set_defaults(func=cmd_models_import_gguf)
    p = models_sub.add_parser("list", parents=[_config_options()], help="the model of every role")
    p.set_defaults(func=cmd_models_list)
    p = models_sub.add_parser("convert-aesthetic", help="LAION aesthetic .pth -> safetensors scorer folder")
    p.add_argument("--pth", required=True, metavar="FILE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.set_defaults(func=cmd_models_convert_aesthetic)

    config = sub.add_parser("config", help="show the resolved configuration")
    config_sub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = config_sub.add_parser("show", parents=[_config_options()], help="print the resolved config")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.set_defaults(func=cmd_config_show)
    p = config_sub.add_parser("explain", parents=[_config_options()],
                              help="what a key means: value, default, type, allowed values and help",
                              description="bp-ray config explain ppo.relevance_coef --preset world; a section "
                                          "(e.g. ppo) lists its keys, each with its value and help")
    p.add_argument("key", nargs="?", default="", help="section.key, a section, or nothing for the top level")
    p.set_defaults(func=cmd_config_explain)
    p = config_sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_config_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # httpx logs every request at INFO: the client's output would drown in it.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"bp-ray: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"bp-ray: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
