"""Finding BAMs under the watch folders: full scans and file events.

Events (``watchfiles``, inotify underneath) make the daemon quick; the periodic full scan
makes it correct, since events are lost on queue overflow, on network file systems and while
the daemon is not running.  Both follow the same rules:

* a candidate is a ``*.bam`` or ``*.cram`` file whose name and folders are not hidden (``.name``); partial
  names such as ``x.bam.part`` or ``x.bam.tmp`` do not end in ``.bam`` and are skipped;
* symbolic links are never followed, neither files nor folders, so nothing outside a watch
  folder is ever read through one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Self

import anyio
import structlog

from bamcountd.ledger import file_identity

log = structlog.get_logger("bamcountd.service")


class FileStat(NamedTuple):
    dev: int
    inode: int
    size: int
    mtime_ns: int


class Identity(str):
    """What makes a watched file *this* file (device, inode, size, mtime): its ledger identity,
    ``dev:inode:size:mtime_ns``.  A replaced or rewritten file has another identity."""

    __slots__ = ()

    def __new__(
        cls, text: str | None = None, *, dev: int = 0, inode: int = 0, size: int = 0, mtime_ns: int = 0
    ) -> Self:
        return super().__new__(
            cls, file_identity(dev=dev, inode=inode, size=size, mtime_ns=mtime_ns) if text is None else text
        )

    @classmethod
    def of(cls, info: os.stat_result) -> Identity:
        return cls(dev=info.st_dev, inode=info.st_ino, size=info.st_size, mtime_ns=info.st_mtime_ns)

    @property
    def stat(self) -> FileStat:
        """The numbers it is made of."""
        return FileStat(*map(int, self.split(":")))


@dataclass(frozen=True)
class WatchRoot:
    """A watch folder (absolute, symlinks resolved) and its results sub-folder ('' for one root)."""

    path: Path
    prefix: str


#: What the daemon counts: BAMs and CRAMs.
SUFFIXES = (".bam", ".cram")


def is_candidate_name(name: str) -> bool:
    return not name.startswith(".") and any(name.endswith(s) and len(name) > len(s) for s in SUFFIXES)


def scan(root: Path) -> Iterator[Path]:
    """Every candidate BAM under ``root``, recursively, without following symlinks."""
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:  # vanished or unreadable: the next scan tries again
            log.warning("scan_failed", folder=os.fsdecode(folder), error=error.strerror)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and is_candidate_name(entry.name):
                    yield Path(entry.path)
            except OSError:
                continue


def locate(roots: Sequence[WatchRoot], path: Path) -> WatchRoot | None:
    """The root ``path`` is a candidate under, or None (outside, hidden, symlinked, not a BAM)."""
    if not is_candidate_name(path.name):
        return None
    for root in roots:
        try:
            relative = path.relative_to(root.path)
        except ValueError:
            continue
        if any(part.startswith(".") for part in relative.parts):
            return None
        # lstat every component below the root: a symlinked folder or file is never followed.
        current = root.path
        for part in relative.parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except OSError:
                return root  # gone: the caller finds out and drops it
            if stat.S_ISLNK(mode):
                return None
        return root
    return None


async def events(roots: Sequence[WatchRoot], stop: anyio.Event) -> AsyncIterator[set[Path]]:
    """Batches of candidate paths that changed (added, modified, deleted), until ``stop``."""
    import watchfiles

    def wanted(_change: watchfiles.Change, path: str) -> bool:
        return is_candidate_name(os.path.basename(path))

    async for changes in watchfiles.awatch(
        *(root.path for root in roots),
        watch_filter=wanted,
        stop_event=stop,
        debounce=200,
        step=50,
        recursive=True,
        ignore_permission_denied=True,
    ):
        yield {Path(path) for _, path in changes}
