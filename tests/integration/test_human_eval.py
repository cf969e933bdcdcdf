"""`bp-ray eval human` end to end: the real server as a subprocess, raters in headless Chromium (one browser
context each), votes checked in SQLite, a SIGKILL mid-session, and bad requests over plain HTTP. No Ray."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest

from bp_ray.eval.browser import BrowserPage, BrowserSession, find_chromium
from bp_ray.eval.human_app import page_item_id
from bp_ray.eval.human_votes import VOTE_COLUMNS, read_votes, votes_path
from tests.integration.serve_process import ServeProcess, free_port, start
from tests.unit.test_human_votes import write_eval_folder

pytestmark = pytest.mark.integration

SYSTEMS = ["original", "sft", "ppo"]  # write_eval_folder paints system i's images with red = 40 * i
PROMPTS = 10
PAIRS = PROMPTS * 3


class Study:
    """The module's server: started once, restarted in place by the kill test, so it is up for every test."""

    def __init__(self, run: Path, log_dir: Path):
        self.run, self.log_dir, self.starts = run, log_dir, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ServeProcess | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        bp_ray = Path(sys.executable).parent / "bp-ray"
        self.server = start([str(bp_ray), "eval", "human", "--run", str(self.run), "--systems", ",".join(SYSTEMS),
                             "--port", str(self.port)], self.log_dir / f"server{self.starts}.log", self.url,
                            timeout_s=60)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is flushed that was not committed."""
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait(30)

    @property
    def db(self) -> Path:
        return votes_path(self.run / "eval")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("human")
    write_eval_folder(root / "run" / "eval", systems=SYSTEMS, num_prompts=PROMPTS, seeds=[3, 4])
    study = Study(root / "run", root)
    yield study
    study.server.stop(timeout_s=15)


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with BrowserSession(chromium) as session:
        yield session


def sign_in(browser: BrowserSession, study: Study, name: str) -> BrowserPage:
    page = browser.new_page()
    page.goto(study.url + "/")
    page.type("#name", name)
    page.click("#start", navigate=True)
    assert page.evaluate("location.pathname") == "/vote"
    return page


# What the vote page shows: the form's fields, the progress, and the first pixel of each image (system i's red
# channel is 40 * i, prompt p's green is 20 * p) read back through a canvas, i.e. what the rater actually saw.
_SHOWN_JS = """(() => {
  const pixel = id => { const c = document.createElement('canvas'); c.width = c.height = 1;
    const g = c.getContext('2d'); g.drawImage(document.getElementById(id), 0, 0);
    return Array.from(g.getImageData(0, 0, 1, 1).data); };
  const field = name => document.querySelector(`input[name=${name}]`).value;
  return {item_id: field('item_id'), show_token: field('show_token'), left: pixel('left'), right: pixel('right'),
          progress: document.getElementById('progress').textContent, prompt: document.getElementById('prompt')
          .textContent, srcs: Array.from(document.images).map(i => new URL(i.src).pathname)};
})()"""


def shown(page: BrowserPage) -> dict:
    """The pair on the page, checked for leaks: no system name anywhere in the HTML or the image URLs."""
    markup = page.html()
    leaked = [name for name in SYSTEMS if name in markup]
    assert not leaked, f"the vote page names {leaked}"
    state = page.evaluate(_SHOWN_JS)
    token = state["show_token"]
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    assert state["srcs"] == [f"/image/{token}/left", f"/image/{token}/right"]
    state["left_system"], state["right_system"] = (SYSTEMS[round(state[side][0] / 40)] for side in ("left", "right"))
    state["prompt_id"] = round(state["left"][1] / 20)
    return state


def votes_of(study: Study, name: str):
    votes = read_votes(study.db)
    return votes[votes["rater"].str.startswith(name + "#")].reset_index(drop=True)


def test_a_rater_votes_by_click_and_by_each_arrow_key(study, browser):
    page = sign_in(browser, study, "Ada")
    seen = []
    for number, (how, choice) in enumerate([("click", "left"), ("ArrowLeft", "left"), ("ArrowDown", "tie"),
                                            ("ArrowRight", "right")], 1):
        state = shown(page)
        assert state["progress"] == f"{number} / {PAIRS}"
        assert state["prompt"] == f"a red fox number {state['prompt_id']}"
        seen.append(state)
        if how == "click":
            page.click(f"#vote-{choice}", navigate=True)
        else:
            page.press(how, navigate=True)
    assert not page.errors
    votes = votes_of(study, "Ada")
    assert list(votes.columns) == VOTE_COLUMNS
    assert votes["choice"].tolist() == ["left", "left", "tie", "right"]
    for (_, vote), state in zip(votes.iterrows(), seen, strict=True):
        # the sides stored are the sides the rater saw, and the pair is the one the page named
        assert (vote["left_system"], vote["right_system"]) == (state["left_system"], state["right_system"])
        assert vote["prompt_id"] == state["prompt_id"] and page_item_id(vote["item_id"]) == state["item_id"]
        assert vote["elapsed_ms"] > 0
    assert votes["item_id"].is_unique
    page.close()


def test_two_raters_at_once_get_different_pairs_and_both_votes_land(study, browser):
    bea, cem = sign_in(browser, study, "Bea"), sign_in(browser, study, "Cem")
    first_bea, first_cem = shown(bea), shown(cem)
    assert first_bea["item_id"] != first_cem["item_id"]
    for _ in range(2):  # interleaved: each rater's cookie stays in its own browser context
        bea.press("ArrowRight", navigate=True)
        cem.press("ArrowLeft", navigate=True)
    assert "Rater: Bea" in bea.html() and "Rater: Cem" in cem.html()
    assert votes_of(study, "Bea")["choice"].tolist() == ["right", "right"]
    assert votes_of(study, "Cem")["choice"].tolist() == ["left", "left"]
    assert set(votes_of(study, "Bea")["rater_id"]).isdisjoint(votes_of(study, "Cem")["rater_id"])
    bea.close()
    cem.close()


def test_a_killed_server_keeps_every_acknowledged_vote(study, browser):
    page = sign_in(browser, study, "Dov")
    acknowledged = 3
    for _ in range(acknowledged):
        page.press("ArrowDown", navigate=True)  # returns once the redirect after the vote has loaded
    waiting = shown(page)  # the next pair, assigned but not voted on
    study.kill()
    study.start()

    votes = votes_of(study, "Dov")
    assert len(votes) == acknowledged and set(votes["choice"]) == {"tie"}
    page.goto(study.url + "/vote")  # same cookie: the same rater carries on with the pair they were shown
    after = shown(page)
    assert (after["item_id"], after["show_token"]) == (waiting["item_id"], waiting["show_token"])
    assert after["progress"] == f"{acknowledged + 1} / {PAIRS}"
    assert after["item_id"] not in {page_item_id(i) for i in votes["item_id"]}
    page.click("#vote-right", navigate=True)
    assert votes_of(study, "Dov")["choice"].tolist() == ["tie"] * acknowledged + ["right"]
    page.close()


def _hidden_fields(markup: str) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', markup))


def test_bad_requests_are_refused_with_a_reason(study):
    with httpx.Client(base_url=study.url, follow_redirects=False, timeout=10) as client:
        start_page = client.get("/")
        csrf = _hidden_fields(start_page.text)["csrf"]
        assert client.post("/raters", data={"name": "Eve", "csrf": "0" * 32}).status_code == 403
        assert client.post("/raters", data={"name": "Eve", "csrf": csrf}).status_code == 303
        fields = _hidden_fields(client.get("/vote").text)
        token = fields["show_token"]

        def vote(status: int, reason: str, **changes: str | None) -> None:
            data = {**fields, "choice": "left", **changes}
            response = client.post("/vote", data={k: v for k, v in data.items() if v is not None})
            assert response.status_code == status, response.text
            assert reason in response.text
            assert "Traceback" not in response.text and "/tmp" not in response.text

        vote(403, "csrf", csrf=None)
        vote(403, "csrf", csrf="f" * 32)
        vote(404, "item_id: unknown pair", item_id="0123456789abcdef")
        never_shown = next(page_item_id(f"p{p:04d}:original~ppo") for p in range(PROMPTS)
                           if page_item_id(f"p{p:04d}:original~ppo") != fields["item_id"])
        vote(409, "not shown to you", item_id=never_shown)
        vote(409, "not shown to you", show_token="0" * 32)
        vote(422, "choice", choice="both")
        vote(303, "")
        vote(409, "already recorded")  # the same form again
        anonymous = httpx.post(study.url + "/vote", data={**fields, "choice": "left"}, timeout=10)
        assert anonymous.status_code == 403 and "rater" in anonymous.text

        image = client.get(f"/image/{token}/left")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert httpx.get(f"{study.url}/image/{token}/left", timeout=10).status_code == 404  # not this rater's
        assert client.get(f"/image/{token}/middle").status_code == 404
        assert client.get(f"/image/{'0' * 32}/left").status_code == 404

        results = client.get("/results")
        assert results.status_code == 200 and 'id="human-results"' in results.text
        csv = client.get("/votes.csv")
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        header, *rows = csv.text.splitlines()
        assert header.split(",") == VOTE_COLUMNS and len(rows) == len(read_votes(study.db)) >= 1
    with sqlite3.connect(study.db) as conn:  # one vote from Eve, however many forms she sent
        assert conn.execute("SELECT COUNT(*) FROM votes WHERE rater LIKE 'Eve#%'").fetchone()[0] == 1
    conn.close()


def test_an_unexpected_error_shows_no_traceback_or_path(tmp_path):
    from fastapi.testclient import TestClient

    from bp_ray.eval.human_app import create_app

    eval_dir = write_eval_folder(tmp_path / "eval", systems=SYSTEMS, num_prompts=2)
    app = create_app(eval_dir, SYSTEMS)

    def broken(*args):
        raise RuntimeError(f"disk trouble at {eval_dir}")

    app.state.store.next_item = broken
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as client:
        client.get("/")
        client.post("/raters", data={"name": "Fay", "csrf": client.cookies["bp_csrf"]})
        response = client.get("/vote")
    assert response.status_code == 500
    assert "Traceback" not in response.text and str(tmp_path) not in response.text and "disk" not in response.text


def test_human_results_prints_the_figures_exports_csv_and_fills_the_report(study, tmp_path):
    import subprocess

    from bp_ray.eval.human_results import HUMAN_BEGIN, HUMAN_END

    with httpx.Client(base_url=study.url, follow_redirects=False, timeout=10) as client:
        csrf = _hidden_fields(client.get("/").text)["csrf"]
        client.post("/raters", data={"name": "Gus", "csrf": csrf})
        for choice in ("right", "left", "tie"):
            fields = _hidden_fields(client.get("/vote").text)
            assert client.post("/vote", data={**fields, "choice": choice}).status_code == 303
    report = study.run / "eval" / "report.html"
    report.write_text(f"<html><body><h1>bp-ray evaluation</h1>{HUMAN_BEGIN}{HUMAN_END}</body></html>")
    csv_path = tmp_path / "votes.csv"
    bp_ray = Path(sys.executable).parent / "bp-ray"
    done = subprocess.run([str(bp_ray), "eval", "human-results", "--run", str(study.run), "--csv", str(csv_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    votes = read_votes(study.db)
    assert f"{len(votes)} votes from {votes['rater_id'].nunique()} raters" in done.stdout
    for pair in ("sft vs original", "ppo vs original", "ppo vs sft"):
        if ((votes["system_a"] + votes["system_b"]) == pair.split(" vs ")[1] + pair.split(" vs ")[0]).any():
            assert re.search(rf"{pair}: \d+ wins / \d+ ties / \d+ losses, win rate", done.stdout), done.stdout
    assert "side bias" in done.stdout and "agreement" in done.stdout
    assert csv_path.read_text().count("\n") == len(votes) + 1
    page = report.read_text()
    assert 'id="human-results"' in page[page.index(HUMAN_BEGIN):page.index(HUMAN_END)]
