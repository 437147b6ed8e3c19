"""Result files: where a BAM's result goes, what it says, and writing it safely.

``RESULTS/<path relative to the watch folder, minus .bam>.counts.json`` holds the JSON of
``bamcountd count --format json`` plus ``source`` (the BAM's path, size, mtime, inode) and
``bamcountd`` (the version).  A BAM that cannot be counted gets ``.error.json`` instead.
Every file is written atomically (:func:`bamcountd.report.write_atomic`), and only inside
the results folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bamcountd import __version__
from bamcountd.count import CountResult
from bamcountd.report import json_text, render, write_atomic
from bamcountd.service.config import EXTRA_FORMATS
from bamcountd.service.ledger import Identity
from bamcountd.service.watch import WatchRoot

COUNTS_SUFFIX = ".counts.json"
ERROR_SUFFIX = ".error.json"
#: The temp names write_atomic leaves behind if the process dies mid-write.
_TEMP_NAME = re.compile(r"\A\..+\.(counts\.json|counts\.tsv|counts\.txt|error\.json)\..+\.tmp\Z", re.DOTALL)


class OutsideResults(OSError):
    """A result path would leave the results folder (a symlinked sub-folder)."""


def result_base(results: Path, root: WatchRoot, bam: Path) -> Path:
    """``RESULTS[/prefix]/<relative path minus .bam>``: add a suffix to get a result file."""
    relative = bam.relative_to(root.path)
    stem = relative.with_name(relative.name[: -len(".bam")])
    return results / root.prefix / stem if root.prefix else results / stem


def source_document(bam: Path, identity: Identity) -> dict[str, Any]:
    return {
        "path": os.fsdecode(bam),
        "size": identity.size,
        "mtime": datetime.fromtimestamp(identity.mtime_ns / 1e9, UTC).isoformat(),
        "mtime_ns": identity.mtime_ns,
        "inode": identity.inode,
        "device": identity.dev,
    }


def counts_document(result: CountResult, bam: Path, identity: Identity) -> dict[str, Any]:
    return {**result.as_dict(), "source": source_document(bam, identity), "bamcountd": __version__}


def error_document(bam: Path, identity: Identity, *, reason: str, attempts: int, kind: str) -> dict[str, Any]:
    return {
        "error": reason,
        "kind": kind,
        "attempts": attempts,
        "source": source_document(bam, identity),
        "bamcountd": __version__,
    }


def encode(document: dict[str, Any]) -> bytes:
    """As ``count --format json`` writes it; a name that is not UTF-8 is kept as ``\\udcXX``
    escapes, which Python's ``json`` and ``os.fsencode`` turn back into the exact bytes."""
    return json_text(document).encode()


def write_counts(
    base: Path, results: Path, result: CountResult, document: dict[str, Any], formats: Sequence[str]
) -> Path:
    """Write the result files (extra formats first, the JSON last) and drop a stale error file."""
    folder = _folder(base, results)
    for fmt in formats:
        text = render(result, fmt).encode("utf-8", "surrogateescape")
        write_atomic(folder / (base.name + EXTRA_FORMATS[fmt]), text)
    target = folder / (base.name + COUNTS_SUFFIX)
    write_atomic(target, encode(document))
    (folder / (base.name + ERROR_SUFFIX)).unlink(missing_ok=True)
    return target


def write_error(base: Path, results: Path, document: dict[str, Any]) -> Path:
    """Write the error file and drop results of an earlier version of the BAM (now stale)."""
    folder = _folder(base, results)
    target = folder / (base.name + ERROR_SUFFIX)
    write_atomic(target, encode(document))
    for suffix in (COUNTS_SUFFIX, *EXTRA_FORMATS.values()):
        (folder / (base.name + suffix)).unlink(missing_ok=True)
    return target


def _folder(base: Path, results: Path) -> Path:
    """Create the result's folder below ``results`` one level at a time, refusing symlinks, so
    no result is ever written (and no folder made) outside the results folder."""
    current = results
    for part in base.parent.relative_to(results).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            current.mkdir()
        if current.is_symlink() or not current.is_dir():
            raise OutsideResults(errno.ENOTDIR, f"{current} is a symlink or not a folder; results stay in {results}")
    return current


def sweep_temporaries(results: Path) -> int:
    """Remove result temp files left by a crash mid-write (only names write_atomic makes here)."""
    removed = 0
    for folder, _, names in os.walk(results):
        for name in names:
            if _TEMP_NAME.match(name):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed
