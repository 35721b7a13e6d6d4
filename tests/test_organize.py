"""Tests for batchclassify.organize: real files, links and folders in tmp_path."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchclassify.errors import ConfigError, RunAborted
from batchclassify.model import ErrorInfo, Result
from batchclassify.organize import (
    FAILED,
    UNCERTAIN,
    OrganizeMode,
    OrganizeOptions,
    Organizer,
    OrganizeSink,
    folder_name,
    local_path,
)

MODES: tuple[OrganizeMode, ...] = ("link", "copy", "symlink")


def image(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else os.fsencode(f"image {path}"))
    return path


def ok(source: Path | str, top: str, confidence: float = 0.9) -> Result:
    return Result(
        source=str(source),
        status="ok",
        top=top,
        confidence=confidence,
        predicted_classes=(top,) if top else (),
        predictions={top: confidence} if top else {},
    )


def multi(source: Path | str, predictions: dict[str, float], predicted: tuple[str, ...]) -> Result:
    top = max(predictions, key=predictions.__getitem__) if predictions else ""
    return Result(
        source=str(source),
        status="ok",
        top=top,
        confidence=predictions.get(top, 0.0),
        predicted_classes=predicted,
        predictions=predictions,
    )


def failed(source: Path | str) -> Result:
    return Result(source=str(source), status="error", error=ErrorInfo("http", "boom", 400))


def organizer(
    root: Path, mode: OrganizeMode = "link", min_confidence: float | None = None
) -> Organizer:
    return Organizer(OrganizeOptions(root=root, mode=mode, min_confidence=min_confidence))


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if not path.is_dir())


def short_hash(path: Path) -> str:
    return hashlib.sha1(os.fsencode(path.resolve())).hexdigest()[:8]


def fallback(folder: str, length: int = 8) -> str:
    """The stable name of ``folder`` when its own name is taken."""
    return f"{folder}-{hashlib.sha1(folder.encode()).hexdigest()[:length]}"


# --- where results go ---------------------------------------------------------------------------


def test_single_label_goes_into_its_class_folder(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "rex.jpg")
    root = tmp_path / "out"
    placed = organizer(root).place(ok(src, "golden retriever"), src)
    assert placed == [root / "golden retriever" / "rex.jpg"]
    assert placed[0].read_bytes() == src.read_bytes()


def test_under_the_threshold_goes_to_uncertain(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    org = organizer(tmp_path / "out", min_confidence=0.5)
    assert org.place(ok(src, "cat", 0.49), src) == [tmp_path / "out" / UNCERTAIN / "a.jpg"]
    other = image(tmp_path / "in" / "b.jpg")
    assert org.place(ok(other, "cat", 0.5), other) == [tmp_path / "out" / "cat" / "b.jpg"]


def test_empty_top_goes_to_uncertain(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    placed = organizer(tmp_path / "out").place(ok(src, "", 0.0), src)
    assert placed == [tmp_path / "out" / UNCERTAIN / "a.jpg"]


def test_failures_go_to_failed(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    placed = organizer(tmp_path / "out").place(failed(src), src)
    assert placed == [tmp_path / "out" / FAILED / "a.jpg"]


def test_multi_label_goes_into_every_predicted_class(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    result = multi(src, {"cat": 0.9, "dog": 0.7, "bird": 0.1}, ("cat", "dog"))
    placed = organizer(tmp_path / "out").place(result, src)
    assert placed == [tmp_path / "out" / "cat" / "a.jpg", tmp_path / "out" / "dog" / "a.jpg"]
    assert not (tmp_path / "out" / "bird").exists()


def test_multi_label_threshold_is_per_class(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    result = multi(src, {"cat": 0.9, "dog": 0.4, "bird": 0.6}, ("cat", "dog", "bird"))
    org = organizer(tmp_path / "out", min_confidence=0.5)
    assert org.folders(result) == ["cat", "bird"]
    assert org.folders(multi(src, {"cat": 0.3, "dog": 0.2}, ("cat", "dog"))) == [UNCERTAIN]


def test_multi_label_with_nothing_predicted_is_uncertain(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    result = multi(src, {"cat": 0.3, "dog": 0.2}, ())
    assert organizer(tmp_path / "out").folders(result) == [UNCERTAIN]


def test_unknown_confidence_does_not_pass_a_threshold(tmp_path: Path) -> None:
    result = Result(source="x.jpg", status="ok", top="cat", predicted_classes=("cat",))
    assert organizer(tmp_path / "a").folders(result) == ["cat"]
    assert organizer(tmp_path / "b", min_confidence=0.1).folders(result) == [UNCERTAIN]


# --- modes --------------------------------------------------------------------------------------


def test_link_mode_shares_the_inode(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    [dest] = organizer(tmp_path / "out", "link").place(ok(src, "cat"), src)
    assert dest.stat().st_ino == src.stat().st_ino
    assert src.stat().st_nlink == 2


def test_copy_mode_is_a_separate_file_with_the_same_bytes(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg", os.urandom(3000))
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    [dest] = organizer(tmp_path / "out", "copy").place(ok(src, "cat"), src)
    assert dest.stat().st_ino != src.stat().st_ino
    assert not dest.is_symlink()
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_mtime_ns == src.stat().st_mtime_ns  # like shutil.copy2
    assert [p.name for p in dest.parent.iterdir()] == ["a.jpg"]  # no temp file left behind


def test_symlink_mode_points_to_the_absolute_source(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    [dest] = organizer(tmp_path / "out", "symlink").place(ok(src, "cat"), src)
    assert dest.is_symlink()
    target = Path(os.readlink(dest))
    assert target.is_absolute()
    assert target == src.resolve()


def test_link_mode_copies_when_links_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def no_links_from_sources(source: str | Path, destination: str | Path, **kw: Any) -> None:
        if Path(source).parent.name == "in":
            raise OSError(errno.EMLINK, "Too many links")
        real_link(source, destination, **kw)

    monkeypatch.setattr(os, "link", no_links_from_sources)
    src = image(tmp_path / "in" / "a.jpg")
    [dest] = organizer(tmp_path / "out", "link").place(ok(src, "cat"), src)
    assert dest.stat().st_ino != src.stat().st_ino
    assert dest.read_bytes() == src.read_bytes()


def test_copies_without_any_hard_links_never_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: str | Path, destination: str | Path, **kw: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first = image(tmp_path / "a" / "cat.jpg")
    second = image(tmp_path / "b" / "cat.jpg")
    org = organizer(tmp_path / "out", "copy")
    [one] = org.place(ok(first, "cat"), first)
    [two] = org.place(ok(second, "cat"), second)
    assert one.read_bytes() == first.read_bytes()
    assert two.read_bytes() == second.read_bytes()
    assert org.place(ok(second, "cat"), second) == [two]
    assert len(files_under(tmp_path / "out")) == 2


def _second_filesystem(tmp_path: Path) -> Iterator[Path]:
    device = os.stat(tmp_path).st_dev
    for candidate in ("/dev/shm", f"/run/user/{os.getuid()}", "/tmp", "/var/tmp"):
        try:
            if os.stat(candidate).st_dev == device:
                continue
            folder = Path(tempfile.mkdtemp(prefix="organize-test-", dir=candidate))
        except OSError:
            continue
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    pytest.skip("no second writable filesystem to link across")


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    yield from _second_filesystem(tmp_path)


def test_link_mode_falls_back_to_a_copy_across_filesystems(
    tmp_path: Path, other_filesystem: Path
) -> None:
    src = image(other_filesystem / "a.jpg", os.urandom(1000))
    assert os.stat(src).st_dev != os.stat(tmp_path).st_dev
    org = organizer(tmp_path / "out", "link")
    [dest] = org.place(ok(src, "cat"), src)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_dev == os.stat(tmp_path).st_dev  # a real copy on this side
    assert src.stat().st_nlink == 1
    assert org.place(ok(src, "cat"), src) == [dest]  # a rerun recognises the copy


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_same_name_from_two_sources_keeps_both_with_stable_names(
    tmp_path: Path, mode: OrganizeMode
) -> None:
    first = image(tmp_path / "a" / "cat.jpg")
    second = image(tmp_path / "b" / "cat.jpg")
    root = tmp_path / "out"
    org = organizer(root, mode)
    assert org.place(ok(first, "cat"), first) == [root / "cat" / "cat.jpg"]
    hashed = root / "cat" / f"cat-{short_hash(second)}.jpg"
    assert org.place(ok(second, "cat"), second) == [hashed]
    assert (root / "cat" / "cat.jpg").read_bytes() == first.read_bytes()
    assert hashed.read_bytes() == second.read_bytes()

    again = organizer(root, mode)  # a second run, in the other order
    assert again.place(ok(second, "cat"), second) == [hashed]
    assert again.place(ok(first, "cat"), first) == [root / "cat" / "cat.jpg"]
    assert len(files_under(root)) == 2


@pytest.mark.parametrize("mode", MODES)
def test_placing_the_same_source_again_changes_nothing(tmp_path: Path, mode: OrganizeMode) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    result = multi(src, {"cat": 0.9, "dog": 0.8}, ("cat", "dog"))
    org = organizer(tmp_path / "out", mode)
    placed = org.place(result, src)
    assert organizer(tmp_path / "out", mode).place(result, src) == placed
    assert org.place(result, src) == placed
    assert files_under(tmp_path / "out") == sorted(placed)


def test_an_existing_foreign_file_is_never_overwritten(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg", b"mine")
    foreign = image(tmp_path / "out" / "cat" / "a.jpg", b"someone else's")
    [dest] = organizer(tmp_path / "out", "copy").place(ok(src, "cat"), src)
    assert dest != foreign
    assert foreign.read_bytes() == b"someone else's"
    assert dest.read_bytes() == b"mine"


@pytest.mark.parametrize("name", ["../escape", "a/b", "_failed", ".hidden", "", "..", "a\\b"])
def test_hostile_class_names_stay_inside_root(tmp_path: Path, name: str) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    for result in (ok(src, name), multi(src, {name: 0.9, "x": 0.8}, (name, "x"))):
        for dest in organizer(root).place(result, src):
            assert dest.parent.parent == root
            assert dest.resolve().is_relative_to(root.resolve())
    assert not (tmp_path / "escape").exists()
    assert not (root / FAILED).exists()  # a class named _failed is not a failure
    assert {path.name for path in root.iterdir()} <= {
        UNCERTAIN,
        "x",
        folder_name(name) if name else UNCERTAIN,
    }


def test_ordinary_class_names_stay_readable() -> None:
    for name in ("golden retriever", "cat", "Épagneul breton", "狗", "t-shirt", "a.b", "x_"):
        assert folder_name(name) == name


def test_unsafe_class_names_are_percent_encoded() -> None:
    assert folder_name("_failed") == "%5Ffailed"
    assert folder_name(".hidden") == "%2Ehidden"
    assert folder_name("..") == "%2E%2E"
    assert folder_name("../escape") == "%2E.%2Fescape"
    assert folder_name(" spaced ") == " spaced%20"
    assert folder_name("a/b") == "a%2Fb"
    assert folder_name("100%") == "100%25"
    assert folder_name("con") == "%63on"
    assert folder_name("trailing.") == "trailing%2E"
    with pytest.raises(ValueError):
        folder_name("")


@given(st.text(min_size=1, max_size=60))
def test_folder_names_are_safe_and_reversible(name: str) -> None:
    folder = folder_name(name)
    assert folder and folder not in (".", "..")
    assert not folder.startswith((".", "_"))
    assert "/" not in folder and "\\" not in folder and "\x00" not in folder
    assert unquote(folder) == name


def test_very_long_class_names_are_shortened() -> None:
    folder = folder_name("x" * 1000)
    assert len(folder.encode()) <= 200
    assert folder != folder_name("x" * 999)


# --- odd inputs ---------------------------------------------------------------------------------


def test_urls_and_missing_sources_are_skipped(tmp_path: Path) -> None:
    org = organizer(tmp_path / "out")
    url = "https://example.com/a.jpg"
    assert local_path(url) is None
    assert local_path("~no-such-user-here/a.jpg") == Path("~no-such-user-here/a.jpg")
    assert org.place(ok(url, "cat"), local_path(url)) == []
    gone = tmp_path / "in" / "gone.jpg"
    assert org.place(ok(gone, "cat"), gone) == []
    assert org.place(failed(tmp_path), tmp_path) == []  # a folder is not an image
    assert files_under(tmp_path / "out") == []


def test_root_is_created_and_a_file_is_refused(tmp_path: Path) -> None:
    organizer(tmp_path / "new" / "dataset")
    assert (tmp_path / "new" / "dataset").is_dir()
    image(tmp_path / "file")
    with pytest.raises(ConfigError, match="not a folder"):
        organizer(tmp_path / "file")


# --- symlinks and names taken in DIR ------------------------------------------------------------


SPECIAL_CASES = [
    ("cat", lambda src: ok(src, "cat")),
    (FAILED, failed),
    (UNCERTAIN, lambda src: ok(src, "")),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("folder", "result_of"), SPECIAL_CASES)
def test_a_symlinked_folder_is_never_written_through(
    tmp_path: Path, mode: OrganizeMode, folder: str, result_of: Any
) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "out"
    root.mkdir()
    (root / folder).symlink_to(outside)
    placed = organizer(root, mode).place(result_of(src), src)
    assert placed == [root / fallback(folder) / "a.jpg"]
    assert placed[0].read_bytes() == src.read_bytes()
    assert list(outside.iterdir()) == []
    assert os.readlink(root / folder) == str(outside)  # left alone
    assert organizer(root, mode).place(result_of(src), src) == placed  # stable on a rerun


def test_a_dangling_symlinked_folder_is_not_created_through(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    root.mkdir()
    (root / "cat").symlink_to(tmp_path / "not-yet")
    assert organizer(root).place(ok(src, "cat"), src) == [root / fallback("cat") / "a.jpg"]
    assert not (tmp_path / "not-yet").exists()


def test_a_folder_swapped_for_a_symlink_after_mkdir_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race a check-then-write misses: the folder is created, then replaced by a symlink.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if os.fsdecode(path).endswith("/cat") or path == "cat":
            os.rmdir(path, dir_fd=dir_fd)
            os.symlink(outside, path, dir_fd=dir_fd)

    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    org = organizer(root)
    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    assert org.place(ok(src, "cat"), src) == [root / fallback("cat") / "a.jpg"]
    assert list(outside.iterdir()) == []


async def test_symlinked_and_file_folders_do_not_stop_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources = [image(tmp_path / "in" / f"{n}.jpg") for n in range(6)]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "out"
    root.mkdir()
    (root / "cat").symlink_to(outside)
    (root / "dog").write_bytes(b"a file, not a folder")
    sink = OrganizeSink(organizer(root))
    with caplog.at_level(logging.WARNING, "batchclassify.organize"):
        for n, src in enumerate(sources):
            await sink.write(ok(src, ("cat", "dog", "bird")[n % 3]))
        await sink.aclose()
    assert sink.placed == 6
    assert list(outside.iterdir()) == []
    assert (root / "dog").read_bytes() == b"a file, not a folder"
    assert {path.name for path in root.iterdir()} == {
        "cat",
        "dog",
        "bird",
        fallback("cat"),
        fallback("dog"),
    }
    assert len(files_under(root / fallback("cat"))) == 2
    assert len(files_under(root / fallback("dog"))) == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2  # once per folder, not once per image
    assert any(fallback("cat") in message for message in warnings)


def test_a_class_named_like_an_existing_file_gets_a_stable_suffixed_folder(
    tmp_path: Path,
) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    image(root / "cat", b"someone's file")
    placed = organizer(root).place(multi(src, {"cat": 0.9, "dog": 0.8}, ("cat", "dog")), src)
    assert placed == [root / fallback("cat") / "a.jpg", root / "dog" / "a.jpg"]
    assert (root / "cat").read_bytes() == b"someone's file"
    assert organizer(root).place(ok(src, "cat"), src) == placed[:1]  # a rerun lands there too


def test_every_fallback_folder_taken_skips_that_folder_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "out"
    root.mkdir()
    for name in ("cat", *(fallback("cat", length) for length in (8, 16, 40))):
        (root / name).symlink_to(outside)
    org = organizer(root)
    with caplog.at_level(logging.WARNING, "batchclassify.organize"):
        assert org.place(ok(src, "cat"), src) == []
        both = multi(src, {"cat": 0.9, "dog": 0.8}, ("cat", "dog"))
        assert org.place(both, src) == [root / "dog" / "a.jpg"]
    assert list(outside.iterdir()) == []
    assert len(caplog.records) == 1
    assert "not placed" in caplog.records[0].getMessage()


# --- caps on what one answer can create ---------------------------------------------------------


def many_classes(source: Path, count: int, prefix: str = "class") -> Result:
    names = tuple(f"{prefix}{n}" for n in range(count))
    return multi(source, dict.fromkeys(names, 0.9), names)


def test_one_image_goes_into_at_most_64_class_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    org = organizer(root)
    result = many_classes(src, 5_000)
    with caplog.at_level(logging.WARNING, "batchclassify.organize"):
        assert org.folders(result) == [f"class{n}" for n in range(64)]
        placed = org.place(result, src)
        org.place(many_classes(src, 5_000, "other"), src)
    assert len(placed) == 64
    assert len(list(root.iterdir())) == 128
    assert len(caplog.records) == 1  # logged once per run


def test_a_run_uses_at_most_max_class_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    org = Organizer(OrganizeOptions(root=root, max_class_folders=100))
    with caplog.at_level(logging.WARNING, "batchclassify.organize"):
        placed = [org.place(ok(src, f"class{n}"), src) for n in range(5_000)]
    assert placed[99] == [root / "class99" / "a.jpg"]
    assert placed[100:] == [[root / UNCERTAIN / "a.jpg"]] * 4_900
    assert len(list(root.iterdir())) == 101  # 100 class folders and _uncertain
    assert len(caplog.records) == 1
    # Folders of the run stay usable; failures are not classes and are never capped.
    assert org.place(ok(src, "class7"), src) == [root / "class7" / "a.jpg"]
    mixed = multi(src, {"class3": 0.9, "new": 0.8}, ("class3", "new"))
    assert org.place(mixed, src) == [root / "class3" / "a.jpg"]
    assert org.place(failed(src), src) == [root / FAILED / "a.jpg"]


def test_class_folder_caps_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="caps"):
        OrganizeOptions(root=tmp_path, max_classes_per_image=0)
    with pytest.raises(ConfigError, match="caps"):
        OrganizeOptions(root=tmp_path, max_class_folders=0)


# --- names that are not valid UTF-8 -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_source_name_that_is_not_utf8_keeps_its_bytes(tmp_path: Path, mode: OrganizeMode) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")
    long_name = os.fsdecode(b"\xe9" * 250 + b".jpg")
    try:
        sources = [image(tmp_path / folder / stem) for stem in (name, long_name) for folder in "ab"]
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    root = tmp_path / "out"
    org = organizer(root, mode)
    placed = [org.place(ok(src, "cat"), src) for src in sources]
    assert placed[0] == [root / "cat" / name]
    assert placed[1] == [root / "cat" / f"caf\udce9-{short_hash(sources[1])}.jpg"]
    assert placed[2] == [root / "cat" / long_name]
    [hashed] = placed[3]
    assert len(os.fsencode(hashed.name)) == 255
    assert hashed.name.startswith("\udce9" * 200)  # cut short, undecodable bytes kept
    for src, (dest,) in zip(sources, placed, strict=True):
        assert dest.read_bytes() == src.read_bytes()
    assert [org.place(ok(src, "cat"), src) for src in sources] == placed


def test_a_class_name_with_a_lone_surrogate_gets_a_folder(tmp_path: Path) -> None:
    # JSON may carry "\ud800", which Python decodes but UTF-8 cannot encode.
    assert folder_name("a\ud800") == "a%ED%A0%80"
    assert len(folder_name("\ud800" * 300).encode()) <= 200
    src = image(tmp_path / "in" / "a.jpg")
    [dest] = organizer(tmp_path / "out").place(ok(src, "a\ud800"), src)
    assert dest == tmp_path / "out" / "a%ED%A0%80" / "a.jpg"


# --- concurrency --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_placement_places_every_source_exactly_once(
    tmp_path: Path, mode: OrganizeMode
) -> None:
    # 200 sources, 8 base names: every name is wanted by 25 sources at once; each source is
    # also placed twice concurrently, as a resumed run racing itself would.
    sources = [image(tmp_path / "in" / f"d{n // 8}" / f"img{n % 8}.jpg") for n in range(200)]
    root = tmp_path / "out"
    org = organizer(root, mode)
    jobs = [(ok(src, "cat"), src) for src in sources] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        placed = list(pool.map(lambda job: org.place(*job), jobs))
    by_source: dict[Path, set[Path]] = {}
    for (_, src), dests in zip(jobs, placed, strict=True):
        assert len(dests) == 1
        by_source.setdefault(src, set()).update(dests)
    assert all(len(dests) == 1 for dests in by_source.values())
    assert len({dest for dests in by_source.values() for dest in dests}) == 200
    assert len(files_under(root)) == 200
    for src, (dest,) in by_source.items():
        assert dest.read_bytes() == src.read_bytes()


# --- the sink -----------------------------------------------------------------------------------


async def test_sink_places_results_in_threads(tmp_path: Path) -> None:
    sources = [image(tmp_path / "in" / f"{n}.jpg") for n in range(20)]
    sink = OrganizeSink(organizer(tmp_path / "out"), max_pending=3)
    for src in sources:
        await sink.write(ok(src, "cat"))
    await sink.write(ok("https://example.com/a.jpg", "cat"))
    await sink.aclose()
    assert sink.placed == 20
    assert len(files_under(tmp_path / "out")) == 20


async def test_sink_stops_the_run_when_the_output_is_broken(tmp_path: Path) -> None:
    src = image(tmp_path / "in" / "a.jpg")
    root = tmp_path / "out"
    sink = OrganizeSink(organizer(root))
    shutil.rmtree(root)
    root.write_bytes(b"not a folder any more")
    await sink.write(ok(src, "cat"))
    with pytest.raises(RunAborted, match="--organize"):
        await sink.flush()


@pytest.mark.parametrize("threshold", [-0.1, 1.5, 50.0, float("nan")])
def test_a_threshold_outside_zero_to_one_is_refused(tmp_path: Path, threshold: float) -> None:
    with pytest.raises(ConfigError, match="--min-confidence"):
        OrganizeOptions(root=tmp_path, min_confidence=threshold)
