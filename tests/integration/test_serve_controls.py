"""The user controls of the endpoint over real HTTP (issue 26): protected spans, the text encoder's token budget,
negative prompts, best-of-n with scores, detail / style / avoid, and the review loop (edit_of).

One `bp-ray serve --preset tiny` process with an untrained reward-model folder (rank=reward_model), online
ranking on, and the model rewriting freely (sft.keep_prompt off), so that every guarantee comes from the controls
and not from the answer opening with the prompt."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from bp_ray.data.vocab import load_vocab
from bp_ray.models.loading import resolve_model
from tests.integration.rm_folder import untrained_rm_folder
from tests.integration.serve_process import ServeProcess, free_port, start

pytestmark = pytest.mark.integration

PROMPTS = ("a cat on a sofa", "a lighthouse at night", "portrait of an old sailor", "a castle on a hill")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models_cfg) -> ServeProcess:
    run_dir = tmp_path_factory.mktemp("controls-run")
    rm_dir = untrained_rm_folder(tiny_models_cfg, run_dir / "rm")
    port = free_port()
    argv = [sys.executable, "-m", "bp_ray.cli", "serve", "--preset", "tiny", "--port", str(port)]
    for item in (f"models.zoo_dir={tiny_models_cfg.zoo_dir}", f"output_dir={run_dir}", "sft.keep_prompt=false",
                 f"serve.controls.reward_model={rm_dir}", "serve.controls.online_rank=true", "serve.max_n=8",
                 "serve.max_batch_size=8", "serve.request_timeout_s=60"):
        argv += ["--set", item]
    process = start(argv, run_dir / "serve.log", f"http://127.0.0.1:{port}", ready_line="bp-ray serve: ready")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def clip_tokenizer(tiny_models_cfg):
    return AutoTokenizer.from_pretrained(resolve_model(tiny_models_cfg.diffusion, tiny_models_cfg),
                                         subfolder="tokenizer")


def beautify(server: ServeProcess, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/beautify", json=body, timeout=120)


def ok(server: ServeProcess, **body) -> dict:
    response = beautify(server, **body)
    assert response.status_code == 200, response.text
    return response.json()


def error(server: ServeProcess, status: int, **body) -> dict:
    response = beautify(server, **body)
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_every_output_keeps_every_protected_span(server):
    spans = ["<lora:catstyle:0.8>", "by Jan van Eyck"]
    texts = []
    for i, prompt in enumerate(PROMPTS):
        body = ok(server, prompt=f"<keep>{prompt}</keep>", keep=spans, n=8, seed=100 * i, temperature=1.0)
        assert body["prompt"] == f"<keep>{prompt}</keep>"
        texts += [(o["text"], prompt) for o in body["outputs"]]
        assert len(body["outputs"]) + body["rejected"] == 8
    assert len(texts) >= 24
    for text, prompt in texts:
        assert prompt in text and all(span in text for span in spans), text
        assert "<keep>" not in text


def test_outputs_never_exceed_the_token_budget_and_report_their_count(server, clip_tokenizer):
    counted = 0
    for budget in (12, 77):
        for i, prompt in enumerate(PROMPTS):
            body = ok(server, prompt=prompt, n=8, seed=7 + i, temperature=1.0, max_new_tokens=64,
                      max_prompt_tokens=budget if budget != 77 else None)
            for output in body["outputs"]:
                tokens = len(clip_tokenizer(output["text"])["input_ids"])
                assert output["encoder_tokens"] == tokens <= budget, output
                counted += 1
    assert counted == 64
    message = error(server, 400, prompt="a cat", keep=["a very long protected phrase " * 3], max_prompt_tokens=5)
    assert message["param"] == "max_prompt_tokens"


def test_the_negative_prompt_is_returned_as_is_and_changes_the_render(server):
    negative = "blurry, lowres, <weird> text"
    body = ok(server, prompt="a cat on a sofa", seed=3, negative_prompt=negative)
    assert body["negative_prompt"] == negative
    assert all(negative not in o["text"] for o in body["outputs"])
    plain = httpx.post(server.url + "/v1/render", json={"prompt": "a cat", "seed": 3, "beautify": False}, timeout=120)
    with_negative = httpx.post(server.url + "/v1/render", json={"prompt": "a cat", "seed": 3, "beautify": False,
                                                                 "negative_prompt": negative}, timeout=120)
    assert plain.status_code == with_negative.status_code == 200
    assert plain.content != with_negative.content
    assert "X-Negative-Prompt" in with_negative.headers


@pytest.mark.parametrize("rank", ["reward_model", "online"])
def test_best_of_n_returns_the_top_outputs_with_their_scores(server, rank):
    everything = ok(server, prompt="a castle on a hill", n=6, seed=11, temperature=1.0, rank=rank)
    rewards = [o["scores"]["reward"] for o in everything["outputs"]]
    assert rewards == sorted(rewards, reverse=True) and len(set(rewards)) > 1
    assert (everything["outputs"][0]["scores"]["relevance"] is not None) == (rank == "online")
    best = ok(server, prompt="a castle on a hill", n=6, seed=11, temperature=1.0, rank=rank, best_of=2)
    assert [o["text"] for o in best["outputs"]] == [o["text"] for o in everything["outputs"][:2]]
    assert [o["id"] for o in best["outputs"]] == [o["id"] for o in everything["outputs"][:2]]


def test_detail_sets_how_many_words_are_added(server):
    def added_words(detail: str | None) -> list[int]:
        words = []
        for i, prompt in enumerate(PROMPTS):
            body = ok(server, prompt=prompt, n=8, seed=40 + i, temperature=1.0, max_new_tokens=48, detail=detail,
                      avoid=[])
            words += [len(o["text"].split()) - len(prompt.split()) for o in body["outputs"]]
        return words

    low, default, high = added_words("low"), added_words(None), added_words("high")
    assert max(low) <= 6
    assert sum(low) / len(low) < sum(default) / len(default) < sum(high) / len(high)


def test_style_leans_the_rewrites_to_its_vocabulary(server):
    family = [p.lower() for p in load_vocab().style_families["painting"]]

    def share(style: str | None) -> float:
        hits = total = 0
        for i, prompt in enumerate(PROMPTS):
            body = ok(server, prompt=prompt, n=8, seed=70 + i, temperature=1.0, style=style)
            for output in body["outputs"]:
                hits += any(phrase in output["text"].lower() for phrase in family)
                total += 1
        return hits / total

    assert share("painting") > share(None) + 0.25


def test_avoided_words_are_never_added_and_the_users_own_words_stay(server):
    overused = [p.lower() for p in load_vocab().overused_terms]
    for i, prompt in enumerate(PROMPTS):
        for output in ok(server, prompt=prompt, n=8, seed=90 + i, temperature=1.2)["outputs"]:
            text = output["text"].lower()
            assert not [p for p in overused if re.search(rf"(?<!\w){re.escape(p)}(?!\w)", text)], text
    mine = ok(server, prompt="a cat, trending on artstation", n=4, seed=5, keep=["trending on artstation"])
    assert all("trending on artstation" in o["text"] for o in mine["outputs"])


def test_an_edit_is_scored_against_the_output_it_was_made_of(server):
    first = ok(server, prompt="a cat on a sofa", n=2, seed=21, rank="reward_model")["outputs"][0]
    edited = first["text"] + ", golden hour, oil painting"
    body = ok(server, edit_of=first["id"], text=edited)
    assert body["original"]["id"] == first["id"] and body["original"]["text"] == first["text"]
    assert body["original"]["scores"]["reward"] == pytest.approx(first["scores"]["reward"], abs=1e-4)
    (edit,) = body["outputs"]
    assert edit["text"] == edited and edit["finish_reason"] == "edit" and edit["id"] != first["id"]
    assert edit["scores"]["reward"] != body["original"]["scores"]["reward"]
    # The edit is stored in turn: it can be edited again.
    assert ok(server, edit_of=edit["id"], text="a cat")["original"]["text"] == edited
    assert error(server, 404, edit_of="cand_" + "0" * 24, text="a cat")["param"] == "edit_of"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "a cat", "style": "watercolour"}, "style"),
    ({"prompt": "a cat", "detail": "max"}, "detail"),
    ({"prompt": "a cat", "keep": [" "]}, "keep[0]"),
    ({"prompt": "a cat", "keep": [f"span {i}" for i in range(9)]}, "keep"),
    ({"prompt": "a cat", "avoid": ["x"] * 65}, "avoid"),
    ({"prompt": "a cat <keep>unclosed"}, "prompt"),
    ({"prompt": "a cat", "n": 2, "best_of": 1}, "best_of"),
    ({"prompt": "a cat", "n": 2, "best_of": 3, "rank": "reward_model"}, "best_of"),
    ({"prompt": "a cat", "max_prompt_tokens": 2}, "max_prompt_tokens"),
    ({"prompt": "a cat", "text": "a dog"}, "text"),
    ({"edit_of": "cand_" + "0" * 24}, "text"),
    ({"n": 1}, "prompt"),
    ({"prompt": "a cat", "negative_prompt": "a\u0007b"}, "negative_prompt"),
    ({"prompt": "a black cat", "keep_colours": "yes"}, "keep_colours"),
])
def test_bad_controls_get_a_400_naming_the_field(server, body, param):
    assert error(server, 400, **body)["param"] == param


def test_chat_takes_the_controls_as_extra_fields_but_not_in_a_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "a lighthouse at night"}]
    answer = client.chat.completions.create(model="bp-ray-beautifier", messages=messages, n=4, seed=3,
                                            extra_body={"keep": ["<lora:sea:0.5>"], "max_prompt_tokens": 30})
    assert all("<lora:sea:0.5>" in choice.message.content for choice in answer.choices)
    with pytest.raises(openai.BadRequestError, match="keep"):
        client.chat.completions.create(model="bp-ray-beautifier", messages=messages, stream=True,
                                       extra_body={"keep": ["x"]})
    # keep_colours is kept while tokens are chosen, so a stream may ask for it
    stream = client.chat.completions.create(model="bp-ray-beautifier", stream=True, max_tokens=8, seed=3,
                                            messages=[{"role": "user", "content": "a black cat"}],
                                            extra_body={"keep_colours": True})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_the_client_passes_the_controls_and_prints_the_ranked_outputs(server):
    result = subprocess.run([sys.executable, "-m", "bp_ray.cli", "client", "a cat on a sofa", "--url", server.url,
                             "-n", "4", "--rank", "reward_model", "--best-of", "2", "--keep", "<lora:cat:1>",
                             "--style", "anime", "--detail", "high", "--seed", "9", "--keep-colours"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("<lora:cat:1>" in line for line in lines)
    assert result.stderr.count("reward ") == 2 and "id cand_" in result.stderr


def test_render_true_returns_each_output_and_an_edit_rendered(server):
    import base64
    import io

    from PIL import Image

    body = ok(server, prompt="a cat on a sofa", n=2, seed=4, render=True, negative_prompt="blurry")
    images = [Image.open(io.BytesIO(base64.b64decode(o["image_png_base64"]))) for o in body["outputs"]]
    assert [image.size for image in images] == [(32, 32)] * 2
    edit = ok(server, edit_of=body["outputs"][0]["id"], text="a cat on a sofa, oil painting", render=True)
    assert edit["outputs"][0]["image_png_base64"] and edit["original"]["image_png_base64"]
    assert edit["outputs"][0]["image_png_base64"] != edit["original"]["image_png_base64"]
