"""What a check reports: one line each (what, OK / WARN / MISSING, the detail with its fix), and the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OK, WARN, MISSING = "OK", "WARN", "MISSING"
HUB_TIMEOUT_S = 3.0
"""Per request to the hub or the aesthetic head's host; the hub gets no more requests once one goes unanswered."""
NODE_TIMEOUT_S = 30.0
"""How long the per-node storage probes may take, all together."""
URI_TIMEOUT_S = 10.0
"""Listing an s3:// or gs:// storage prefix (the client's own retries would take minutes)."""


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, OK / WARN / MISSING, and the detail (with the fix when not OK)."""

    what: str
    status: str
    detail: str


def format_checks(checks: Sequence[Check], title: str = "") -> str:
    """The report: a title, one aligned line per check, and the count of each status."""
    width = max([len("what"), *(len(c.what) for c in checks)])
    lines = [title] if title else []
    lines.append(f"{'what':<{width}}  {'status':<7}  detail")
    lines += [f"{c.what:<{width}}  {c.status:<7}  {c.detail}" for c in checks]
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, MISSING)}
    verdict = "fix the MISSING lines before the job" if counts[MISSING] else "nothing missing"
    lines.append(f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[MISSING]} MISSING: {verdict}")
    return "\n".join(lines)
