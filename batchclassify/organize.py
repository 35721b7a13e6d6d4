"""``--organize DIR``: place classified images into a folder per class, the layout training tools
import directly (``DIR/<class>/<image>``).

Where a result goes::

    status error                          DIR/_failed/
    ok, one class (predicted == [top])    DIR/<top>/
    ok, multi-label                       DIR/<class>/ for EVERY predicted class (up to a cap)
    no class, top "", under the threshold DIR/_uncertain/

With ``min_confidence`` a single-label result is judged on ``confidence``, a multi-label one class
by class on that class's own score in ``predictions`` (the classes under the threshold are
dropped, not the whole image); a class whose score is unknown counts as under the threshold. An
image with no class left goes to ``_uncertain``.

**Caps**: class names come from the server, so one answer must not be able to flood ``DIR``. An
image goes into at most ``max_classes_per_image`` (64) class folders, the first ones in class
order; a run uses at most ``max_class_folders`` (10 000) distinct class folders, created or found.
A class past the run's cap is dropped like one under the threshold (so an image left without a
class goes to ``_uncertain``). Each cap is logged once per run. Both are :class:`OrganizeOptions`.

**Folder names** (:func:`folder_name`) keep ordinary class names as they are (``golden
retriever``) and percent-encode only what is unsafe or ambiguous: ``%``, ``/``, ``\\``, control
characters, lone surrogates and the characters Windows forbids (``<>:"|?*``); a leading ``.`` or
``_``; a trailing ``.`` or space; and Windows device names (``con``, ``lpt1``, …). Names starting
with ``_`` are therefore ours alone: a class called ``_failed`` lives in ``%5Ffailed``, never in
``_failed``. The encoding is reversible with :func:`urllib.parse.unquote` (except for names over
200 bytes, which are shortened with a hash, lone surrogates and the fallback names below). Case is
kept, so on a case-insensitive filesystem (macOS, Windows) ``Cat`` and ``cat`` share a folder.

**Symlinks are never followed under DIR** (``DIR`` itself may be one: the user chose it). Each
folder is opened relative to ``DIR`` with ``O_NOFOLLOW | O_DIRECTORY`` and every file is created
relative to that open folder, so a symlink put in place at any moment cannot redirect a write
outside ``DIR``. A folder name already taken by something that is not a real folder (a symlink,
a file) is left alone and the folder moves to ``<folder>-<8 hex of sha1(folder name)>`` (16, then
40 hex digits should that be taken too), stable across runs; this holds for ``_failed`` and
``_uncertain`` too, and is logged once per folder. A fallback name may coincide with a class
literally called so; the two then share a folder. When every fallback is taken as well, the image
is not placed in that folder (logged). This needs POSIX ``dir_fd`` support.

**File names** are stable: an image keeps its own name (``cat.jpg``) unless a *different* image
already holds it, then it is ``cat-<8 hex of sha1(resolved source path)>.jpg`` (16, then 40 hex
digits should that be taken too); a name that was not valid UTF-8 keeps its bytes. Placing the
same source again (a rerun, ``--resume``) finds its earlier placement and changes nothing: a
destination counts as this source when it is the same inode, a symlink to it, or a file with the
same bytes (so two identical images with the same name end up as one file). Nothing is ever
overwritten, and nothing half-written ever appears under a final name: links are created
atomically and copies are written to a hidden ``.batchclassify-*.tmp`` in the same folder and
then linked into place.

**Modes**: ``link`` makes a hard link (no extra space, instant) and falls back to a copy where
links cannot be made (another filesystem, a filesystem without links, someone else's file under
``protected_hardlinks``, too many links); ``copy`` copies bytes, permission bits and timestamps,
like :func:`shutil.copy2` (without extended attributes); ``symlink`` makes an absolute symbolic
link to the resolved source.

Only local files are placed: URL inputs have no file here and are skipped, as is a source that
disappeared before its turn. :meth:`Organizer.place` is synchronous and thread-safe (every
name is claimed by an atomic create), so it runs in worker threads; :class:`OrganizeSink` does
that for the async runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from batchclassify.errors import ConfigError, RunAborted
from batchclassify.model import Result

__all__ = [
    "FAILED",
    "UNCERTAIN",
    "OrganizeMode",
    "OrganizeOptions",
    "OrganizeSink",
    "Organizer",
    "folder_name",
    "local_path",
]

logger = logging.getLogger(__name__)

OrganizeMode = Literal["link", "copy", "symlink"]

#: folder of results that failed (``status`` error)
FAILED = "_failed"
#: folder of results without a confident class
UNCERTAIN = "_uncertain"

#: errnos of ``os.link`` that mean "links are impossible here", not "something is wrong"
_NO_LINK = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
)
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
#: errnos of opening a name with ``_FOLDER_FLAGS`` that mean "a symlink or not a folder"
#: (EMLINK is FreeBSD's answer to O_NOFOLLOW on a symlink)
_NOT_A_FOLDER = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EMLINK})
_UNSAFE_CHARS = re.compile(r'[%/\\<>:"|?*\x00-\x1f\x7f\ud800-\udfff]')
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{n}" for n in range(10)} | {f"LPT{n}" for n in range(10)}
)
#: longest folder name kept whole (bytes); NAME_MAX is 255 on common filesystems
_MAX_FOLDER_BYTES = 200
_MAX_NAME_BYTES = 255
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class OrganizeOptions:
    """Where and how images are placed.

    ``root``: the dataset folder (created if missing). ``mode``: ``link`` (hard link, copy
    where impossible), ``copy`` or ``symlink``. ``min_confidence``: classes scored under it do
    not count (``None``: every predicted class counts). ``max_classes_per_image``: class folders
    one image goes into at most. ``max_class_folders``: distinct class folders one run uses at
    most.
    """

    root: Path
    mode: OrganizeMode = "link"
    min_confidence: float | None = None
    max_classes_per_image: int = 64
    max_class_folders: int = 10_000

    def __post_init__(self) -> None:
        if self.mode not in ("link", "copy", "symlink"):
            raise ConfigError(f"--organize-mode must be link, copy or symlink, not {self.mode!r}")
        threshold = self.min_confidence
        # Scores are 0..1 here, unlike the service's --confidence percentage: catch a mix-up.
        if threshold is not None and not 0 <= threshold <= 1:
            raise ConfigError(f"--min-confidence must be between 0 and 1, not {threshold}")
        if self.max_classes_per_image < 1 or self.max_class_folders < 1:
            raise ConfigError("--organize: the class folder caps must be at least 1")


def _escape(char: str) -> str:
    # surrogatepass: a lone surrogate (valid in JSON, not in UTF-8) is escaped, not a crash.
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def folder_name(class_name: str) -> str:
    """The folder of ``class_name``: the name itself when it is safe, otherwise with the
    offending characters percent-encoded (see the module docstring). Never empty, never starts
    with ``.`` or ``_``, never contains a path separator. Raises :class:`ValueError` for an
    empty name, which is no class at all."""
    if not class_name:
        raise ValueError("an empty class name has no folder")
    name = _UNSAFE_CHARS.sub(lambda match: _escape(match.group()), class_name)
    if name[0] in "._" or name.split(".", 1)[0].upper() in _WINDOWS_DEVICES:
        name = _escape(name[0]) + name[1:]
    if name[-1] in ". ":
        name = name[:-1] + _escape(name[-1])
    encoded = name.encode("utf-8")
    if len(encoded) > _MAX_FOLDER_BYTES:
        key = class_name.encode("utf-8", "surrogatepass")
        digest = hashlib.sha1(key, usedforsecurity=False).hexdigest()
        head = encoded[: _MAX_FOLDER_BYTES - 9].decode("utf-8", errors="ignore").rstrip(". ")
        name = f"{head}~{digest[:8]}"
    return name


def local_path(source: str) -> Path | None:
    """The local file behind a result's ``source``, or ``None`` for a URL (nothing to place)."""
    if _URL.match(source):
        return None
    # os.path, not Path.expanduser: an unknown ``~user`` stays as it is instead of raising.
    return Path(os.path.expanduser(source))


