"""Every file a run will write, checked before the first request.

A mistake in a path must cost nothing: not a credit spent, not a user's file overwritten. So
before anything is sent, :func:`check_paths` makes sure that the outputs, the state (and its
``-wal``, ``-shm`` and ``.lock`` companions), the summary and the ``--organize`` folder

- are pairwise distinct, also when one file goes by two names (symbolic or hard links),
- have an existing parent folder in which a file can really be created (a probe file is created
  and removed: permissions, read-only mounts and pseudo-filesystems such as ``/proc`` all show),
- are not folders (files) or not files (the organize folder).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from batchclassify.errors import ConfigError

__all__ = ["PlannedPath", "check_paths", "state_companions"]


@dataclass(frozen=True, slots=True)
class PlannedPath:
    """A path the run will write, and what it is for, as the user would name it."""

    path: Path
    role: str
    folder: bool = False


def state_companions(state: Path) -> list[PlannedPath]:
    """The state file and the files SQLite and the lock keep beside it."""
    return [
        PlannedPath(state, f"--state {state}"),
        *(
            PlannedPath(Path(f"{state}{suffix}"), f"the state's {suffix} file")
            for suffix in ("-wal", "-shm", ".lock")
        ),
    ]


def check_paths(planned: Iterable[PlannedPath]) -> None:
    """Raise :class:`ConfigError` naming the first path that cannot be written as planned."""
    seen: dict[object, PlannedPath] = {}
    probed: set[str] = set()
    for entry in planned:
        _check_kind(entry)
        parent = entry.path.parent
        if not parent.is_dir():
            raise ConfigError(f"the folder of {entry.role} ({str(parent)!r}) does not exist")
        if str(parent) not in probed:
            _probe(parent, entry)
            probed.add(str(parent))
        for identity in _identities(entry.path):
            other = seen.get(identity)
            if other is not None:
                raise ConfigError(
                    f"{entry.role} and {other.role} are the same file: give each its own name"
                )
            seen[identity] = entry


def _check_kind(entry: PlannedPath) -> None:
    path = entry.path
    if entry.folder:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{entry.role} is a file, not a folder")
    elif path.is_dir():
        raise ConfigError(f"{entry.role} is a folder, not a file")


def _identities(path: Path) -> list[object]:
    """What makes two names one file: the resolved path, and for an existing file its inode."""
    found: list[object] = [os.path.realpath(path)]
    try:
        info = path.stat()
    except OSError:
        return found
    found.append((info.st_dev, info.st_ino))
    return found


def _probe(folder: Path, entry: PlannedPath) -> None:
    try:
        descriptor, name = tempfile.mkstemp(prefix=".batchclassify-probe-", dir=folder)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {entry.role}: no file can be created in {str(folder)!r} "
            f"({exc.strerror or exc})"
        ) from None
    os.close(descriptor)
    os.unlink(name)
