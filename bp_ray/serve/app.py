"""The beautifier on Ray Serve: a FastAPI ingress deployment that batches generation with `@serve.batch`, and an
optional Stable Diffusion deployment behind /v1/render, composed through a deployment handle.

`build_app(cfg)` sets replicas, autoscaling, backpressure and resources from `cfg.serve`; `app_builder(args)` is
the entry point of the Serve config files in cluster/ (`serve run cluster/serve.tiny.yaml`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from bp_ray import __version__
from bp_ray.config import PipelineConfig
from bp_ray.config_loader import load_config
from bp_ray.data.policy_format import kept_prefix
from bp_ray.layout import RunLayout
from bp_ray.serve import schemas as S
from bp_ray.serve.batch_gate import BatchGate
from bp_ray.serve.errors import ERRORS, ApiError, Limits, install_error_handlers
from bp_ray.serve.generation import (
    GenerationRequest,
    GenerationResult,
    beautified_text,
    beautify_input,
    generate,
    stream_batch,
)
from bp_ray.serve.openapi_spec import BeautifierAPI

logger = logging.getLogger(__name__)

# One line of output: the SFT targets are single lines, so the beautifier's answer ends at the first newline.
BEAUTIFY_STOP = ("\n",)


SSE = {"text/event-stream": {"schema": {"type": "string"}}}
"""Placeholder for the streamed answers; `openapi_spec.with_limits` puts the event schemas in."""

api = BeautifierAPI(title="bp-ray beautifier", version=__version__,
              description="Turns a plain text-to-image prompt into one that makes Stable Diffusion draw a better "
                          "picture (BeautifulPrompt). OpenAI-compatible under /v1.")
install_error_handlers(api)


# --- plain request handling (no Ray) ---------------------------------------------------------------------------

def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def _rows_in(requests: list[GenerationRequest]) -> int:
    return sum(request.n for request in requests)


def _new_seed() -> int:
    return secrets.randbelow(2**31)


# --- deployments -----------------------------------------------------------------------------------------------

@serve.deployment
class Renderer:
    """Stable Diffusion behind /v1/render: one prompt and seed -> PNG bytes."""

    def __init__(self, cfg: PipelineConfig):
        from bp_ray.models.loading import load_diffusion

        self.cfg = cfg
        models = cfg.models
        self.pipe = load_diffusion(models.diffusion, models, device=models.device, dtype=models.dtype,
                                   scheduler=self.cfg.serve.render.scheduler)

    def render(self, prompt: str, seed: int) -> bytes:
        from PIL import Image

        from bp_ray.rewards.render import render_seeds

        pixels = render_seeds(self.pipe, [prompt], [seed], self.cfg.serve.render)[0, 0]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()


@serve.deployment
class Generator:
    """The policy: each call generates one whole batch of rows (the ingress forms the batches). A process of its
    own, so generation never competes with HTTP handling for one interpreter lock."""

    def __init__(self, cfg: PipelineConfig, checkpoint: str):
        import torch

        from bp_ray.models.loading import load_causal_lm

        models = cfg.models
        if models.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(cfg.serve.num_cpus_per_replica)))
        self.stream_interval_s = cfg.serve.stream_interval_s
        self.checkpoint = checkpoint
        self.model, self.tokenizer = load_causal_lm(checkpoint, models, device=models.device, dtype=models.dtype)
        self.stats = S.BatchStats()
        logger.info("generator replica up: %s", checkpoint)

    def generate(self, rows: list[GenerationRequest]) -> list[GenerationResult]:
        start = time.perf_counter()
        results = generate(self.model, self.tokenizer, rows)
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.generate_s += time.perf_counter() - start
        return results

    def stream_batch(self, requests: list[GenerationRequest]) -> Iterator[Any]:
        """Each request's new deltas, per stream interval (see generation.stream_batch)."""
        self.stats.stream_batches += 1
        self.stats.stream_rows += _rows_in(requests)
        yield from stream_batch(self.model, self.tokenizer, requests, self.stream_interval_s)

    def info(self) -> S.GeneratorInfo:
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica
            replica = "local"
        return S.GeneratorInfo(checkpoint=self.checkpoint, replica=replica, pid=os.getpid(), batching=self.stats)


