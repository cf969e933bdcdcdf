"""The bodies of `bp-ray eval human` (serve the pairwise study) and `bp-ray eval human-results` (tabulate its votes
into the console, a CSV and report.html); `bp_ray.cli` only parses the arguments."""

from __future__ import annotations

import logging
from pathlib import Path

from bp_ray.eval import human_results
from bp_ray.eval.human_pairs import default_systems
from bp_ray.eval.human_votes import read_votes, votes_path

logger = logging.getLogger(__name__)


def eval_folder(path: Path) -> Path:
    """A run folder's eval/ folder, or path itself when it is an evaluation folder."""
    path = Path(path)
    for folder in (path / "eval", path):
        if (folder / "rewrites.jsonl").is_file() and (folder / "results.json").is_file():
            return folder
    raise FileNotFoundError(f"neither {path / 'eval'} nor {path} is an evaluation folder (rewrites.jsonl + "
                            "results.json); run `bp-ray eval` first")


def parse_systems(text: str | None, eval_dir: Path) -> list[str]:
    """"original,ppo" -> ["original", "ppo"]; None or empty -> default_systems(eval_dir)."""
    systems = [name.strip() for name in (text or "").split(",") if name.strip()]
    return systems or default_systems(eval_dir)


def serve_study(run: Path, systems: str | None, host: str, port: int) -> int:
    """Serve the study in the foreground until Ctrl-C / SIGTERM; votes go to <eval>/human/votes.sqlite."""
    import uvicorn

    from bp_ray.eval.human_app import create_app

    eval_dir = eval_folder(run)
    chosen = parse_systems(systems, eval_dir)
    try:
        app = create_app(eval_dir, chosen)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"bp-ray eval human: {err}") from err
    pairs = len(app.state.store.items)
    print(f"bp-ray eval human: {pairs} pairs ({', '.join(chosen)}) from {eval_dir}; votes in "
          f"{votes_path(eval_dir)}\nopen http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


def report_results(run: Path, csv: Path | None) -> int:
    """Print the study's results, write its votes as CSV when asked, and put the results into report.html."""
    eval_dir = eval_folder(run)
    votes = read_votes(votes_path(eval_dir))
    summary = human_results.summarize(votes)
    print(human_results.format_results(summary))
    if csv is not None:
        human_results.write_votes_csv(votes, csv)
        print(f"{len(votes)} votes -> {csv}")
    if human_results.update_report(eval_dir, summary):
        print(f"results added to {eval_dir / 'report.html'}")
    return 0
