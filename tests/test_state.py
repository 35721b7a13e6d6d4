"""State store, output repair, keys, shards and the lock: real SQLite files and real outputs."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from helpers import make_image

from batchclassify import sinks
from batchclassify.errors import ConfigError
from batchclassify.model import ErrorInfo, Item, Result
from batchclassify.sinks import repair_output
from batchclassify.state import (
    Fingerprint,
    StateLock,
    StateStore,
    default_state_path,
    in_shard,
    is_final,
    item_key,
    parse_shard,
    select_items,
)

FINGERPRINT = Fingerprint(model="demo/1", endpoint="http://x", confidence="None", max_size="None")


def ok(source: str, key: str, digest: str | None = None) -> Result:
    return Result(
        source=source,
        status="ok",
        top="cat",
        confidence=0.9,
        predicted_classes=("cat",),
        predictions={"cat": 0.9},
        attempts=1,
        key=key,
        content_hash=digest,
    )


def failed(source: str, key: str, kind: str, status: int | None = None) -> Result:
    return Result(source=source, status="error", error=ErrorInfo(kind, "m", status), key=key)


def test_records_round_trip_in_commit_order_and_ignore_repeated_keys(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.state")
    first = store.record([ok("a", "k1"), ok("b", "k2")])
    again = store.record([ok("a-again", "k1"), ok("c", "k3")])
    assert [r.source for r in first] == ["a", "b"]
    assert [r.source for r in again] == ["c"]
    assert store.count() == 3
    assert [r.source for r in store.records()] == ["a", "b", "c"]
    assert [r.source for r in store.records(skip=2)] == ["c"]
    assert next(store.records()) == ok("a", "k1")  # the full record survives the round trip
    store.close()


def test_a_key_repeated_within_one_batch_is_stored_once_in_order(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.state")
    store.record([ok("z", "k0")])
    new = store.record([ok("a", "k1"), ok("b", "k2"), ok("a-again", "k1"), ok("z-again", "k0")])
    assert [r.source for r in new] == ["a", "b"]
    assert [r.source for r in store.records()] == ["z", "a", "b"]
    # The batch's own record texts are what was stored, byte for byte.
    assert [json.loads(t)["source"] for t in store.reader().record_texts()] == ["z", "a", "b"]


def test_hash_filter_never_misses_and_rarely_lies() -> None:
    import hashlib

    from batchclassify.dedup import HashFilter

    known = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(20_000)]
    others = [hashlib.sha256(f"x{n}".encode()).hexdigest() for n in range(20_000)]
    bloom = HashFilter()
    for digest in known:
        bloom.add(digest)
    assert all(digest in bloom for digest in known)
    assert sum(digest in bloom for digest in others) <= 20  # ~0 expected at this load
    bloom.add("not-a-sha256")  # odd keys from an old state still work
    assert "not-a-sha256" in bloom and "not-a-sha25" not in bloom


def test_forget_retryable_keeps_permanent_failures(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.state")
    store.record(
        [
            ok("a", "k1"),
            failed("b", "k2", "timeout"),
            failed("c", "k3", "http", 503),
            failed("d", "k4", "http", 400),
            failed("e", "k5", "not_an_image"),
        ]
    )
    assert store.forget_retryable(all_failures=False) == 2
    assert [r.source for r in store.records()] == ["a", "d", "e"]
    assert store.forget_retryable(all_failures=True) == 2
    assert [r.source for r in store.records()] == ["a"]


def test_is_final_follows_the_protocol_table() -> None:
    assert is_final(ok("a", "k"))
    assert not is_final(failed("a", "k", "connection"))
    assert not is_final(failed("a", "k", "http", 429))
    assert not is_final(failed("a", "k", "http", 502))
    assert is_final(failed("a", "k", "http", 400))
    assert is_final(failed("a", "k", "truncated"))


def test_content_lookup_only_returns_ok_results(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.state")
    store.record([ok("a", "k1", digest="d1")])
    found = store.lookup_content("d1")
    assert found is not None and found.source == "a"
    assert store.lookup_content("d2") is None


def test_fingerprint_is_adopted_then_enforced(tmp_path: Path) -> None:
    path = tmp_path / "s.state"
    StateStore(path).check_fingerprint(FINGERPRINT)
    StateStore(path).check_fingerprint(FINGERPRINT)
    other = Fingerprint(model="demo/2", endpoint="http://x", confidence="None", max_size="None")
    with pytest.raises(ConfigError, match="model='demo/1'"):
        StateStore(path).check_fingerprint(other)


def test_a_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.state"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="is damaged or not a state"):
        StateStore(path)


def test_item_keys_change_with_the_file(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.jpg", seed=1)
    key = item_key(Item(source=str(image), path=image))
    assert key.startswith("file:") and str(image) in key
    os.utime(image, ns=(1, 1_000_000_000))
    assert item_key(Item(source=str(image), path=image)) != key
    assert item_key(Item(source="u", url="https://e.com/a.jpg")) == "url:https://e.com/a.jpg"
    assert item_key(Item(source=str(tmp_path / "x"), path=tmp_path / "x")).startswith("missing:")
    # two names for one file are one input
    os.symlink(image, tmp_path / "alias.jpg")
    alias = tmp_path / "alias.jpg"
    assert item_key(Item(source=str(alias), path=alias)) == item_key(
        Item(source=str(image), path=image)
    )


def test_shards_partition_the_inputs() -> None:
    sources = [f"https://e.com/{n}.jpg" for n in range(3000)]
    shards = [{s for s in sources if in_shard(s, (k, 3))} for k in range(3)]
    assert set.union(*shards) == set(sources)
    assert sum(map(len, shards)) == len(sources)
    assert all(800 < len(shard) < 1200 for shard in shards)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1/0", "N, the number of shards, must be at least 1"),
        ("0/0", "N, the number of shards, must be at least 1"),
        ("1/-2", "N, the number of shards, must be at least 1"),
        ("5/4", "K must be between 0 and 3"),
        ("4/4", "K must be between 0 and 3"),
        ("-1/2", "K must be between 0 and 1"),
        ("x", "must look like K/N"),
        ("1/2/3", "must look like K/N"),
        ("1.5/4", "must look like K/N"),
    ],
)
def test_bad_shards_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_shard(text)
    if "N, the number" in message:  # not a complaint about K when N is the problem
        assert "K must" not in str(caught.value)


def test_select_items_skips_done_keys(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.state")
    store.record([ok("a", "url:https://e.com/a.jpg")])
    items = [Item(source=u, url=u) for u in ("https://e.com/a.jpg", "https://e.com/b.jpg")]
    reader = store.reader()
    chosen = list(select_items(items, reader=reader, shard=None))
    assert [item.key for item in chosen] == ["url:https://e.com/b.jpg"]
    reader.close()


def test_default_state_path_is_beside_the_first_file_output() -> None:
    assert default_state_path(["-", "out/r.jsonl", "r.csv"]) == Path("out/r.jsonl.state")
    assert default_state_path(["-"]) is None


@pytest.fixture(params=[5, 1 << 24], ids=["tiny-chunks", "default-chunks"])
def chunked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repair reads outputs in chunks; tiny ones put rows and quotes across chunk edges."""
    monkeypatch.setattr(sinks, "_REPAIR_CHUNK", request.param)


