"""The SQLite candidate store: stable ids, round trips, score merging, bad ids, pruning, several processes."""

from __future__ import annotations

import itertools
import multiprocessing
import sqlite3
import threading
import time

import pytest

from bp_ray.serve.candidates import Candidate, CandidateStore, candidate_id, is_candidate_id

MODEL = "bp-ray/policy@step-120"


def rows_in(path) -> list[tuple]:
    """The table as a person inspecting the file sees it."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT id, text FROM candidates ORDER BY rowid").fetchall()
    conn.close()
    return rows


def fake_clock(start: float = 1_700_000_000.0):
    """Strictly increasing unix times, one second apart, so the age order never depends on timer resolution."""
    ticks = itertools.count()
    return lambda: start + next(ticks)


def test_ids_are_stable_and_each_field_changes_them():
    cid = candidate_id(MODEL, "a cat", "a cat, golden hour")
    assert cid == candidate_id(MODEL, "a cat", "a cat, golden hour")
    assert is_candidate_id(cid) and len(cid) == len("cand_") + 24
    others = {candidate_id("other-model", "a cat", "a cat, golden hour"),
              candidate_id(MODEL, "a dog", "a cat, golden hour"),
              candidate_id(MODEL, "a cat", "a cat, blue hour")}
    assert len(others) == 3 and cid not in others


@pytest.mark.parametrize(("left", "right"), [
    (("m", "a,b", "c"), ("m", "a", "b,c")),
    (("m", 'a", "b', "c"), ("m", "a", 'b", "c')),  # a quote-comma inside a text cannot fake a field boundary
    (("m", "ab", ""), ("m", "a", "b")),
    (("m", "a\ud800", "b"), ("m", "a", "\ud800b")),  # lone surrogates hash too, they never raise
])
def test_the_id_encoding_is_unambiguous(left, right):
    assert candidate_id(*left) != candidate_id(*right)


def test_add_then_get_round_trips_every_field(tmp_path):
    scores = {"reward": 1 / 3, "pickscore": 21.123456789012345, "aesthetic": -0.0, "tiny": 1e-300}
    with CandidateStore(tmp_path / "c.sqlite", clock=fake_clock()) as store:
        added = store.add(MODEL, "a cat ✨", "a cat ✨, soft light\nline two", scores)
        got = store.get(added.id)
    assert got == added == Candidate(id=candidate_id(MODEL, "a cat ✨", "a cat ✨, soft light\nline two"),
                                     prompt="a cat ✨", text="a cat ✨, soft light\nline two", model=MODEL,
                                     scores=scores, edit_of=None, created=1_700_000_000.0)
    # exact float equality: JSON keeps the shortest repr that reads back to the same double
    assert all(type(v) is float for v in got.scores.values())
    assert str(got.scores["aesthetic"]) == "-0.0"


def test_add_many_stores_one_response_in_order_and_unscored_candidates_have_no_scores(tmp_path):
    with CandidateStore(tmp_path / "c.sqlite") as store:
        added = store.add_many(MODEL, "a cat", [("b", {"reward": 2.0}), ("a", {}), ("c", {"reward": 1.0})])
        assert [c.text for c in added] == ["b", "a", "c"]
        assert [store.get(c.id) for c in added] == added
        assert added[1].scores == {}
        assert store.add_many(MODEL, "a cat", []) == []
    assert [text for _, text in rows_in(tmp_path / "c.sqlite")] == ["b", "a", "c"]


def test_re_adding_merges_scores_keeps_one_row_and_refreshes_created(tmp_path):
    path = tmp_path / "c.sqlite"
    with CandidateStore(path, clock=fake_clock()) as store:
        first = store.add(MODEL, "a cat", "a cat, film grain", {"reward": 1.0, "pickscore": 20.0})
        unscored = store.add(MODEL, "a cat", "a cat, film grain")  # empty scores keep the old ones
        rescored = store.add(MODEL, "a cat", "a cat, film grain", {"pickscore": 21.5, "relevance": 0.3})
        assert first.id == unscored.id == rescored.id
        assert unscored.scores == {"reward": 1.0, "pickscore": 20.0}
        # new keys win, old keys the new scores lack stay
        assert rescored.scores == {"reward": 1.0, "pickscore": 21.5, "relevance": 0.3}
        assert (first.created, unscored.created, rescored.created) == (1_700_000_000.0, 1_700_000_001.0,
                                                                       1_700_000_002.0)
        assert store.get(first.id) == rescored
        # the same text twice in one response: one row, both entries in the final merged state
        twice = store.add_many(MODEL, "a dog", [("a dog", {"reward": 1.0}), ("a dog", {"aesthetic": 5.0})])
        assert twice[0] == twice[1] and twice[0].scores == {"reward": 1.0, "aesthetic": 5.0}
    assert len(rows_in(path)) == 2


@pytest.mark.parametrize("bad", [
    "", "cand_", "cand_" + "0" * 24, "cand_" + "A" * 24, "cand_" + "0" * 23, "cand_" + "0" * 25,
    "' OR 1=1 --", "cand_000000000000'; DROP TABLE candidates; --", pytest.param("x" * 1_000_000, id="1M chars"),
    "cand_\ud800", "\x00",
    None, 42, b"cand_000000000000000000000000", ["cand_"],
])
def test_unknown_and_malformed_ids_give_none(tmp_path, bad):
    with CandidateStore(tmp_path / "c.sqlite") as store:
        real = store.add(MODEL, "a cat", "a cat, bokeh")
        assert store.get(bad) is None
        assert store.get(real.id + "\n") is None  # fullmatch: no trailing newline slips through
        assert store.get(real.id) == real  # the table survived whatever was asked


def test_edit_of_is_stored_and_the_first_one_kept(tmp_path):
    with CandidateStore(tmp_path / "c.sqlite") as store:
        original = store.add(MODEL, "a cat", "a cat, cinematic", {"reward": 0.5})
        edit = store.add(MODEL, "a cat", "a cat, cinematic, my words", {"reward": 0.7}, edit_of=original.id)
        assert store.get(edit.id).edit_of == original.id
        assert store.get(original.id).edit_of is None
        # the same edited text as an edit of another candidate is the same id: its first edit_of stays
        again = store.add(MODEL, "a cat", "a cat, cinematic, my words", edit_of=candidate_id(MODEL, "a cat", "x"))
        assert again.edit_of == original.id
        # an "edit" that changes nothing is the original again, not an edit of itself
        unchanged = store.add(MODEL, "a cat", "a cat, cinematic", {"reward": 0.6}, edit_of=original.id)
        assert unchanged.id == original.id and unchanged.edit_of is None and unchanged.scores == {"reward": 0.6}


def test_non_finite_scores_are_refused_and_store_nothing(tmp_path):
    with CandidateStore(tmp_path / "c.sqlite") as store:
        with pytest.raises(ValueError, match="'reward' is nan"):
            store.add_many(MODEL, "a cat", [("ok", {"reward": 1.0}), ("bad", {"reward": float("nan")})])
        assert store.get(candidate_id(MODEL, "a cat", "ok")) is None  # validated before the transaction


def test_pruning_keeps_the_newest_max_rows(tmp_path):
    path = tmp_path / "c.sqlite"
    with CandidateStore(path, max_rows=3, clock=fake_clock()) as store:
        assert store.prune_every == 1  # small stores prune on every new row
        ids = [store.add(MODEL, "p", f"t{i}").id for i in range(5)]
        assert [store.get(i) is not None for i in ids] == [False, False, True, True, True]
        store.add(MODEL, "p", "t2", {"reward": 1.0})  # re-adding refreshes t2: it is now the newest
        store.add(MODEL, "p", "t5")
        assert sorted(text for _, text in rows_in(path)) == ["t2", "t4", "t5"]
    # ties in created (one response, one clock reading) fall back to insertion order
    with CandidateStore(tmp_path / "ties.sqlite", max_rows=2) as store:
        store.add_many(MODEL, "p", [(f"t{i}", {}) for i in range(4)])
    assert [text for _, text in rows_in(tmp_path / "ties.sqlite")] == ["t2", "t3"]


def test_large_stores_prune_every_so_often_and_a_reopened_store_trims_at_once(tmp_path):
    path = tmp_path / "c.sqlite"
    with CandidateStore(path, max_rows=160, clock=fake_clock()) as store:
        assert store.prune_every == 10  # 160 // 16
        store.add_many(MODEL, "p", [(f"a{i}", {}) for i in range(150)])  # first write after opening: due, 150 kept
        for i in range(9):
            store.add(MODEL, "p", f"b{i}")  # 159 rows; 9 new since the prune
        assert len(rows_in(path)) == 159
        store.add_many(MODEL, "p", [(f"c{i}", {}) for i in range(5)])  # 14 >= 10 new: pruned back to 160
        assert len(rows_in(path)) == 160
        assert store.get(candidate_id(MODEL, "p", "a3")) is None and store.get(candidate_id(MODEL, "p", "a4"))
    with CandidateStore(path, max_rows=20) as smaller:
        smaller.add(MODEL, "p", "d")
    assert len(rows_in(path)) == 20


def test_reopening_a_file_keeps_the_data_and_the_file_is_wal(tmp_path):
    path = tmp_path / "nested" / "dir" / "c.sqlite"  # parent folders are created
    with CandidateStore(path) as store:
        added = store.add(MODEL, "a cat", "a cat, volumetric light", {"reward": 0.25})
    with CandidateStore(path) as reopened:
        assert reopened.get(added.id) == added
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_a_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "c.sqlite"
    CandidateStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 7, newer than the 1 this bp-ray reads"):
        CandidateStore(path)


def test_threads_share_one_store(tmp_path):
    mismatches = []
    with CandidateStore(tmp_path / "c.sqlite") as store:
        def work(t: int) -> None:
            for i in range(50):
                added = store.add(MODEL, f"thread {t}", f"text {i}", {"reward": float(i)})
                if store.get(added.id) != added:
                    mismatches.append(added)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert mismatches == []
    assert len(rows_in(tmp_path / "c.sqlite")) == 200


PER_PROCESS = 200


def write_candidates(path: str, worker: int, barrier) -> None:
    """Opens the store (creating the file, racing the other process) and adds PER_PROCESS candidates in responses
    of 1 to 4, every one scored, plus a shared candidate both processes keep re-adding."""
    barrier.wait(timeout=60)
    with CandidateStore(path) as store:
        i = 0
        while i < PER_PROCESS:
            size = min(1 + i % 4, PER_PROCESS - i)
            store.add_many(MODEL, f"worker {worker}", [(f"text {j}", {"reward": j / 7}) for j in range(i, i + size)])
            store.add(MODEL, "shared", "shared", {f"w{worker}": float(i)})
            i += size


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "c.sqlite")  # not created yet: schema creation races too
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=write_candidates, args=(path, w, barrier)) for w in range(2)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    with CandidateStore(path) as store:
        for worker in range(2):
            for j in range(PER_PROCESS):
                got = store.get(candidate_id(MODEL, f"worker {worker}", f"text {j}"))
                assert got is not None and got.scores == {"reward": j / 7}
        # both processes' last scores for the shared candidate were merged, neither overwrote the other
        assert set(store.get(candidate_id(MODEL, "shared", "shared")).scores) == {"w0", "w1"}
    assert len(rows_in(path)) == 2 * PER_PROCESS + 1
