"""The human study's pairs and vote store: item ids and setup errors, balanced assignment, reloads, refusals,
skips, timing, the votes table, and several threads voting at once. No web server, no browser."""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bp_ray.eval.human_pairs import default_systems, load_pairs
from bp_ray.eval.human_votes import (
    VOTE_COLUMNS,
    AlreadyVoted,
    BadChoice,
    NotShown,
    UnknownItem,
    UnknownRater,
    VoteStore,
    read_votes,
    votes_path,
)

SYSTEMS = ["original", "sft", "ppo"]
SEEDS = [7, 8]


def write_eval_folder(root: Path, systems=SYSTEMS, num_prompts: int = 4, image_prompts: int | None = None,
                      seeds=SEEDS) -> Path:
    """A minimal `bp-ray eval` output: rewrites.jsonl, results.json and a distinct 16x16 PNG per (system, prompt,
    seed) for the first image_prompts prompts (default all)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "rewrites.jsonl").open("w") as f:
        for p in range(num_prompts):
            f.write(json.dumps({"prompt_id": p, "prompt": f"a red fox number {p}",
                                **{s: f"a red fox number {p}, {s} style" for s in systems}}) + "\n")
    (root / "results.json").write_text(json.dumps({"systems": list(systems), "seeds": list(seeds)}))
    for s, system in enumerate(systems):
        for p in range(num_prompts if image_prompts is None else image_prompts):
            for seed in seeds:
                path = root / "images" / system / f"p{p:04d}_s{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (40 * s, 20 * p % 256, seed % 256)).save(path)
    return root


def fake_clock(start: float = 1_700_000_000.0, step_s: float = 1.5):
    ticks = itertools.count()
    return lambda: start + step_s * next(ticks)


@pytest.fixture
def eval_dir(tmp_path):
    return write_eval_folder(tmp_path / "eval")


@pytest.fixture
def items(eval_dir):
    return load_pairs(eval_dir, SYSTEMS)


@pytest.fixture
def store(tmp_path, items):
    with VoteStore(tmp_path / "votes.sqlite", items, clock=fake_clock()) as s:
        yield s


# --- pairs ----------------------------------------------------------------------------------------------------

def test_pairs_are_prompt_major_combinations_with_the_first_seed(eval_dir, items):
    # 4 prompts x C(3, 2) pairs; system_a is the earlier system of SYSTEMS
    assert len(items) == 12
    assert [i.item_id for i in items[:3]] == ["p0000:original~sft", "p0000:original~ppo", "p0000:sft~ppo"]
    item = items[4]
    assert (item.prompt_id, item.system_a, item.system_b, item.seed) == (1, "original", "ppo", 7)
    assert item.prompt == "a red fox number 1" and item.text_b == "a red fox number 1, ppo style"
    assert item.image_a == "images/original/p0001_s7.png" and (eval_dir / item.image_b).is_file()


def test_prompts_without_every_image_are_left_out(tmp_path):
    folder = write_eval_folder(tmp_path / "eval", num_prompts=5, image_prompts=2)
    (folder / "images" / "ppo" / "p0001_s7.png").unlink()
    items = load_pairs(folder, ["original", "ppo"])
    assert [i.item_id for i in items] == ["p0000:original~ppo"]
    # prompt 1 still pairs original with sft
    assert [i.prompt_id for i in load_pairs(folder, ["original", "sft"])] == [0, 1]


def test_pair_setup_errors_say_what_is_wrong(tmp_path, eval_dir):
    with pytest.raises(FileNotFoundError, match="not an evaluation folder"):
        load_pairs(tmp_path / "nowhere", SYSTEMS)
    with pytest.raises(ValueError, match="llm"):
        load_pairs(eval_dir, ["original", "llm"])
    with pytest.raises(ValueError, match="at least two"):
        load_pairs(eval_dir, ["original"])
    with pytest.raises(ValueError, match="at least two"):
        load_pairs(eval_dir, ["ppo", "ppo"])
    no_images = write_eval_folder(tmp_path / "bare", image_prompts=0)
    with pytest.raises(FileNotFoundError, match=r"eval\.human_prompts=N"):
        load_pairs(no_images, ["original", "ppo"])


def test_default_systems_pick_the_most_trained_one(tmp_path):
    assert default_systems(write_eval_folder(tmp_path / "a")) == ["original", "ppo"]
    assert default_systems(write_eval_folder(tmp_path / "b", systems=["original", "tags", "sft"])) == ["original",
                                                                                                       "sft"]
    assert default_systems(write_eval_folder(tmp_path / "c", systems=["tags", "llm", "original"])) == ["tags", "llm"]


# --- assignment -----------------------------------------------------------------------------------------------

def test_every_pair_gets_a_vote_before_any_gets_two(store, items):
    raters = [store.add_rater(name)[0] for name in ("ann", "bob", "cy")]
    votes: Counter[str] = Counter()
    for _ in range(len(items)):  # round-robin: 36 votes, 3 per pair in the end
        for rater in raters:
            item, _, _, token = store.next_item(rater)
            store.record_vote(rater, item.item_id, token, "left")
            votes[item.item_id] += 1
            if max(votes.values()) > 1:
                assert len(votes) == len(items), "a pair got a second vote while another had none"
    assert all(store.next_item(r) is None for r in raters)
    assert set(votes.values()) == {3}
    assert store.progress(raters[0]) == (len(items), len(items))


def test_raters_start_on_different_pairs_and_sides_are_random(store, items):
    firsts = [store.next_item(store.add_rater(f"r{i}")[0]) for i in range(4)]
    # each open assignment counts against its pair, so four raters at once get four different pairs
    assert len({a.item.item_id for a in firsts}) == 4
    rater = store.add_rater("sides")[0]
    orders = set()
    while (assignment := store.next_item(rater)) is not None:
        item = assignment.item
        assert {assignment.left_system, assignment.right_system} == {item.system_a, item.system_b}
        orders.add(assignment.left_system == item.system_a)
        store.skip(rater, item.item_id, assignment.show_token)
    assert orders == {True, False}  # 12 fair coin flips all alike: p = 2 / 4096


def test_a_reload_gets_the_same_pair_sides_and_token(store):
    rater = store.add_rater("ann")[0]
    first = store.next_item(rater)
    assert store.next_item(rater) == first
    reopened = VoteStore(store.path, list(store.items.values()))  # a restarted server, same file
    assert reopened.next_item(rater) == first
    reopened.close()


def test_a_new_store_reads_the_same_file(store, items):
    rater, csrf = store.add_rater("  Ann   Lee ")
    assert store.rater(rater).name == "Ann Lee" and store.rater(rater).csrf == csrf
    assert store.rater("nobody") is None
    with pytest.raises(ValueError, match="name"):
        store.add_rater("   ")
    # votes are few and precious: every commit is fsynced (2 = FULL)
    assert store._db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2


# --- votes ----------------------------------------------------------------------------------------------------

def test_refusals_have_their_own_types(store, items):
    rater = store.add_rater("ann")[0]
    item, _, _, token = store.next_item(rater)
    other = next(i for i in items if i.item_id != item.item_id)
    with pytest.raises(BadChoice, match="choice"):
        store.record_vote(rater, item.item_id, token, "both")
    with pytest.raises(UnknownItem, match="item_id"):
        store.record_vote(rater, "p9999:original~ppo", token, "left")
    with pytest.raises(NotShown, match="not shown to you"):
        store.record_vote(rater, other.item_id, token, "left")  # never shown to this rater
    with pytest.raises(NotShown):
        store.record_vote(rater, item.item_id, "0" * 32, "left")  # wrong token
    with pytest.raises(UnknownRater):
        store.record_vote("nobody", item.item_id, token, "left")
    intruder = store.add_rater("eve")[0]
    with pytest.raises(NotShown):
        store.record_vote(intruder, item.item_id, token, "left")  # someone else's token
    store.record_vote(rater, item.item_id, token, "tie")
    with pytest.raises(AlreadyVoted, match="already recorded"):
        store.record_vote(rater, item.item_id, token, "right")  # a replayed form
    with pytest.raises(AlreadyVoted):
        store.skip(rater, item.item_id, token)
    assert read_votes(store.path)["choice"].tolist() == ["tie"]


def test_a_skip_is_no_vote_and_the_pair_never_comes_back(store, items):
    rater = store.add_rater("ann")[0]
    skipped = store.next_item(rater)
    store.skip(rater, skipped.item.item_id, skipped.show_token)
    store.skip(rater, skipped.item.item_id, skipped.show_token)  # a double click: no-op
    with pytest.raises(NotShown, match="skipped"):
        store.record_vote(rater, skipped.item.item_id, skipped.show_token, "left")
    served = []
    while (assignment := store.next_item(rater)) is not None:
        served.append(assignment.item.item_id)
        store.record_vote(rater, assignment.item.item_id, assignment.show_token, "right")
    assert skipped.item.item_id not in served and len(served) == len(items) - 1
    assert store.progress(rater) == (len(items), len(items))
    assert len(read_votes(store.path)) == len(items) - 1


def test_vote_rows_carry_the_pair_the_sides_and_the_time_taken(store):
    rater = store.add_rater("ann")[0]
    assignment = store.next_item(rater)
    shown_at = store._db.conn.execute("SELECT shown_at FROM shown").fetchone()[0]
    vote_id = store.record_vote(rater, assignment.item.item_id, assignment.show_token, "left", now=shown_at + 2.345)
    row = read_votes(store.path).iloc[0]
    assert row["vote_id"] == vote_id and row["elapsed_ms"] == 2345
    assert (row["left_system"], row["right_system"]) == (assignment.left_system, assignment.right_system)
    assert (row["system_a"], row["system_b"]) == (assignment.item.system_a, assignment.item.system_b)
    assert row["prompt_id"] == assignment.item.prompt_id and row["prompt"] == assignment.item.prompt
    assert row["rater"] == f"ann#{rater[:6]}" and row["rater_id"] == rater
    assert row["created_at"].endswith("Z") and row["created_at"].startswith("2023-11-14T22:13:")


def test_read_votes_has_fixed_columns_even_without_a_file(tmp_path, store):
    assert votes_path(tmp_path / "eval") == tmp_path / "eval" / "human" / "votes.sqlite"
    empty = read_votes(tmp_path / "missing.sqlite")
    assert list(empty.columns) == VOTE_COLUMNS and len(empty) == 0
    assert list(read_votes(store.path).columns) == VOTE_COLUMNS  # the file exists, no votes yet
    assert not (tmp_path / "missing.sqlite").exists()


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_two_threads_vote_at_once(tmp_path, items, shared):
    path = tmp_path / "votes.sqlite"
    first = VoteStore(path, items)
    raters = [first.add_rater(name)[0] for name in ("ann", "bob")]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def rate(rater: str) -> None:
        store = first if shared else VoteStore(path, items)
        try:
            barrier.wait()
            while (assignment := store.next_item(rater)) is not None:
                store.record_vote(rater, assignment.item.item_id, assignment.show_token, "tie")
        except BaseException as err:  # surfaced below: a thread's exception is otherwise lost
            errors.append(err)
        finally:
            if not shared:
                store.close()

    threads = [threading.Thread(target=rate, args=(r,)) for r in raters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    first.close()
    assert not errors, errors
    votes = read_votes(path)
    assert len(votes) == 2 * len(items) and votes["vote_id"].is_monotonic_increasing
    assert Counter(votes["item_id"]) == {item.item_id: 2 for item in items}  # each rater voted each pair once
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM shown WHERE state = 'voted'").fetchone()[0] == 2 * len(items)
    conn.close()
