"""The human pairwise study as a small web app (`bp-ray eval human`): a rater types a name once, then sees one user
prompt and two images of it, from two systems' rewrites with the same seed, sides drawn at random and the system
names hidden, and votes left / tie / right (buttons or the arrow keys) or skips.

Plain server-rendered HTML with a few lines of inline JS for the keys; nothing external is fetched. The page never
names a system: images are served as /image/<show_token>/<side> and the pair as an opaque hash. State lives in
`human_votes.VoteStore`; every vote is committed before the redirect that acknowledges it.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from bp_ray.eval import human_results
from bp_ray.eval.human_pairs import PairItem, load_pairs
from bp_ray.eval.human_votes import (
    AlreadyVoted,
    BadChoice,
    NotShown,
    UnknownItem,
    UnknownRater,
    VoteError,
    VoteStore,
    read_votes,
    votes_path,
)

logger = logging.getLogger(__name__)

RATER_COOKIE = "bp_rater"
CSRF_COOKIE = "bp_csrf"
MAX_FORM_BYTES = 8192
STATUS = {UnknownRater: 403, UnknownItem: 404, NotShown: 409, AlreadyVoted: 409, BadChoice: 422}
"""HTTP status of each refusal of the store."""

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
header{display:flex;justify-content:space-between;color:#555}
#prompt{font-size:1.3em;background:#f4f4f4;padding:.6em .8em;border-radius:6px}
.pair{display:flex;gap:1em}.pair figure{flex:1;margin:0;text-align:center}
.pair img{height:min(52vh,512px);width:auto;max-width:100%;object-fit:contain;border:1px solid #ccc}
.buttons{display:flex;gap:1em;justify-content:center;margin:1em 0}
button{font-size:1.1em;padding:.5em 1.2em;cursor:pointer}
#skip{font-size:.9em}.error{color:#a00}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"""

# Arrow keys press the matching button; `sent` keeps a held key or a double press from posting twice.
_KEYS_JS = """let sent = false;
for (const form of document.forms) form.addEventListener('submit', e => { if (sent) e.preventDefault(); sent = true; });
document.addEventListener('keydown', e => {
  const id = {ArrowLeft: 'vote-left', ArrowDown: 'vote-tie', ArrowRight: 'vote-right'}[e.key];
  if (!id || e.repeat || e.altKey || e.ctrlKey || e.metaKey) return;
  e.preventDefault();
  if (!sent) document.getElementById(id).click();
});"""


def page_item_id(item_id: str) -> str:
    """The pair's id as the page carries it: a hash, since the real id names the two systems."""
    return hashlib.sha256(item_id.encode()).hexdigest()[:16]


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
                        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n"
                        "</body></html>\n", status_code=status_code,
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; img-src 'self'"})


def _refusal(message: str, status_code: int) -> HTMLResponse:
    """A 4xx page naming the problem, with the way back."""
    return _page("Not recorded", f'<p class="error">{html.escape(message)}</p><p><a href="/vote">Back to voting</a>'
                 "</p>", status_code)


