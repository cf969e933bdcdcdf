"""Every file the docs point at exists: markdown links, and repository paths (bp_ray/..., benchmarks/..., tests/...,
cluster/..., docs/..., jobs/..., .ci/...) named anywhere in README.md, docs/*.md and cluster/README.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "cluster" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./$-])((?:bp_ray|benchmarks|tests|cluster|docs|jobs|\.ci)/[\w./*<>{}-]*)")
PLACEHOLDER = re.compile(r"[*<>{}]|XXX|\.\.\.")


def named_paths(text: str) -> set[str]:
    return {m.rstrip(".,:;") for m in REPO_PATH.findall(text) if not PLACEHOLDER.search(m)}


def test_the_readme_is_a_first_screen_not_a_manual():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_and_repository_path_a_doc_names_exists(doc: Path):
    text = doc.read_text()
    links = [t.split("#")[0] for t in LINK.findall(text) if not t.startswith(("http://", "https://", "#"))]
    missing = [t for t in links if t and not (doc.parent / t).exists()]
    missing += [p for p in named_paths(text) if not (REPO / p).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {sorted(set(missing))}"


def test_the_path_finder_sees_paths_in_prose_commands_and_links():
    text = "see `bp_ray/layout.py`, run `python benchmarks/intent_quality.py --run runs/world`, [x](docs/world.md)."
    assert named_paths(text) == {"bp_ray/layout.py", "benchmarks/intent_quality.py", "docs/world.md"}
    assert named_paths("`cluster/rayjob.*.yaml` and $OUT/tests/x") == set()
