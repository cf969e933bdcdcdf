"""The SQLite reward cache: hits and misses, key invalidation, atomic writes, concurrent writers, a killed writer."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bp_ray.rewards.cache import RenderKey, RewardCache, entry_key

REPO = Path(__file__).resolve().parents[2]
RENDER_KEY = RenderKey(diffusion_model="stable-diffusion-v1-5/stable-diffusion-v1-5@main", height=512, width=512,
                       num_inference_steps=20, guidance_scale=7.5, scheduler="dpm",
                       pickscore_model="yuvalkirstain/PickScore_v1@main", aesthetic_model="sac+logos+ava1-l14@main",
                       relevance_model="openai/clip-vit-large-patch14@main")


def values_for(key: str) -> tuple[float, float, float]:
    """Three full-precision floats derived from the key alone, so a torn or mixed-up row cannot go unnoticed."""
    digest = hashlib.sha256(key.encode()).digest()
    return tuple(int.from_bytes(digest[8 * i:8 * i + 8], "big") / 2**64 * 20 - 10 for i in range(3))


def crash_key(batch: int, i: int) -> str:
    return hashlib.sha256(f"crash {batch} {i}".encode()).hexdigest()


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_hit_returns_exact_values_and_unknown_keys_miss(tmp_path):
    with RewardCache(tmp_path / "cache.sqlite") as cache:
        stored = {"a": (1 / 3, -0.1, 1e-300), "b": (12345.678901234567, 0.0, -7.25)}
        cache.put_many(stored)
        hits = cache.get_many(["a", "b", "missing", "a"])
        assert hits == stored  # exact float equality: REAL is an IEEE double, nothing is rounded
        assert all(type(v) is float for scores in hits.values() for v in scores)
        assert cache.get_many([]) == {}
        # distinct keys asked: a, b hit; "missing" misses; the repeated "a" is not counted twice
        assert cache.stats() == {"hits": 2, "misses": 1, "writes": 2}
        assert len(cache) == 2


def test_a_new_object_on_the_same_file_sees_earlier_entries(tmp_path):
    path = tmp_path / "nested" / "dir" / "cache.sqlite"  # parent folders are created
    with RewardCache(path) as cache:
        cache.put_many({"k": (1.0, 2.0, 3.0)})
    with RewardCache(path) as reopened:
        assert reopened.get_many(["k"]) == {"k": (1.0, 2.0, 3.0)}
        assert reopened.stats() == {"hits": 1, "misses": 0, "writes": 0}
        assert reopened.integrity_ok()


def test_put_replaces_an_existing_entry(tmp_path):
    with RewardCache(tmp_path / "cache.sqlite") as cache:
        cache.put_many({"k": (1.0, 2.0, 3.0)})
        cache.put_many({"k": (4.0, 5.0, 6.0)})
        assert cache.get_many(["k"]) == {"k": (4.0, 5.0, 6.0)}
        assert len(cache) == 1


RENDER_KEY_CHANGES = [
    ("diffusion_model", "runwayml/stable-diffusion-v1-5@main"),
    ("diffusion_model", "stable-diffusion-v1-5/stable-diffusion-v1-5@0123abcd"),  # same model, other revision
    ("height", 768),
    ("width", 768),
    ("num_inference_steps", 50),
    ("guidance_scale", 7.0),
    ("scheduler", "ddim"),
    ("pickscore_model", "yuvalkirstain/PickScore_v1@0123abcd"),
    ("aesthetic_model", "sac+logos+ava1-l14@0123abcd"),
    ("relevance_model", "openai/clip-vit-base-patch32@main"),
]


@pytest.mark.parametrize(("field", "value"), RENDER_KEY_CHANGES)
def test_changing_any_render_setting_or_model_changes_the_key(field, value):
    changed = dataclasses.replace(RENDER_KEY, **{field: value})
    assert changed.digest() != RENDER_KEY.digest()
    assert entry_key(changed, "a cat", 0, "a cat", "a cat") != entry_key(RENDER_KEY, "a cat", 0, "a cat", "a cat")


def test_every_render_key_field_has_an_invalidation_case():
    assert {f.name for f in dataclasses.fields(RenderKey)} == {field for field, _ in RENDER_KEY_CHANGES}


def test_changing_prompt_seed_or_scoring_texts_changes_the_key():
    base = ("a cat", 7, "a cat", "a cat")
    variants = [("a dog", 7, "a cat", "a cat"), ("a cat", 8, "a cat", "a cat"),
                ("a cat", 7, "a dog", "a cat"), ("a cat", 7, "a cat", "a dog"),
                # the same characters split differently between fields must not collide
                ("a cat a", 7, "cat", "a cat"), ("a cat", 7, "a cat a", "cat")]
    keys = {entry_key(RENDER_KEY, *v) for v in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert entry_key(RENDER_KEY, *base) == entry_key(RENDER_KEY, *base)


def test_equal_numbers_of_different_types_give_the_same_key():
    assert dataclasses.replace(RENDER_KEY, guidance_scale=7).digest() == \
        dataclasses.replace(RENDER_KEY, guidance_scale=7.0).digest()


def test_keys_are_identical_in_another_process():
    args = (RENDER_KEY, "ein Schloß am Meer, 8k", 12345, "a castle", "ein Schloß")
    snippet = ("from bp_ray.rewards.cache import RenderKey, entry_key\n"
               f"print(entry_key({', '.join(repr(a) for a in args)}))")
    # A fresh interpreter has its own str hash salt, so this also proves the key never depends on hash().
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True, timeout=30,
                         cwd=REPO, env=child_env())
    assert out.stdout.strip() == entry_key(*args)


def test_key_format_is_stable():
    # Changing the format makes every existing cache miss: do it on purpose (bump KEY_VERSION), never by accident.
    # key = sha256(json [KEY_VERSION, sha256(compact json of the fields, sorted keys), prompt, seed, texts...])
    fields = json.dumps(dataclasses.asdict(RENDER_KEY), sort_keys=True, separators=(",", ":"))
    parts = [1, hashlib.sha256(fields.encode()).hexdigest(), "a cat", 0, "a cat", "a cat"]
    by_hand = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()
    assert entry_key(RENDER_KEY, "a cat", 0, "a cat", "a cat") == by_hand == \
        "979aff34628dedffed6c2d687edd3184e07b260a48894d9295e08a51fa279c78"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_rejected_and_nothing_of_that_call_is_stored(tmp_path, bad):
    with RewardCache(tmp_path / "cache.sqlite") as cache:
        with pytest.raises(ValueError, match="non-finite"):
            cache.put_many({"good": (1.0, 2.0, 3.0), "bad": (1.0, bad, 3.0), "after": (4.0, 5.0, 6.0)})
        assert len(cache) == 0
        assert cache.stats()["writes"] == 0


def test_wrong_number_of_scores_is_rejected(tmp_path):
    with RewardCache(tmp_path / "cache.sqlite") as cache:
        with pytest.raises(ValueError, match="expected 3"):
            cache.put_many({"k": (1.0, 2.0)})
        assert len(cache) == 0


def test_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "cache.sqlite"
    RewardCache(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE name = 'schema_version'")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 999"):
        RewardCache(path)


def test_get_many_of_thousands_of_keys(tmp_path):
    stored = {f"{i:064x}": values_for(str(i)) for i in range(5000)}
    with RewardCache(tmp_path / "cache.sqlite") as cache:
        cache.put_many(stored)
        unknown = [f"{i:064x}" for i in range(5000, 6000)]
        assert cache.get_many([*stored, *unknown]) == stored  # beyond any SQLite bound-variable limit
        assert cache.stats() == {"hits": 5000, "misses": 1000, "writes": 5000}


NUM_WRITERS, OWN_PER_WRITER, NUM_SHARED, BATCH = 4, 200, 50, 10


def concurrent_writer(path: str, worker: int, barrier) -> None:
    """Opens the cache (creating it, racing the others) and writes own and shared entries in small batches."""
    barrier.wait(timeout=60)
    own = [f"w{worker}-{i}" for i in range(OWN_PER_WRITER)]
    shared = [f"shared-{i}" for i in range(NUM_SHARED)]
    with RewardCache(path) as cache:
        for b in range(0, OWN_PER_WRITER, BATCH):
            cache.put_many({k: values_for(k) for k in own[b:b + BATCH]})
            if b // BATCH % 4 == worker % 4:  # each writer sends the shared batches at different moments
                for s in range(0, NUM_SHARED, BATCH):
                    cache.put_many({k: values_for(k) for k in shared[s:s + BATCH]})


def test_concurrent_writers_from_several_processes(tmp_path):
    path = str(tmp_path / "cache.sqlite")  # not created yet: schema creation races too
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(NUM_WRITERS)
    procs = [ctx.Process(target=concurrent_writer, args=(path, w, barrier)) for w in range(NUM_WRITERS)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0] * NUM_WRITERS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    expected = {f"w{w}-{i}": None for w in range(NUM_WRITERS) for i in range(OWN_PER_WRITER)}
    expected.update({f"shared-{i}": None for i in range(NUM_SHARED)})
    expected = {k: values_for(k) for k in expected}
    with RewardCache(path) as cache:
        assert len(cache) == NUM_WRITERS * OWN_PER_WRITER + NUM_SHARED  # the primary key: every entry exactly once
        assert cache.get_many(list(expected)) == expected
        assert cache.integrity_ok()


CRASH_BATCH = 5000
CRASH_WRITER = f"""
import hashlib, sys
from bp_ray.rewards.cache import RewardCache
{inspect.getsource(values_for)}
{inspect.getsource(crash_key)}
cache = RewardCache(sys.argv[1])
for batch in range(200):  # bounded, in case the test dies before it kills this writer
    cache.put_many({{crash_key(batch, i): values_for(crash_key(batch, i)) for i in range({CRASH_BATCH})}})
