"""Results of a human pairwise study: the votes table (`human_votes.read_votes`) -> per pair of systems wins, ties
and losses with the win rate, its Wilson interval and the sign test; inter-rater agreement; side bias. Then the same
summary as console text, as an HTML section of report.html, and the votes as CSV.

Every count is in system terms: a vote is a win when the rater chose system_b (the later system of the study,
e.g. ppo over original), whichever side it was shown on. Only side bias looks at sides.
"""

from __future__ import annotations

import html
import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from bp_ray.eval.human_stats import (
    CONFIDENCE,
    cohen_kappa,
    fleiss_kappa,
    side_bias,
    sign_test,
    wilson_interval,
    win_rate,
)
from bp_ray.eval.human_votes import read_votes, votes_path
from bp_ray.eval.report import REPORT

HUMAN_BEGIN = "<!-- human:begin -->"
HUMAN_END = "<!-- human:end -->"
"""report.html holds the human section between these markers, so it can be refreshed without redoing the eval."""

LABELS = ("a", "tie", "b")
"""A vote in system terms: system_a preferred, a tie, system_b preferred."""

USED_COLUMNS = ["vote_id", "rater_id", "item_id", "system_a", "system_b", "left_system", "right_system", "choice",
                "elapsed_ms"]


def system_labels(votes: pd.DataFrame) -> pd.Series:
    """Each vote's choice as "a", "tie" or "b" (which system won), whatever side that system was shown on."""
    chosen = votes["left_system"].where(votes["choice"] == "left", votes["right_system"])
    labels = np.where(votes["choice"] == "tie", "tie", np.where(chosen == votes["system_b"], "b", "a"))
    return pd.Series(labels, index=votes.index, dtype="object")


def latest_votes(votes: pd.DataFrame) -> pd.DataFrame:
    """One vote per (rater, item): the last one by vote_id, so a rater who voted twice on an item counts once."""
    return votes.sort_values("vote_id").drop_duplicates(["rater_id", "item_id"], keep="last")


def summarize(votes: pd.DataFrame) -> dict[str, Any]:
    """The summary of a study, JSON-serialisable (nan becomes None).

    Keys: totals {votes, counted, repeat_votes, raters, items, median_elapsed_ms}; pairs, one dict per (system_a,
    system_b) in the order of their first vote: {system_a, system_b, votes, wins, ties, losses, win_rate, ci (the
    CONFIDENCE Wilson interval of win_rate as [low, high]), p_sign, raters, items}; agreement {items, rater_pairs,
    pair_agreement, cohen_kappa, cohen_rater_pairs, cohen_undefined, fleiss_kappa}; side_bias {left_wins,
    right_wins, ties, share_left, p}; confidence.

    Only each rater's last vote on an item is counted (`latest_votes`); totals.repeat_votes says how many earlier
    ones were set aside. Agreement pools every item that two or more raters voted on, labels in system terms.
    """
    if votes.empty:
        votes = pd.DataFrame(columns=USED_COLUMNS)  # also a frame with no columns at all: zero votes, no error
    _require_columns(votes, USED_COLUMNS)
    _check_votes(votes)
    counted = latest_votes(votes)
    labels = system_labels(counted)
    elapsed = [float(x) for x in votes["elapsed_ms"].dropna()]
    totals = {"votes": len(votes), "counted": len(counted), "repeat_votes": len(votes) - len(counted),
              "raters": int(counted["rater_id"].nunique()), "items": int(counted["item_id"].nunique()),
              "median_elapsed_ms": statistics.median(elapsed) if elapsed else None}

    pairs = []
    for (system_a, system_b), group in counted.groupby(["system_a", "system_b"], sort=False):
        outcome = labels[group.index].value_counts()
        wins, ties, losses = (int(outcome.get(label, 0)) for label in ("b", "tie", "a"))
        n = wins + ties + losses
        pairs.append({"system_a": system_a, "system_b": system_b, "votes": n, "wins": wins, "ties": ties,
                      "losses": losses, "win_rate": win_rate(wins, ties, losses),
                      "ci": list(wilson_interval(wins + ties / 2.0, n, CONFIDENCE)),
                      "p_sign": sign_test(wins, losses), "raters": int(group["rater_id"].nunique()),
                      "items": int(group["item_id"].nunique())})

    choices = counted["choice"].value_counts()
    left_wins, right_wins = int(choices.get("left", 0)), int(choices.get("right", 0))
    share_left, p_side = side_bias(left_wins, right_wins)
    summary = {"totals": totals, "pairs": pairs, "agreement": agreement(counted, labels),
               "side_bias": {"left_wins": left_wins, "right_wins": right_wins, "ties": int(choices.get("tie", 0)),
                             "share_left": share_left, "p": p_side},
               "confidence": CONFIDENCE}
    return _json_safe(summary)


