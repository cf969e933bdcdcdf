"""What POST /v1/beautify does after validation: n candidates generated under the request's controls, each
checked (protected spans, token budget, avoided words), scored and ranked when asked, stored so that a later
edit can be scored against it, and rendered when asked; and the review loop (`edit_of`).

Plain async Python: the ingress hands in how to generate, score, render and count encoder tokens."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bp_ray.serve import schemas as S
from bp_ray.serve.candidates import Candidate, CandidateStore
from bp_ray.serve.control_plan import ControlPlan
from bp_ray.serve.errors import ApiError
from bp_ray.serve.generation import GenerationResult
from bp_ray.serve.ranking import ranked

Score = Callable[[str, list[str], list[str]], Awaitable[list[dict[str, float]]]]
Render = Callable[[str, int, str | None], Awaitable[bytes]]


@dataclass
class CandidateFlow:
    model: str
    store: CandidateStore
    count: Callable[[str], int]
    """Tokens of the renderer's text encoder, BOS and EOS included."""
    score: Score | None
    """(kind, prompts, texts) -> one score dict per text; None when nothing can score."""
    scorer_kinds: frozenset[str]
    render: Render | None

    def check_rank(self, rank: str, best_of: int | None, n: int, render: bool = False) -> None:
        """Before any generation: what the request asks that this endpoint cannot do is a 400 at once."""
        if render and self.render is None:
            raise ApiError(400, "render: rendering is off on this endpoint; start it with "
                                "--set serve.enable_render=true", param="render")
        if best_of is not None and rank == "none":
            raise ApiError(400, "best_of: needs rank (reward_model or online) to know which outputs are best",
                           param="best_of")
        if best_of is not None and best_of > n:
            raise ApiError(400, f"best_of={best_of} exceeds n={n}: it picks the best of the n outputs",
                           param="best_of")
        if rank != "none" and rank not in self.scorer_kinds:
            have = ", ".join(sorted(self.scorer_kinds)) or "none"
            raise ApiError(400, f"rank: {rank!r} is not available on this endpoint (available: {have}); "
                                f"{_HOW_TO_RANK[rank]}", param="rank")

    async def candidates(self, body: S.BeautifyRequest, prompt: str, plan: ControlPlan, seed: int,
                         generation: GenerationResult, shown: Callable[[str], str]
                         ) -> tuple[list[S.BeautifyOutput], int]:
        """The returned outputs (ranked and cut to best_of when asked) and how many generated ones were rejected."""
        checked = [(i, completion, plan.finish(shown(completion.text), prompt, self.count))
                   for i, completion in enumerate(generation.completions)]
        kept = [(i, completion, finished) for i, completion, finished in checked if finished is not None]
        if not kept:
            field = "keep" if plan.spans else "max_prompt_tokens"
            raise ApiError(400, f"{field}: none of the {len(checked)} outputs could keep every protected span within "
                                f"the token budget of {plan.budget} encoder tokens; raise max_prompt_tokens, "
                                "shorten the protected spans or ask for more outputs (n)", param=field)
        texts = [finished[0] for _, _, finished in kept]
        scores = await self._scores(body.rank, [prompt] * len(texts), texts)
        order = ranked([score.model_dump() for score in scores]) if scores else list(range(len(kept)))
        order = order[:body.best_of] if body.best_of is not None else order
        stored = self.store.add_many(self.model, prompt, [(texts[j], _plain(scores[j]) if scores else {})
                                                          for j in order])
        outputs = []
        for rank, (j, candidate) in enumerate(zip(order, stored, strict=True)):
            index, completion, (text, tokens) = kept[j]
            outputs.append(S.BeautifyOutput(id=candidate.id, index=index if body.rank == "none" else rank, text=text,
                                            finish_reason=completion.finish_reason,
                                            tokens=completion.completion_tokens, encoder_tokens=tokens,
                                            scores=scores[j] if scores else None))
        if body.render:
            await self._render_all(outputs, seed, body.negative_prompt)
        return outputs, len(checked) - len(kept)

    async def edit(self, body: S.BeautifyRequest, seed: int) -> tuple[Candidate, S.BeautifyOutput, S.BeautifyOutput]:
        """The stored original, the user's edit and the original, scored the same way (rank, else the text
        reward model if there is one)."""
        if body.text is None:
            raise ApiError(400, "text: edit_of needs the edited text in `text`", param="text")
        original = self.store.get(body.edit_of or "")
        if original is None:
            raise ApiError(404, f"edit_of: no output with id {body.edit_of!r} is stored on this endpoint (ids come "
                                "from its responses)", param="edit_of", code="candidate_not_found",
                           kind="not_found_error")
        kind = body.rank if body.rank != "none" else ("reward_model" if "reward_model" in self.scorer_kinds else None)
        texts = [original.text, body.text]
        scores = await self._scores(kind or "none", [original.prompt] * 2, texts)
        if scores:  # the original's scores under this scorer, kept beside any it had
            self.store.add(self.model, original.prompt, original.text, _plain(scores[0]))
        edited = self.store.add_many(self.model, original.prompt, [(body.text, _plain(scores[1]) if scores else {})],
                                     edit_of=original.id)[0]
        before = S.BeautifyOutput(id=original.id, index=0, text=original.text, finish_reason="edit", tokens=0,
                                  encoder_tokens=self.count(original.text), scores=scores[0] if scores else None)
        after = S.BeautifyOutput(id=edited.id, index=0, text=body.text, finish_reason="edit", tokens=0,
                                 encoder_tokens=self.count(body.text), scores=scores[1] if scores else None)
        if body.render:
            await self._render_all([after, before], seed, body.negative_prompt)
        return original, after, before

    async def _scores(self, rank: str, prompts: list[str], texts: list[str]) -> list[S.Scores]:
        if rank == "none" or self.score is None:
            return []
        return [S.Scores(**values) for values in await self.score(rank, prompts, texts)]

    async def _render_all(self, outputs: Sequence[S.BeautifyOutput], seed: int, negative: str | None) -> None:
        if self.render is None:
            raise ApiError(400, "render: rendering is off on this endpoint; start it with "
                                "--set serve.enable_render=true", param="render")
        images = await asyncio.gather(*(self.render(output.text, seed, negative) for output in outputs))
        for output, png in zip(outputs, images, strict=True):
            output.image_png_base64 = base64.b64encode(png).decode("ascii")


_HOW_TO_RANK = {
    "reward_model": "train the reward models (bp-ray train rm) in the run the endpoint serves, or set "
                    "serve.controls.reward_model",
    "online": "start the endpoint with --set serve.controls.online_rank=true",
}


def _plain(scores: S.Scores) -> dict[str, float]:
    return {key: value for key, value in scores.model_dump().items() if value is not None}


def latency_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