def _set_cookie(response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict")


async def _form(request: Request) -> dict[str, str] | None:
    """The urlencoded form's first value per field; None when the body is too large (FastAPI's own form parser
    needs python-multipart, which is not a dependency)."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        return None
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:  # a chunked body declares no length
        return None
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _hidden(**fields: str) -> str:
    return "".join(f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
                   for name, value in fields.items())


def create_app(eval_dir: Path, systems: list[str], db_path: Path | None = None) -> FastAPI:
    """The study over load_pairs(eval_dir, systems), votes in db_path (default votes_path(eval_dir))."""
    eval_dir = Path(eval_dir).resolve()
    items = load_pairs(eval_dir, systems)
    if not items:
        raise FileNotFoundError(f"no prompt under {eval_dir} has first-seed images of all of {systems}")
    by_page_id = {page_item_id(item.item_id): item.item_id for item in items}
    db_path = Path(db_path) if db_path else votes_path(eval_dir)
    store = VoteStore(db_path, items)
    logger.info("human eval: %d pairs of %s from %s, votes in %s", len(items), systems, eval_dir, db_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="bp-ray human evaluation", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store = store

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> PlainTextResponse:
        # Tracebacks and paths go to the log only.
        logger.exception("human eval: %s %s failed", request.method, request.url.path)
        return PlainTextResponse("internal error; the server log has the details", status_code=500)

    def current_rater(request: Request) -> Any:
        rater_id = request.cookies.get(RATER_COOKIE)
        return store.rater(rater_id) if rater_id else None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "pairs": len(items)}

    @app.get("/")
    def index(request: Request) -> Response:
        if current_rater(request):
            return RedirectResponse("/vote", status_code=303)
        csrf = secrets.token_hex(16)
        response = _page("Image comparison", (
            "<h1>Image comparison</h1><p>You will see a prompt and two images made from it. Pick the image that "
            "fits the prompt better (or call it a tie). Your name is stored with your votes.</p>"
            f'<form method="post" action="/raters">{_hidden(csrf=csrf)}'
            '<label>Your name <input id="name" name="name" required maxlength="80" autofocus></label> '
            '<button id="start" type="submit">Start</button></form>'))
        # Double-submit cookie: a cross-site form cannot read this cookie to copy it into its field.
        _set_cookie(response, CSRF_COOKIE, csrf)
        return response

    @app.post("/raters")
    async def add_rater(request: Request) -> Response:
        form = await _form(request)
        if form is None:
            return _refusal("form too large", 413)
        cookie, field = request.cookies.get(CSRF_COOKIE, ""), form.get("csrf", "")
        if not cookie or not secrets.compare_digest(cookie, field):
            return _refusal("csrf: missing or wrong token; reload the start page", 403)
        try:
            rater_id, _ = await run_in_threadpool(store.add_rater, form.get("name", ""))
        except ValueError as err:
            return _refusal(str(err), 422)
        response = RedirectResponse("/vote", status_code=303)
        _set_cookie(response, RATER_COOKIE, rater_id, max_age=365 * 24 * 3600)
        response.delete_cookie(CSRF_COOKIE, path="/")
        return response

    @app.get("/vote")
    def vote_page(request: Request) -> Response:
        rater = current_rater(request)
        if rater is None:
            return RedirectResponse("/", status_code=303)
        assignment = store.next_item(rater.rater_id)
        done, total = store.progress(rater.rater_id)
        if assignment is None:
            return _page("Done", f'<h1>Done, thank you!</h1><p id="progress">{done} / {total}</p>'
                         '<p>You have seen every pair. <a href="/results">Results so far</a></p>')
        item, token = assignment.item, assignment.show_token
        fields = _hidden(item_id=page_item_id(item.item_id), show_token=token, csrf=rater.csrf)
        return _page("Which image fits the prompt better?", f"""<header><span>Rater: {html.escape(rater.name)}</span>
<span>Pair <span id="progress">{done + 1} / {total}</span></span></header>
<h1>Which image fits this prompt better?</h1>
<p id="prompt">{html.escape(item.prompt)}</p>
<div class="pair"><figure><img id="left" src="/image/{token}/left" alt="left image"><figcaption>Left (&larr;)
</figcaption></figure><figure><img id="right" src="/image/{token}/right" alt="right image"><figcaption>Right
(&rarr;)</figcaption></figure></div>
<form method="post" action="/vote">{fields}<div class="buttons">
<button id="vote-left" type="submit" name="choice" value="left">&larr; Left</button>
<button id="vote-tie" type="submit" name="choice" value="tie">&darr; Tie</button>
<button id="vote-right" type="submit" name="choice" value="right">Right &rarr;</button></div></form>
<form method="post" action="/skip">{fields}<div class="buttons"><button id="skip" type="submit">Skip this pair</button>
</div></form>
<script>{_KEYS_JS}</script>""")

    async def answer(request: Request, act: Callable[[str, str, str, dict[str, str]], object]) -> Response:
        """The checks /vote and /skip share, then act(rater_id, item_id, show_token, form) in the thread pool."""
        form = await _form(request)
        if form is None:
            return _refusal("form too large", 413)
        rater = await run_in_threadpool(current_rater, request)
        if rater is None:
            return _refusal("rater: no valid rater cookie; open / and enter your name", 403)
        if not form.get("csrf") or not secrets.compare_digest(form["csrf"], rater.csrf):
            return _refusal("csrf: missing or wrong token; reload the page", 403)
        for name in ("item_id", "show_token"):
            if not form.get(name):
                return _refusal(f"{name}: missing", 422)
        # An id that is not a page hash goes through as it is: the store answers UnknownItem.
        item_id = by_page_id.get(form["item_id"], form["item_id"])
        try:
            await run_in_threadpool(act, rater.rater_id, item_id, form["show_token"], form)
        except VoteError as err:
            logger.info("human eval: refused %s by %s: %s", request.url.path, rater.rater_id[:6], err)
            return _refusal(str(err), STATUS.get(type(err), 400))
        return RedirectResponse("/vote", status_code=303)

    @app.post("/vote")
    async def vote(request: Request) -> Response:
        def record(rater_id: str, item_id: str, show_token: str, form: dict[str, str]) -> None:
            vote_id = store.record_vote(rater_id, item_id, show_token, form.get("choice", ""))
            logger.info("human eval: vote %d by %s on %s: %s", vote_id, rater_id[:6], item_id, form.get("choice"))

        return await answer(request, record)

    @app.post("/skip")
    async def skip(request: Request) -> Response:
        return await answer(request, lambda rater_id, item_id, show_token, _: store.skip(rater_id, item_id,
                                                                                           show_token))

    @app.get("/image/{show_token}/{side}")
    def image(show_token: str, side: str, request: Request) -> Response:
        not_found = PlainTextResponse("no such image", status_code=404)
        rater = current_rater(request)
        shown = store.shown_by_token(show_token) if rater and side in ("left", "right") else None
        if shown is None or shown[0] != rater.rater_id:
            return not_found
        item: PairItem = store.items[shown[1]]
        system = shown[2] if side == "left" else shown[3]
        path = (eval_dir / (item.image_a if system == item.system_a else item.image_b)).resolve()
        if not path.is_relative_to(eval_dir) or not path.is_file():
            return not_found
        return Response(path.read_bytes(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/results")
    def results() -> Response:
        summary = human_results.summarize(read_votes(db_path))
        return _page("Human preference", f'{human_results.results_html(summary)}\n'
                     '<p><a href="/votes.csv">All votes (CSV)</a> &middot; <a href="/vote">Back to voting</a></p>')

    @app.get("/votes.csv")
    def votes_csv() -> Response:
        buffer = io.StringIO()
        human_results.write_votes_csv(read_votes(db_path), buffer)
        return Response(buffer.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="votes.csv"'})

    return app