def agreement(votes: pd.DataFrame, labels: pd.Series) -> dict[str, Any]:
    """Inter-rater agreement of votes (one per rater and item) with their system labels.

    - items: items voted by 2 or more raters; only these enter the figures below.
    - pair_agreement: share of rater pairs on the same item that gave the same label, pooled over items (an item
      with n raters brings n (n - 1) / 2 pairs); rater_pairs is that number of pairs.
    - cohen_kappa: mean Cohen's kappa over pairs of raters who share 2 or more items, each on their shared items;
      cohen_rater_pairs pairs enter the mean, cohen_undefined more shared items but got nan (one label throughout).
    - fleiss_kappa: over the items with 2 or more raters, categories LABELS, n_i allowed to differ.
    Figures that cannot be computed are nan.
    """
    table = pd.DataFrame({"item_id": votes["item_id"], "rater_id": votes["rater_id"], "label": labels})
    raters_per_item = table.groupby("item_id")["rater_id"].nunique()
    shared = table[table["item_id"].isin(raters_per_item[raters_per_item >= 2].index)]

    counts = pd.crosstab(shared["item_id"], shared["label"]).reindex(columns=list(LABELS), fill_value=0)
    matrix = counts.to_numpy()
    per_item = matrix.sum(axis=1)
    rater_pairs = int((per_item * (per_item - 1) // 2).sum())
    agreeing = int((matrix * (matrix - 1) // 2).sum())

    by_rater = shared.pivot(index="item_id", columns="rater_id", values="label")
    kappas, undefined = [], 0
    for first, second in itertools.combinations(sorted(by_rater.columns), 2):
        both = by_rater[[first, second]].dropna()
        if len(both) < 2:
            continue
        kappa = cohen_kappa(both[first].tolist(), both[second].tolist())
        if math.isnan(kappa):
            undefined += 1
        else:
            kappas.append(kappa)
    return {"items": len(counts), "rater_pairs": rater_pairs,
            "pair_agreement": agreeing / rater_pairs if rater_pairs else math.nan,
            "cohen_kappa": float(np.mean(kappas)) if kappas else math.nan, "cohen_rater_pairs": len(kappas),
            "cohen_undefined": undefined, "fleiss_kappa": fleiss_kappa(matrix) if len(counts) else math.nan}


def format_results(summary: dict[str, Any]) -> str:
    """The summary as the lines a person reads in a console: one per pair of systems, then agreement and side bias."""
    totals = summary["totals"]
    if not totals["votes"]:
        return "No human votes yet."
    lines = [_totals_line(summary)]
    for pair in summary["pairs"]:
        lines.append(f"{_pair_line(pair)}, {_count(pair['votes'], 'vote')} from {_count(pair['raters'], 'rater')} "
                     f"on {_count(pair['items'], 'item')}")
    lines += [_agreement_line(summary["agreement"]), _side_line(summary["side_bias"])]
    return "\n".join(lines)


def results_html(summary: dict[str, Any]) -> str:
    """The summary as a `<section id="human">` of report.html: a table (id "human-results") with one row per pair
    of systems, then the agreement and side-bias lines. Every text is escaped."""
    note = '<p class="note">{}</p>'.format
    if not summary["totals"]["votes"]:
        return f'<section id="human">\n<h2>Human preference</h2>\n{note("No human votes yet.")}\n</section>'
    level = f"{summary['confidence']:.0%}"
    rows = []
    for pair in summary["pairs"]:
        low, high = pair["ci"]
        rows.append(
            f'<tr><td class="text">{html.escape(pair["system_b"])}</td>'
            f'<td class="text">{html.escape(pair["system_a"])}</td><td>{pair["votes"]}</td>'
            f'<td>{pair["wins"]} / {pair["ties"]} / {pair["losses"]}</td><td>{_number(pair["win_rate"], 2)}</td>'
            f"<td>[{_number(low, 2)}, {_number(high, 2)}]</td><td>{_number(pair['p_sign'], 3)}</td>"
            f"<td>{pair['raters']}</td><td>{pair['items']}</td></tr>")
    table = ('<table id="human-results"><tr><th class="text">system</th><th class="text">over</th><th>votes</th>'
             f"<th>wins / ties / losses</th><th>win rate</th><th>{level} interval</th><th>p (sign test)</th>"
             f"<th>raters</th><th>items</th></tr>{''.join(rows)}</table>")
    method = ("Raters saw the user prompt and one image of each system, sides drawn at random and names hidden. "
              f"Win rate = (wins + ties / 2) / votes, with its {level} Wilson interval; the sign test (two-sided, "
              "exact) leaves ties out. Each rater's last vote on an item counts.")
    lines = [_totals_line(summary), _agreement_line(summary["agreement"]), _side_line(summary["side_bias"])]
    return "\n".join(["<section id=\"human\">", "<h2>Human preference</h2>", note(html.escape(method)), table,
                      *(note(html.escape(line)) for line in lines), "</section>"])


def write_votes_csv(votes: pd.DataFrame, target: str | Path | TextIO) -> None:
    """Every column of the votes table, one row per vote (repeat votes included), to a path or a text buffer."""
    votes.to_csv(target, index=False, lineterminator="\n")


def human_section(eval_dir: Path) -> str:
    """The marked human section of eval_dir's report.html: the results of its votes, or nothing between the
    markers while there are none (no votes file yet included)."""
    path = votes_path(eval_dir)
    body = ""
    if path.is_file():
        votes = read_votes(path)
        if len(votes):
            body = results_html(summarize(votes))
    return f"{HUMAN_BEGIN}{body}{HUMAN_END}"


def update_report(eval_dir: Path, summary: dict[str, Any]) -> bool:
    """Put results_html(summary) into eval_dir/report.html between the human markers, replacing what is there.

    A report without the markers (written before they existed) gets the marked section before `</body>` (or at
    the end). Running it twice gives the same file. False, and nothing written, when there is no report.html.
    """
    path = Path(eval_dir) / REPORT
    if not path.is_file():
        return False
    page = path.read_text(encoding="utf-8")
    section = f"{HUMAN_BEGIN}{results_html(summary)}{HUMAN_END}"
    begin = page.find(HUMAN_BEGIN)
    end = page.find(HUMAN_END, begin) if begin >= 0 else -1
    if end >= 0:
        page = page[:begin] + section + page[end + len(HUMAN_END):]
    else:
        body_end = page.rfind("</body>")
        at = body_end if body_end >= 0 else len(page)
        page = page[:at] + section + "\n" + page[at:]
    path.write_text(page, encoding="utf-8")
    return True


def _pair_line(pair: dict[str, Any]) -> str:
    low, high = pair["ci"]
    return (f"{pair['system_b']} vs {pair['system_a']}: {pair['wins']} wins / {pair['ties']} ties / "
            f"{pair['losses']} losses, win rate {_number(pair['win_rate'], 2)} [{_number(low, 2)}, "
            f"{_number(high, 2)}], sign test p={_number(pair['p_sign'], 3)}")


def _totals_line(summary: dict[str, Any]) -> str:
    totals = summary["totals"]
    median = totals["median_elapsed_ms"]
    seconds = f", median {median / 1000:.1f} s per vote" if median is not None else ""
    repeats = (f" ({totals['repeat_votes']} earlier votes on an item the same rater voted again not counted)"
               if totals["repeat_votes"] else "")
    return (f"{_count(totals['votes'], 'vote')} from {_count(totals['raters'], 'rater')} on "
            f"{_count(totals['items'], 'item')}{seconds}{repeats}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _agreement_line(agreement: dict[str, Any]) -> str:
    if not agreement["items"]:
        return "agreement: no item has votes from 2 raters yet"
    share = agreement["pair_agreement"]
    cohen = (f"Cohen's kappa {_number(agreement['cohen_kappa'], 2)} (mean over {agreement['cohen_rater_pairs']} "
             "rater pairs sharing 2+ items)" if agreement["cohen_rater_pairs"]
             else "Cohen's kappa – (no rater pair shares 2 items with more than one label)")
    return (f"agreement: {agreement['items']} items rated by 2+ raters, {share:.0%} of {agreement['rater_pairs']} "
            f"rater pairs agree; {cohen}; Fleiss' kappa {_number(agreement['fleiss_kappa'], 2)}")


def _side_line(side: dict[str, Any]) -> str:
    decided = side["left_wins"] + side["right_wins"]
    if not decided:
        return "side bias: no decided votes (all ties)"
    return (f"side bias: the left image won {side['share_left']:.0%} of {decided} decided votes "
            f"(binomial p={_number(side['p'], 3)})")


def _number(value: float | None, digits: int) -> str:
    """A figure with `digits` decimals; a dash when it could not be computed (None after _json_safe)."""
    return "–" if value is None else f"{value:.{digits}f}"


def _json_safe(value: Any) -> Any:
    """nan -> None and numpy scalars -> Python ones, through dicts and lists, so json.dumps(allow_nan=False) works."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _require_columns(votes: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in votes.columns]
    if missing:
        raise ValueError(f"votes lack columns {missing}; has {list(votes.columns)}")


def _check_votes(votes: pd.DataFrame) -> None:
    """Reject votes the counts would misread: an unknown choice, or sides that are not the pair's two systems."""
    bad_choice = ~votes["choice"].isin(["left", "tie", "right"])
    if bad_choice.any():
        raise ValueError(f"unknown choice {votes.loc[bad_choice, 'choice'].iloc[0]!r} "
                         f"(vote_id {votes.loc[bad_choice, 'vote_id'].iloc[0]}); expected left, tie or right")
    same = ((votes["left_system"] == votes["system_a"]) & (votes["right_system"] == votes["system_b"])) | (
        (votes["left_system"] == votes["system_b"]) & (votes["right_system"] == votes["system_a"]))
    if not same.all():
        row = votes.loc[~same].iloc[0]
        raise ValueError(f"vote {row['vote_id']} showed {row['left_system']!r} / {row['right_system']!r}, not the "
                         f"pair {row['system_a']!r} / {row['system_b']!r}")