class Organizer:
    """Places images into ``root/<class>/`` according to their results; see the module
    docstring for the rules. Safe to call from many threads at once (and, where the
    filesystem has hard links, from several processes): names are claimed with atomic creates
    that fail when the name is taken, never by checking first and then writing."""

    def __init__(self, options: OrganizeOptions) -> None:
        root = Path(os.path.abspath(os.path.expanduser(options.root)))
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--organize {root}: exists and is not a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--organize {root}: cannot create it: {exc.strerror}") from exc
        self.options = options
        self.root = root
        # Only for filesystems without hard links, where a copy cannot be published atomically.
        self._publish_lock = threading.Lock()
        self._lock = threading.Lock()
        #: class folders this run uses; never more than ``max_class_folders``
        self._class_folders: set[str] = set()
        #: what was logged once: ("cap", which) or ("folder", name); bounded like the folders
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"Organizer(root={str(self.root)!r}, mode={self.options.mode!r})"

    def folders(self, result: Result) -> list[str]:
        """The folder names (under ``root``) ``result`` belongs in, in class order, at most
        ``max_classes_per_image`` of them."""
        if not result.ok:
            return [FAILED]
        threshold = self.options.min_confidence
        limit = self.options.max_classes_per_image
        if result.predicted_classes == (result.top,):
            scored = [(result.top, result.confidence)]
        else:
            scored = [
                (name, result.predictions.get(name, result.confidence))
                if name == result.top
                else (name, result.predictions.get(name))
                for name in result.predicted_classes
            ]
        folders: dict[str, None] = {}  # an ordered set: membership is O(1)
        for name, confidence in scored:
            if not name:
                continue
            if threshold is not None and (confidence is None or confidence < threshold):
                continue
            folder = folder_name(name)
            if folder in folders:
                continue
            if len(folders) == limit:
                self._warn_once(
                    ("cap", "max_classes_per_image"),
                    "organize: %s has more than %d classes; it is placed into the first %d only"
                    " (logged once per run)",
                    result.source,
                    limit,
                    limit,
                )
                break
            folders[folder] = None
        return list(folders) or [UNCERTAIN]

    def place(self, result: Result, path: Path | None) -> list[Path]:
        """Place the image at ``path`` into every folder ``result`` belongs in; return where it
        now is (also when it was already there). ``path`` is ``None`` for URL inputs, which are
        skipped (``[]``), as is a source that is missing or not a regular file. Raises
        :class:`OSError` when ``root`` cannot be written (disk full, permissions): that is the
        run's problem, not this image's."""
        if path is None:
            return []
        source = Path(os.path.abspath(path))
        try:
            source_stat = source.stat()
        except OSError as exc:
            logger.debug("organize: skipping %s: %s", source, exc.strerror)
            return []
        if not stat.S_ISREG(source_stat.st_mode):
            logger.debug("organize: skipping %s: not a regular file", source)
            return []
        resolved = source.resolve()
        folders = [folder for folder in self.folders(result) if self._admit(folder)]
        placed: list[Path] = []
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for folder in folders or [UNCERTAIN]:
                opened = self._open_folder(root_fd, folder)
                if opened is None:
                    continue
                name, folder_fd = opened
                try:
                    placed.append(
                        self._place_in(folder_fd, self.root / name, source, resolved, source_stat)
                    )
                except _SourceGone as exc:
                    logger.debug("organize: skipping %s: %s", source, exc)
                    return []
                finally:
                    os.close(folder_fd)
        finally:
            os.close(root_fd)
        return placed

    def _admit(self, folder: str) -> bool:
        """Whether ``folder`` is within the run's cap on class folders (ours always are)."""
        if folder in (FAILED, UNCERTAIN):
            return True
        with self._lock:
            if folder in self._class_folders:
                return True
            if len(self._class_folders) < self.options.max_class_folders:
                self._class_folders.add(folder)
                return True
        self._warn_once(
            ("cap", "max_class_folders"),
            "organize: this run reached %d class folders; further classes are not placed"
            " (an image left without a class goes to %s; logged once per run)",
            self.options.max_class_folders,
            UNCERTAIN,
        )
        return False

    def _open_folder(self, root_fd: int, folder: str) -> tuple[str, int] | None:
        """Open ``folder`` under ``root_fd`` (creating it if missing) as a real folder, never
        through a symlink; when the name is taken by anything else, its first free fallback
        name. Returns the name used and its descriptor, or ``None`` when all are taken."""
        for name in _folder_candidates(folder):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=root_fd)
            try:
                # Opened, not checked: what is used is exactly what passed O_NOFOLLOW, even if
                # the name is swapped for a symlink right after.
                folder_fd = os.open(name, _FOLDER_FLAGS, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno not in _NOT_A_FOLDER:
                    raise
                continue
            if name != folder:
                self._warn_once(
                    ("folder", folder),
                    "organize: %s is a symlink or not a folder; left alone, using %s instead",
                    self.root / folder,
                    name,
                )
            return name, folder_fd
        self._warn_once(
            ("folder", folder),
            "organize: %s and all its fallback names are symlinks or not folders;"
            " images are not placed there",
            self.root / folder,
        )
        return None

    def _warn_once(self, key: tuple[str, str], message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message, *args)

    def _place_in(
        self,
        folder_fd: int,
        directory: Path,
        source: Path,
        resolved: Path,
        source_stat: os.stat_result,
    ) -> Path:
        mode = self.options.mode
        temp: str | None = None
        try:
            for candidate in _candidates(source.name, str(resolved)):
                # Create first, look second: a name that exists is never re-examined for being
                # free, so two calls racing for it cannot both miss each other.
                if not _lexists(candidate, folder_fd):
                    try:
                        if mode == "symlink":
                            os.symlink(resolved, candidate, dir_fd=folder_fd)
                        elif not (mode == "link" and _hard_link(source, candidate, folder_fd)):
                            # One copy, reused if this name is lost to another image.
                            temp = temp or _copy_to_temp(source, folder_fd)
                            self._publish(temp, candidate, folder_fd)
                    except FileExistsError:
                        pass  # claimed since the check: by this very source, or another
                    except FileNotFoundError as exc:
                        if not source.exists():
                            raise _SourceGone("deleted before it could be placed") from exc
                        raise
                    else:
                        return directory / candidate
                if _holds(candidate, folder_fd, resolved, source_stat):
                    return directory / candidate  # placed by an earlier run, or concurrently
        finally:
            if temp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=folder_fd)
        # Every name, down to the full 40-hex one, belongs to another file: not ours to touch.
        raise FileExistsError(errno.EEXIST, "every candidate name is taken", str(directory))

    def _publish(self, temp: str, name: str, folder_fd: int) -> None:
        """Give the finished ``temp`` its final ``name`` without ever replacing an existing file:
        ``os.link`` fails if the name is taken, where ``os.replace`` would silently overwrite."""
        try:
            os.link(temp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            # No links on this filesystem: check and rename under a lock (safe within a process).
            with self._publish_lock:
                if _lexists(name, folder_fd):
                    raise FileExistsError(errno.EEXIST, "exists", name) from exc
                os.replace(temp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)


class _SourceGone(Exception):
    """The source vanished mid-placement: skip the image, it is not the run's problem."""


def _hard_link(source: Path, name: str, folder_fd: int) -> bool:
    """Hard-link ``source`` to ``name`` in ``folder_fd``; ``False`` when links are impossible
    here (cross-device, unsupported, not permitted, too many links), so the caller copies."""
    try:
        os.link(source, name, dst_dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return False
        raise
    return True


def _lexists(name: str, folder_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=folder_fd)
    except OSError:
        return False
    return True


def _folder_candidates(folder: str) -> list[str]:
    """The names a folder may take, best first: its own, then with a longer and longer hash of
    it (stable across runs). ``folder_name`` keeps names to 200 bytes, so these fit NAME_MAX."""
    digest = hashlib.sha1(folder.encode("utf-8"), usedforsecurity=False).hexdigest()
    return [folder] + [f"{folder}-{digest[:length]}" for length in (8, 16, 40)]


def _candidates(name: str, key: str) -> list[str]:
    """The names an image may take, best first: its own, then with a longer and longer hash of
    its resolved path (stable across runs, unlike ``-1``, ``-2``, … by arrival order)."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape"), usedforsecurity=False)
    hexdigest = digest.hexdigest()
    stem, suffix = os.path.splitext(name)
    names = [name]
    for length in (8, 16, 40):
        tail = f"-{hexdigest[:length]}{suffix}"
        names.append(_fit(stem, _MAX_NAME_BYTES - len(os.fsencode(tail))) + tail)
    return names


def _fit(text: str, room: int) -> str:
    """The longest prefix of ``text`` within ``room`` bytes as a file name, cut between
    characters; an undecodable byte (a lone surrogate from ``os.fsdecode``) is kept as is."""
    size = 0
    for index, char in enumerate(text):
        size += len(os.fsencode(char))
        if size > room:
            return text[:index]
    return text


def _holds(name: str, folder_fd: int, resolved: Path, source_stat: os.stat_result) -> bool:
    """Whether ``name`` in ``folder_fd`` already is this source: a symlink to it, the same
    inode, or a file with the same bytes (a copy from an earlier run)."""
    try:
        found = os.lstat(name, dir_fd=folder_fd)
        if stat.S_ISLNK(found.st_mode):
            return os.readlink(name, dir_fd=folder_fd) == str(resolved)
        if not stat.S_ISREG(found.st_mode):
            return False
        if (found.st_dev, found.st_ino) == (source_stat.st_dev, source_stat.st_ino):
            return True
        return found.st_size == source_stat.st_size and _same_bytes(name, folder_fd, resolved)
    except OSError as exc:
        # Gone, or swapped for a symlink since the lstat: either way not this source.
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return False
        raise


def _same_bytes(name: str, folder_fd: int, other: Path) -> bool:
    # No size+mtime shortcut: images unpacked from one archive often share both.
    first = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder_fd)
    with open(first, "rb") as a, other.open("rb") as b:
        while True:
            chunk = a.read(_CHUNK)
            if chunk != b.read(_CHUNK):
                return False
            if not chunk:
                return True


def _copy_to_temp(source: Path, folder_fd: int) -> str:
    """Copy ``source`` (bytes, permission bits and timestamps, like :func:`shutil.copy2`) to a
    fresh hidden temp name in ``folder_fd``, so the final name only ever appears complete."""
    try:
        reader = source.open("rb")
    except FileNotFoundError as exc:
        raise _SourceGone("deleted before it could be copied") from exc
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with reader:
        while True:
            temp = f".batchclassify-{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(temp, flags, 0o600, dir_fd=folder_fd)
            except FileExistsError:  # pragma: no cover - 64 random bits
                continue
            break
        try:
            with open(fd, "wb") as writer:
                shutil.copyfileobj(reader, writer, _CHUNK)
                writer.flush()
                info = os.fstat(reader.fileno())
                os.chmod(writer.fileno(), stat.S_IMODE(info.st_mode))
                # Last: writing and chmod would move the timestamps again.
                os.utime(writer.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
        except BaseException:
            os.unlink(temp, dir_fd=folder_fd)
            raise
    return temp


class OrganizeSink:
    """The :class:`~batchclassify.sinks.Sink` face of an :class:`Organizer`: each result
    written is placed in a worker thread (a few at a time, so the event loop never waits on
    the disk); :meth:`flush` waits for them. A placement that fails on the output side stops
    the run with :class:`RunAborted`: every further image would fail the same way."""

    def __init__(self, organizer: Organizer, *, max_pending: int = 8) -> None:
        self.organizer = organizer
        self.max_pending = max_pending
        #: images placed (into at least one folder) so far
        self.placed = 0
        self._pending: set[asyncio.Future[list[Path]]] = set()

    async def write(self, result: Result) -> None:
        path = Path(result.path) if result.path is not None else local_path(result.source)
        if path is None:
            return
        while len(self._pending) >= self.max_pending:
            done, self._pending = await asyncio.wait(
                self._pending, return_when=asyncio.FIRST_COMPLETED
            )
            self._collect(done)
        task = asyncio.ensure_future(asyncio.to_thread(self._place, result, path))
        self._pending.add(task)

    def _place(self, result: Result, path: Path) -> list[Path]:
        try:
            return self.organizer.place(result, path)
        except OSError as exc:
            raise RunAborted(
                f"cannot place {result.source} into --organize {self.organizer.root}: {exc}"
            ) from exc

    def _collect(self, done: set[asyncio.Future[list[Path]]]) -> None:
        # Look at every task, not only up to the first error: an unretrieved one warns later.
        first: BaseException | None = None
        for task in done:
            error = task.exception()
            if error is None:
                self.placed += bool(task.result())
            elif first is None:
                first = error
        if first is not None:
            raise first

    async def flush(self) -> None:
        if self._pending:
            done, self._pending = await asyncio.wait(self._pending)
            self._collect(done)

    async def aclose(self) -> None:
        await self.flush()