@serve.deployment
@serve.ingress(api)
class Beautifier:
    """The HTTP ingress: validates requests and forms batches of output rows for the Generator deployment; rows of
    every route (beautify, completions, chat, render) share the batches."""

    def __init__(self, cfg: PipelineConfig, generator: DeploymentHandle, renderer: DeploymentHandle | None = None):
        # Imported here: this method reaches the replica by value, and only an import finds the real module.
        from bp_ray.serve import openapi_spec

        openapi_spec.SERVED["serve"] = cfg.serve
        self.cfg = cfg
        self.limits = Limits(cfg)
        self.generator = generator
        self.renderer = renderer
        # Built here, not as a decorator, because the number of batches in flight comes from the config.
        self._generate_batch = serve.batch(max_batch_size=cfg.serve.max_batch_size,
                                           batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
                                           max_concurrent_batches=cfg.serve.max_concurrent_batches)(self._run_batch)
        self._gate = BatchGate(cfg.serve.max_concurrent_batches)
        # Streamed requests ride batches of their own, whole (n rows each): mixed into the plain batches, every
        # row's every step would travel through the stream.
        self._stream_batch = serve.batch(max_batch_size=cfg.serve.max_batch_size,
                                         batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s,
                                         max_concurrent_batches=cfg.serve.max_concurrent_batches,
                                         batch_size_fn=_rows_in)(self._run_stream_batch)
        self._stream_gate = BatchGate(cfg.serve.max_concurrent_batches)

    # 1. generation: one row per item, so a request's n outputs may ride in different batches. Rows and streams
    # wait at a gate (see batch_gate) while every batch slot is busy.
    async def _run_batch(self, rows: list[GenerationRequest]) -> list[GenerationResult]:
        with self._gate.held():
            return await self.generator.generate.remote(list(rows))

    async def _run_stream_batch(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        """serve.batch's streaming form: per step one item per request, its list of deltas, then StopIteration
        once all its outputs have finished."""
        requests = list(requests)
        finished = [0] * len(requests)
        with self._stream_gate.held():
            async for step in self.generator.options(stream=True).stream_batch.remote(requests):
                items: list[Any] = []
                for i, deltas in enumerate(step):
                    if finished[i] >= requests[i].n:
                        items.append(StopIteration)
                        continue
                    items.append(deltas)
                    finished[i] += sum(1 for d in deltas if d.finish_reason is not None or d.refused)
                    if any(d.refused for d in deltas):
                        finished[i] = requests[i].n
                yield items

    def _stream_rows(self, request: GenerationRequest) -> AsyncIterator[list[Any]]:
        if request.n > self.cfg.serve.max_batch_size:  # more rows than any batch holds: a batch of its own
            async def alone() -> AsyncIterator[list[Any]]:
                async for step in self.generator.options(stream=True).stream_batch.remote([request]):
                    yield step[0]
            return alone()

        async def gated() -> AsyncIterator[list[Any]]:
            await self._stream_gate.wait()
            async for step in self._stream_batch(request):
                yield step
        return gated()

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

    def _request(self, text: str, n: int, max_new_tokens: int, temperature: float | None, top_p: float | None,
                 seed: int, stop: tuple[str, ...]) -> GenerationRequest:
        serve_cfg = self.cfg.serve
        return GenerationRequest(text, n, max_new_tokens,
                                 serve_cfg.default_temperature if temperature is None else temperature,
                                 serve_cfg.top_p if top_p is None else top_p, seed, stop)

    def _beautify_request(self, prompt: str, n: int, max_new_tokens: int, temperature: float | None,
                          top_p: float | None, seed: int) -> GenerationRequest:
        request = self._request(beautify_input(self.cfg.sft.instruction, prompt, self.cfg.sft.keep_prompt), n,
                                max_new_tokens, temperature, top_p, seed, BEAUTIFY_STOP)
        # The template always has tokens: the generator checks the user's own words.
        return dataclasses.replace(request, prompt=prompt)

    def _shown(self, completion: str, prompt: str) -> str:
        """The rewrite a user sees for one beautify completion (with keep_prompt: the prompt, then the additions)."""
        return beautified_text(completion, prompt, self.cfg.sft.keep_prompt)

    async def _stream_deltas(self, request: GenerationRequest, param: str) -> AsyncIterator[Any]:
        """The generator's deltas, the first one awaited before this returns: a refused prompt (400) or a timeout
        before the first token (504) is still answered with its status, not inside a 200 stream."""
        deadline = time.monotonic() + self.cfg.serve.request_timeout_s
        steps = self._stream_rows(request)

        async def deltas() -> AsyncIterator[Any]:
            async for step in steps:
                for delta in step:
                    yield delta

        flat = deltas()
        try:
            first = await asyncio.wait_for(flat.__anext__(), timeout=self.cfg.serve.request_timeout_s)
        except asyncio.TimeoutError:
            await flat.aclose()
            raise self._timeout("generation") from None
        except StopAsyncIteration:
            first = None
        if first is not None and first.refused:
            raise ApiError(400, f"{param}: {first.refused}", param=param)

        async def rest() -> AsyncIterator[Any]:
            if first is None:
                return
            yield first
            async for delta in flat:
                if time.monotonic() > deadline:  # the batch goes on for its other requests
                    await flat.aclose()
                    return
                yield delta

        return rest()

    # 2. routes
    @api.post("/v1/beautify", response_model=S.BeautifyResponse, responses=ERRORS)
    async def beautify(self, body: S.BeautifyRequest) -> S.BeautifyResponse:
        """Beautify one prompt with the training template; n outputs, seeded (output i uses seed + i)."""
        start = time.perf_counter()
        self.limits.model(body.model)
        self.limits.prompt(body.prompt)
        self.limits.n(body.n)
        max_new_tokens = self.limits.max_new_tokens(body.max_new_tokens, "max_new_tokens")
        seed = _new_seed() if body.seed is None else body.seed
        result = await self._generate(self._beautify_request(body.prompt, body.n, max_new_tokens, body.temperature,
                                                             body.top_p, seed), "prompt")
        outputs = [S.BeautifyOutput(index=i, text=self._shown(c.text, body.prompt), finish_reason=c.finish_reason,
                                    tokens=c.completion_tokens) for i, c in enumerate(result.completions)]
        return S.BeautifyResponse(model=self.cfg.serve.model_name, prompt=body.prompt, seed=seed, outputs=outputs,
                                  usage=_usage(result.prompt_tokens,
                                               sum(c.completion_tokens for c in result.completions)),
                                  latency_ms=round((time.perf_counter() - start) * 1000, 3))

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
        requests = [self._request(p, body.n, max_new_tokens, body.temperature, body.top_p, seed, stop)
                    for p in prompts]
        params = ["prompt"] if isinstance(body.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(requests) > 1:
                raise ApiError(400, "stream=true takes a single prompt", param="prompt")
            return await self._event_stream(requests[0], params[0], completion_id, created, chat=False)
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
        last = max(i for i, m in enumerate(body.messages) if m.role == "user")
        prompt, param = body.messages[last].text(), f"messages[{last}].content"
        self.limits.prompt(prompt, "messages")
        self.limits.n(body.n)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_new_tokens = self.limits.max_new_tokens(
            asked, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        seed = _new_seed() if body.seed is None else body.seed
        request = self._beautify_request(prompt, body.n, max_new_tokens, body.temperature, body.top_p, seed)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            prefix = kept_prefix(prompt) if self.cfg.sft.keep_prompt else ""
            return await self._event_stream(request, param, completion_id, created, chat=True, prefix=prefix)
        result = await self._generate(request, param)
        choices = [S.ChatChoice(index=i, message=S.AssistantMessage(content=self._shown(c.text, prompt)),
                                finish_reason=c.finish_reason) for i, c in enumerate(result.completions)]
        return S.ChatCompletionResponse(id=completion_id, created=created, model=self.cfg.serve.model_name,
                                        choices=choices, usage=_usage(result.prompt_tokens, sum(
                                            c.completion_tokens for c in result.completions)))

    async def _event_stream(self, request: GenerationRequest, param: str, completion_id: str, created: int,
                            chat: bool, prefix: str = "") -> StreamingResponse:
        """SSE chunks of the generation; `prefix` (keep_prompt: the user prompt) opens each choice's answer."""
        model = self.cfg.serve.model_name
        deltas = await self._stream_deltas(request, param)

        async def events() -> AsyncIterator[str]:
            started = [False] * request.n
            async for delta in deltas:
                text = delta.text
                if chat and not started[delta.index]:
                    text = text.lstrip()  # as beautified_text trims the whole answer
                    started[delta.index] = bool(text)
                    if prefix and (text or delta.finish_reason):
                        text = f"{prefix} {text}" if text else prefix.rstrip(",")
                        started[delta.index] = True
                if chat:
                    chunk = S.ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[
                        S.ChatDeltaChoice(index=delta.index, delta=S.AssistantMessage(content=text),
                                          finish_reason=delta.finish_reason)])
                else:
                    chunk = S.CompletionResponse(id=completion_id, created=created, model=model, choices=[
                        S.CompletionChoice(index=delta.index, text=text, finish_reason=delta.finish_reason)])
                yield _sse(chunk.model_dump())
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

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
        seed = _new_seed() if body.seed is None else body.seed
        prompt = body.prompt.strip()
        if body.beautify:
            max_new_tokens = self.limits.max_new_tokens(body.max_new_tokens, "max_new_tokens")
            result = await self._generate(self._beautify_request(prompt, 1, max_new_tokens, body.temperature,
                                                                 None, seed), "prompt")
            prompt = self._shown(result.completions[0].text, prompt) or prompt
        try:
            png = await asyncio.wait_for(self.renderer.render.remote(prompt, seed),
                                         timeout=self.cfg.serve.request_timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout("rendering", "retry later") from None
        return Response(content=png, media_type="image/png",
                        headers={"X-Beautified-Prompt": quote(prompt), "X-Seed": str(seed)})

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
    """The Serve application: Beautifier (HTTP ingress) -> Generator (+ Renderer when serve.enable_render)."""
    options = deployment_options(cfg)
    generator = Generator.options(**options["generator"]).bind(cfg, checkpoint or serve_checkpoint(cfg))
    renderer = None
    if cfg.serve.enable_render:
        renderer = Renderer.options(num_replicas=1, ray_actor_options={
            "num_cpus": cfg.serve.render_cpus, "num_gpus": cfg.serve.render_gpus}).bind(cfg)
    return Beautifier.options(**options["ingress"]).bind(cfg, generator, renderer)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve config entry point: args `preset` (or `config`), `overrides` ("section.key=value" list), `model`."""
    overrides = list(args.get("overrides", []))
    if args.get("model"):
        overrides.append(f"serve.model={args['model']}")
    cfg = load_config(args.get("preset", "tiny"), overrides, config_file=args.get("config"))
    return build_app(cfg)