"""


def test_a_writer_killed_mid_transaction_leaves_only_whole_batches(tmp_path):
    path = tmp_path / "cache.sqlite"
    RewardCache(path).close()  # schema in place, so polling can start at once
    child = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(path)], cwd=REPO, env=child_env(),
                             stderr=subprocess.PIPE)
    try:
        with RewardCache(path) as watcher:
            deadline = time.monotonic() + 30
            while len(watcher) < CRASH_BATCH:
                assert child.poll() is None, child.stderr.read().decode()
                assert time.monotonic() < deadline, "the writer never committed"
                time.sleep(0.005)
        time.sleep(0.02)  # the writer spends most of its time inside a transaction: the kill lands mid-write
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stderr.close()

    with RewardCache(path) as cache:
        assert cache.integrity_ok()
        stored = len(cache)
        assert stored >= CRASH_BATCH and stored % CRASH_BATCH == 0  # whole transactions only
        expected = {crash_key(b, i): values_for(crash_key(b, i))
                    for b in range(stored // CRASH_BATCH) for i in range(CRASH_BATCH)}
        assert cache.get_many(list(expected)) == expected  # exactly the first batches, values intact
        cache.put_many({"after": (1.0, 2.0, 3.0)})
    with RewardCache(path) as reopened:
        assert reopened.get_many(["after"]) == {"after": (1.0, 2.0, 3.0)}
        assert len(reopened) == stored + 1