@pytest.mark.usefixtures("chunked")
def test_repair_jsonl_cuts_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"a":1}\n{"a":2}\n{"a":')
    assert repair_output(path) == 2
    assert path.read_text() == '{"a":1}\n{"a":2}\n'
    assert repair_output(path) == 2


@pytest.mark.usefixtures("chunked")
def test_repair_csv_respects_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["source", "status"])
        writer.writerow(['multi\nline "name".jpg', "ok"])
        writer.writerow(["b.jpg", "ok"])
    whole = path.read_text()
    assert repair_output(path) == 2
    path.write_text(whole + '"torn\nrow')  # torn inside a quoted field, after a newline
    assert repair_output(path) == 2
    assert path.read_text() == whole
    path.write_text("")
    assert repair_output(path) == 0


def _hold_lock(path: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    lock = StateLock(Path(path))
    lock.acquire()
    ready.set()
    time.sleep(60)


def test_lock_excludes_a_second_holder_and_frees_when_the_holder_dies(tmp_path: Path) -> None:
    state = tmp_path / "s.state"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_lock, args=(str(state), ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            StateLock(state).acquire()
    finally:
        holder.kill()
        holder.join(10)
    lock = StateLock(state)
    lock.acquire()  # the dead holder's lock is gone: nothing stale to clean up
    lock.release()


def test_results_json_is_stable_through_the_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.state")
    original = ok('ünïcode "quoted".jpg', "k1")
    store.record([original])
    [back] = list(store.records())
    assert json.dumps(back.to_dict()) == json.dumps(original.to_dict())
