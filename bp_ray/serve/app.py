"""The beautifier on Ray Serve: a FastAPI ingress deployment that batches generation with `@serve.batch`, and an
optional Stable Diffusion deployment behind /v1/render, composed through a deployment handle.

`build_app(cfg)` sets replicas, autoscaling, backpressure and resources from `cfg.serve`; `app_builder(args)` is
the entry point of the Serve config files in cluster/ (`serve run cluster/serve.tiny.yaml`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from bp_ray import __version__
from bp_ray.config import PipelineConfig
from bp_ray.config_loader import load_config
from bp_ray.data.policy_format import kept_prefix
from bp_ray.layout import RunLayout
from bp_ray.serve import schemas as S
from bp_ray.serve.batch_gate import BatchGate
from bp_ray.serve.candidate_flow import latency_ms
from bp_ray.serve.control_plan import ControlPlan, plan_controls, used_controls
from bp_ray.serve.controls import encoder_tokens
from bp_ray.serve.errors import ERRORS, ApiError, BodyLimit, Limits, install_error_handlers
from bp_ray.serve.generation import (
    GenerationRequest,
    GenerationResult,
    beautified_text,
    beautify_input,
)
from bp_ray.serve.model_deployments import Generator, Renderer, Scorer
from bp_ray.serve.openapi_spec import BeautifierAPI, served_limit
from bp_ray.serve.streaming import StreamRelay

logger = logging.getLogger(__name__)

# One line of output: the SFT targets are single lines, so the beautifier's answer ends at the first newline.
BEAUTIFY_STOP = ("\n",)


SSE = {"text/event-stream": {"schema": {"type": "string"}}}
Sampled = S.BeautifyRequest | S.CompletionRequest | S.ChatCompletionRequest | S.RenderRequest
"""The request bodies that carry sampling and repetition settings."""
"""Placeholder for the streamed answers; `openapi_spec.with_limits` puts the event schemas in."""

api = BeautifierAPI(title="bp-ray beautifier", version=__version__,
              description="Turns a plain text-to-image prompt into one that makes Stable Diffusion draw a better "
                          "picture (BeautifulPrompt). OpenAI-compatible under /v1.")
install_error_handlers(api)
api.add_middleware(BodyLimit, limit=lambda: served_limit("max_body_bytes"))


# --- plain request handling (no Ray) ---------------------------------------------------------------------------

def _usage(prompt_tokens: int, completion_tokens: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def _texts_in(calls: list[tuple[str, list[str], list[str]]]) -> int:
    return sum(len(texts) for _, _, texts in calls)


def _new_seed() -> int:
    return secrets.randbelow(2**31)


# --- deployments -----------------------------------------------------------------------------------------------

@serve.deployment
@serve.ingress(api)
class Beautifier:
    """The HTTP ingress: validates requests and forms batches of output rows for the Generator deployment; rows of
    every route (beautify, completions, chat, render) share the batches."""

    def __init__(self, cfg: PipelineConfig, generator: DeploymentHandle, renderer: DeploymentHandle | None = None,
                 scorer: DeploymentHandle | None = None, scorer_kinds: tuple[str, ...] = (),
                 encoder_tokenizer: str = "", store_path: str = ""):
        # Imported here: this method reaches the replica by value, and only an import finds the real module.
        from transformers import AutoTokenizer

        from bp_ray.serve import openapi_spec
        from bp_ray.serve.candidate_flow import CandidateFlow
        from bp_ray.serve.candidates import CandidateStore

        openapi_spec.SERVED["serve"] = cfg.serve
        self.cfg = cfg
        self.limits = Limits(cfg)
        self.generator = generator
        self.renderer = renderer
        self.scorer = scorer
        # The renderer's own tokenizer: budgets are in the tokens its text encoder reads.
        self.encoder = (AutoTokenizer.from_pretrained(encoder_tokenizer, subfolder="tokenizer") if encoder_tokenizer
                        else None)
        self.window = int(self.encoder.model_max_length) if self.encoder is not None else None
        self.flow = CandidateFlow(cfg.serve.model_name, CandidateStore(store_path, cfg.serve.controls.store_max_rows),
                                  self._count, self._score if scorer is not None else None, frozenset(scorer_kinds),
                                  self._render if renderer is not None else None)
        self._score_batch = serve.batch(max_batch_size=cfg.serve.max_batch_size,
                                        batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
                                        batch_size_fn=_texts_in)(self._run_score_batch)
        # Built here, not as a decorator, because the number of batches in flight comes from the config.
        self._generate_batch = serve.batch(max_batch_size=cfg.serve.max_batch_size,
                                           batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
                                           max_concurrent_batches=cfg.serve.max_concurrent_batches)(self._run_batch)
        self._gate = BatchGate(cfg.serve.max_concurrent_batches)
        self.streams = StreamRelay(cfg, generator, self._timeout)

    # 1. generation: one row per item, so a request's n outputs may ride in different batches. Rows and streams
    # wait at a gate (see batch_gate) while every batch slot is busy.
    async def _run_batch(self, rows: list[GenerationRequest]) -> list[GenerationResult]:
        with self._gate.held():
            return await self.generator.generate.remote(list(rows))

    async def _generate_row(self, row: GenerationRequest) -> GenerationResult:
        await self._gate.wait()
        return await self._generate_batch(row)

    async def _generate(self, request: GenerationRequest, param: str) -> GenerationResult:
        """All n outputs of `request`; `param` is the field that holds its prompt (named if the model refuses it)."""
        rows = [dataclasses.replace(request, n=1, seed=request.seed + i) for i in range(request.n)]
        try:
            parts = await asyncio.wait_for(asyncio.gather(*(self._generate_row(row) for row in rows)),
                                           timeout=self.cfg.serve.request_timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout("generation") from None
        if parts[0].refused:
            raise ApiError(400, f"{param}: {parts[0].refused}", param=param)
        return GenerationResult(parts[0].prompt_tokens, [c for part in parts for c in part.completions])

    def _timeout(self, what: str, hint: str = "retry later or ask for fewer tokens") -> ApiError:
        return ApiError(504, f"{what} did not finish within the request timeout of "
                             f"{self.cfg.serve.request_timeout_s:g} s; {hint}",
                        code="request_timeout", kind="timeout_error")

    def _request(self, text: str, n: int, max_new_tokens: int, body: Sampled, seed: int,
                 stop: tuple[str, ...]) -> GenerationRequest:
        """The generation a request asks for: its own sampling and repetition settings, the server's otherwise."""
        serve_cfg = self.cfg.serve
        defaults = serve_cfg.decoding
        return GenerationRequest(
            text, n, max_new_tokens,
            serve_cfg.default_temperature if body.temperature is None else body.temperature,
            serve_cfg.top_p if body.top_p is None else body.top_p, seed, stop,
            repetition_penalty=(defaults.repetition_penalty if body.repetition_penalty is None
                                else body.repetition_penalty),
            no_repeat_ngram_size=(defaults.no_repeat_ngram_size if body.no_repeat_ngram_size is None
                                  else body.no_repeat_ngram_size))

    def _beautify_request(self, prompt: str, n: int, max_new_tokens: int, body: Sampled,
                          seed: int) -> GenerationRequest:
        request = self._request(beautify_input(self.cfg.sft.instruction, prompt, self.cfg.sft.keep_prompt), n,
                                max_new_tokens, body, seed, BEAUTIFY_STOP)
        # The template always has tokens: the generator checks the user's own words.
        return dataclasses.replace(request, prompt=prompt, instruction=self.cfg.sft.instruction,
                                   keep_prompt=self.cfg.sft.keep_prompt)

    def _shown(self, completion: str, prompt: str) -> str:
        """The rewrite a user sees for one beautify completion (with keep_prompt: the prompt, then the additions)."""
        return beautified_text(completion, prompt, self.cfg.sft.keep_prompt)

    # 2. scoring (one scorer call per kind per batch of requests), rendering, controls
    async def _run_score_batch(self, items: list[tuple[str, list[str], list[str]]]) -> list[list[dict]]:
        results: list[list[dict]] = [[] for _ in items]
        for kind in dict.fromkeys(kind for kind, _, _ in items):
            mine = [i for i, item in enumerate(items) if item[0] == kind]
            values = await self.scorer.score.remote(kind, [p for i in mine for p in items[i][1]],
                                                    [t for i in mine for t in items[i][2]])
            for i in mine:
                results[i], values = values[:len(items[i][2])], values[len(items[i][2]):]
        return results

    async def _score(self, kind: str, prompts: list[str], texts: list[str]) -> list[dict]:
        call = (kind, prompts, texts)
        alone = len(texts) > self.cfg.serve.max_batch_size  # more texts than any batch holds
        scoring = self._run_score_batch([call]) if alone else self._score_batch(call)
        try:
            result = await asyncio.wait_for(scoring, timeout=self.cfg.serve.request_timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout("scoring", "retry later or ask for fewer outputs") from None
        return result[0] if alone else result

    async def _render(self, prompt: str, seed: int, negative_prompt: str | None) -> bytes:
        try:
            return await asyncio.wait_for(self.renderer.render.remote(prompt, seed, negative_prompt),
                                          timeout=self.cfg.serve.request_timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout("rendering", "retry later") from None

    def _count(self, text: str) -> int:
        return encoder_tokens(self.encoder, text) if self.encoder is not None else len(text.split())

    def _plan(self, body: S.Controls, prompt: str, field: str) -> tuple[str, ControlPlan]:
        truncates = self.cfg.serve.render.long_prompts == "truncate"
        return plan_controls(body, prompt, self.cfg.serve.controls, self.window if truncates else None,
                             self._count, self.cfg.sft.keep_prompt, field, self.cfg.serve.decoding.keep_colours)

    # 3. routes
    @api.post("/v1/beautify", response_model=S.BeautifyResponse, responses=ERRORS)
    async def beautify(self, body: S.BeautifyRequest) -> S.BeautifyResponse:
        """Beautify one prompt with the training template; n outputs, seeded (output i uses seed + i), under the
        request's controls, ranked when asked; or, with edit_of, score a user's edit of an earlier output."""
        start = time.perf_counter()
        self.limits.model(body.model)
        self.limits.controls(body)
        seed = _new_seed() if body.seed is None else body.seed
        model = self.cfg.serve.model_name
        if body.edit_of is not None:
            original, edited, before = await self.flow.edit(body, seed)
            return S.BeautifyResponse(model=model, prompt=original.prompt, seed=seed, outputs=[edited],
                                      original=before, negative_prompt=body.negative_prompt, usage=_usage(0, 0),
                                      latency_ms=latency_ms(start))
        if body.prompt is None:
            raise ApiError(400, "prompt: required (unless edit_of names an output whose edit to score)",
                           param="prompt")
        if body.text is not None:
            raise ApiError(400, "text: only with edit_of (the edited text of that output)", param="text")
        self.limits.prompt(body.prompt)
        self.limits.n(body.n)
        self.flow.check_rank(body.rank, body.best_of, body.n, body.render)
        max_new_tokens = self.limits.max_new_tokens(body.max_new_tokens, "max_new_tokens")
        prompt, plan = self._plan(body, body.prompt, "prompt")
        result = await self._generate(plan.constrain(self._beautify_request(
            prompt, body.n, max_new_tokens, body, seed)), "prompt")
        outputs, rejected = await self.flow.candidates(body, prompt, plan, seed, result,
                                                       lambda text: self._shown(text, prompt))
        return S.BeautifyResponse(model=model, prompt=body.prompt, seed=seed, outputs=outputs, rejected=rejected,
                                  negative_prompt=body.negative_prompt,
                                  usage=_usage(result.prompt_tokens,
                                               sum(c.completion_tokens for c in result.completions)),
                                  latency_ms=latency_ms(start))

    @api.post("/v1/completions", response_model=S.CompletionResponse,
              responses={**ERRORS, 200: {"content": SSE, "description": "JSON, or server-sent events if stream"}})
    async def completions(self, body: S.CompletionRequest) -> Any:
        """OpenAI completions: continues each prompt as given (no instruction template)."""
        self.limits.model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        for i, prompt in enumerate(prompts):
            self.limits.prompt(prompt, "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]")
        self.limits.n(body.n, len(prompts))
        max_new_tokens = self.limits.max_new_tokens(body.max_tokens, "max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self.limits.stop(body.stop)
        seed = _new_seed() if body.seed is None else body.seed
        requests = [self._request(p, body.n, max_new_tokens, body, seed, stop) for p in prompts]
        params = ["prompt"] if isinstance(body.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(requests) > 1:
                raise ApiError(400, "stream=true takes a single prompt", param="prompt")
            return await self.streams.events(requests[0], params[0], completion_id, created, chat=False)
        results = await asyncio.gather(*(self._generate(r, p) for r, p in zip(requests, params, strict=True)))
        choices = [S.CompletionChoice(index=p * body.n + i, text=c.text, finish_reason=c.finish_reason)
                   for p, result in enumerate(results) for i, c in enumerate(result.completions)]
        return S.CompletionResponse(id=completion_id, created=created, model=self.cfg.serve.model_name,
                                    choices=choices, usage=_usage(sum(r.prompt_tokens for r in results),
                                                                  sum(c.completion_tokens for r in results
                                                                      for c in r.completions)))

    @api.post("/v1/chat/completions", response_model=S.ChatCompletionResponse,
              responses={**ERRORS, 200: {"content": SSE, "description": "JSON, or server-sent events if stream"}})
    async def chat_completions(self, body: S.ChatCompletionRequest) -> Any:
        """OpenAI chat completions: the last user message is the prompt to beautify; the answer is its rewrite."""
        self.limits.model(body.model)
        self.limits.chat(body.messages)
        self.limits.controls(body)
        last = max(i for i, m in enumerate(body.messages) if m.role == "user")
        prompt, param = body.messages[last].text(), f"messages[{last}].content"
        self.limits.prompt(prompt, "messages")
        self.limits.n(body.n)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_new_tokens = self.limits.max_new_tokens(
            asked, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        seed = _new_seed() if body.seed is None else body.seed
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream and used_controls(body):
            field = used_controls(body)[0]
            raise ApiError(400, f"{field}: not available with stream=true (a stream sends text as it is generated; "
                                "the controls check each output whole)", param=field)
        prompt, plan = self._plan(body, prompt, param)
        request = plan.constrain(self._beautify_request(prompt, body.n, max_new_tokens, body, seed))
        if body.stream:
            prefix = kept_prefix(prompt) if self.cfg.sft.keep_prompt else ""
            return await self.streams.events(request, param, completion_id, created, chat=True, prefix=prefix,
                                            fit=plan.fit_prefix(self._count))
        result = await self._generate(request, param)
        finished = [(c, plan.finish(self._shown(c.text, prompt), prompt, self._count)) for c in result.completions]
        kept = [(c, done) for c, done in finished if done is not None]
        if not kept:
            raise ApiError(400, f"keep: none of the {len(finished)} outputs could keep every protected span within "
                                f"the token budget of {plan.budget} encoder tokens", param="keep")
        choices = [S.ChatChoice(index=i, message=S.AssistantMessage(content=done[0]),
                                finish_reason=c.finish_reason) for i, (c, done) in enumerate(kept)]
        return S.ChatCompletionResponse(id=completion_id, created=created, model=self.cfg.serve.model_name,
                                        choices=choices, usage=_usage(result.prompt_tokens, sum(
                                            c.completion_tokens for c in result.completions)))

    @api.get("/v1/models", response_model=S.ModelList)
    async def models(self) -> S.ModelList:
        return S.ModelList(data=[self._card()])

    @api.get("/v1/models/{model_id}", response_model=S.ModelCard, responses=ERRORS)
    async def model(self, model_id: str) -> S.ModelCard:
        self.limits.model(model_id)
        return self._card()

    def _card(self) -> S.ModelCard:
        return S.ModelCard(id=self.cfg.serve.model_name, created=int(os.path.getmtime(__file__)))

    @api.post("/v1/render", response_class=Response, responses={
        **ERRORS, 200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                        "description": "the rendered PNG; headers X-Beautified-Prompt (URL-encoded) and X-Seed"}})
    async def render(self, body: S.RenderRequest) -> Response:
        """Beautify (unless beautify=false), then render with Stable Diffusion; returns a PNG."""
        if self.renderer is None:
            raise ApiError(404, "rendering is off on this endpoint; start it with --set serve.enable_render=true",
                           code="render_disabled", kind="not_found_error")
        self.limits.prompt(body.prompt)
        self.limits.controls(body)
        seed = _new_seed() if body.seed is None else body.seed
        prompt, plan = self._plan(body, body.prompt.strip(), "prompt")
        if body.beautify:
            max_new_tokens = self.limits.max_new_tokens(body.max_new_tokens, "max_new_tokens")
            result = await self._generate(plan.constrain(self._beautify_request(
                prompt, 1, max_new_tokens, body, seed)), "prompt")
            # An output that cannot keep the spans in budget: the user's own prompt, which holds them.
            done = plan.finish(self._shown(result.completions[0].text, prompt), prompt, self._count)
            prompt = done[0] if done else prompt
        png = await self._render(prompt, seed, body.negative_prompt)
        headers = {"X-Beautified-Prompt": quote(prompt), "X-Seed": str(seed)}
        if body.negative_prompt is not None:
            headers["X-Negative-Prompt"] = quote(body.negative_prompt)
        return Response(content=png, media_type="image/png", headers=headers)

    @api.get("/healthz", response_model=S.Health, responses=ERRORS)
    async def healthz(self) -> S.Health:
        """This ingress replica and one generator replica (the one the call reached), with its batching figures."""
        try:
            generator = await asyncio.wait_for(self.generator.info.remote(), timeout=self.cfg.serve.health_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"no generator replica answered within {self.cfg.serve.health_timeout_s:g} s",
                           kind="server_error") from None
        return S.Health(status="ok", model=self.cfg.serve.model_name, pid=os.getpid(),
                        render=self.renderer is not None, generator=generator)


# --- building the application ----------------------------------------------------------------------------------

def serve_checkpoint(cfg: PipelineConfig) -> str:
    """serve.model, else the run's PPO model, else its SFT model, else models.policy; resolved to a path."""
    from bp_ray.models.loading import resolve_model

    if cfg.serve.model:
        return resolve_model(cfg.serve.model, cfg.models)
    layout = RunLayout(Path(cfg.output_dir))
    for stage in ("ppo", "sft"):
        folder = layout.model_dir(stage)
        if (folder / "config.json").exists():
            return str(folder.resolve())
    return resolve_model(cfg.models.policy, cfg.models)


def deployment_options(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Options of the two deployments: the ingress (HTTP admission: max_ongoing/max_queued requests, so overload
    gets 503) and the generator (replicas fixed, or autoscaled between min and max on batches in flight)."""
    from bp_ray.ray_runtime import WORKER_ENV

    s = cfg.serve
    env = {"runtime_env": {"env_vars": dict(WORKER_ENV)}}
    scaling: dict[str, Any] = {"num_replicas": s.min_replicas} if s.min_replicas == s.max_replicas else {
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "initial_replicas": max(1, s.min_replicas),
                               "target_ongoing_requests": s.target_ongoing_requests,
                               # How fast it reacts, both ways (ServeConfig says why the defaults are slow).
                               "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
                               "look_back_period_s": s.look_back_period_s,
                               "metrics_interval_s": s.metrics_interval_s}}
    return {
        "ingress": {"num_replicas": s.ingress_replicas, "max_ongoing_requests": s.max_ongoing_requests,
                    "max_queued_requests": s.max_queued_requests,
                    "ray_actor_options": {"num_cpus": s.ingress_cpus, **env}},
        # Batches are bounded by the ingress (replicas x max_concurrent_batches); the headroom lets streamed
        # requests and health checks run beside a batch instead of queueing behind it (sync methods run on
        # Serve's thread pool).
        "generator": {**scaling, "max_ongoing_requests": s.ingress_replicas * s.max_concurrent_batches + 4,
                      "max_queued_requests": -1,
                      "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica,
                                            **env}},
    }


def build_app(cfg: PipelineConfig, checkpoint: str | None = None) -> serve.Application:
    """The Serve application: Beautifier (HTTP ingress) -> Generator (+ Renderer when serve.enable_render, + Scorer
    when there are reward models or serve.controls.online_rank)."""
    from bp_ray.models.loading import resolve_model
    from bp_ray.serve.ranking import rm_folder

    options = deployment_options(cfg)
    generator = Generator.options(**options["generator"]).bind(cfg, checkpoint or serve_checkpoint(cfg))
    renderer = scorer = None
    if cfg.serve.enable_render:
        renderer = Renderer.options(num_replicas=1, ray_actor_options={
            "num_cpus": cfg.serve.render_cpus, "num_gpus": cfg.serve.render_gpus}).bind(cfg)
    controls = cfg.serve.controls
    kinds = (("reward_model",) if rm_folder(cfg) else ()) + (("online",) if controls.online_rank else ())
    if kinds:
        scorer = Scorer.options(num_replicas=1, ray_actor_options={
            "num_cpus": controls.scorer_cpus, "num_gpus": controls.scorer_gpus}).bind(cfg)
    tokenizer = resolve_model(cfg.models.diffusion, cfg.models)
    store = Path(controls.candidate_store or RunLayout(Path(cfg.output_dir)).root / "serve" / "candidates.sqlite")
    return Beautifier.options(**options["ingress"]).bind(cfg, generator, renderer, scorer, kinds, tokenizer,
                                                         str(store.resolve()))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve config entry point: args `preset` (or `config`), `overrides` ("section.key=value" list), `model`."""
    overrides = list(args.get("overrides", []))
    if args.get("model"):
        overrides.append(f"serve.model={args['model']}")
    cfg = load_config(args.get("preset", "tiny"), overrides, config_file=args.get("config"))
    return build_app(cfg)
