"""Result files: where a BAM's result goes, what it says, and writing it safely.

``RESULTS/<path relative to the watch folder, minus .bam>.counts.json`` holds the JSON of
``bamcountd count --format json`` plus ``source`` (the BAM's path, size, mtime, inode) and
``bamcountd`` (the version).  A BAM that cannot be counted gets ``.error.json`` instead.
Every file is written atomically (:func:`bamcountd.report.write_atomic`), and only inside
the results folder.  A result already in place for the same bytes and settings is adopted
(:func:`adopt`) rather than counted again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from bamcountd import __version__, indexcache, plan, samtools
from bamcountd.count import CountRequest, CountResult
from bamcountd.errors import BamcountdError
from bamcountd.inputs import cached_index_path
from bamcountd.ledger import Entry, Ledger
from bamcountd.report import json_text, render, write_atomic
from bamcountd.service.config import EXTRA_FORMATS, ServiceConfig
from bamcountd.service.watch import Identity, WatchRoot
from bamcountd.urls import redact

log = structlog.get_logger("bamcountd.service")

COUNTS_SUFFIX = ".counts.json"
ERROR_SUFFIX = ".error.json"
#: The temp names write_atomic leaves behind if the process dies mid-write.
_TEMP_NAME = re.compile(r"\A\..+\.(counts\.json|counts\.tsv|counts\.txt|error\.json)\..+\.tmp\Z", re.DOTALL)


class OutsideResults(OSError):
    """A result path would leave the results folder (a symlinked sub-folder)."""


def result_base(results: Path, root: WatchRoot, bam: Path) -> Path:
    """``RESULTS[/prefix]/<relative path minus .bam>`` (a CRAM keeps its ``.cram``, so that
    ``x.bam`` and ``x.cram`` side by side get results of their own): add a suffix to get a
    result file."""
    relative = bam.relative_to(root.path)
    stem = relative.with_name(relative.name[: -len(".bam")]) if relative.name.endswith(".bam") else relative
    return results / root.prefix / stem if root.prefix else results / stem


def source_document(bam: Path, identity: str) -> dict[str, Any]:
    identity = Identity(identity)
    return {
        "path": os.fsdecode(bam),
        "size": identity.stat.size,
        "mtime": datetime.fromtimestamp(identity.stat.mtime_ns / 1e9, UTC).isoformat(),
        "mtime_ns": identity.stat.mtime_ns,
        "inode": identity.stat.inode,
        "device": identity.stat.dev,
    }


def counts_document(result: CountResult, bam: Path, identity: str) -> dict[str, Any]:
    return {**result.as_dict(), "source": source_document(bam, identity), "bamcountd": __version__}


def error_document(bam: Path, identity: str, *, reason: str, attempts: int, kind: str) -> dict[str, Any]:
    return {
        "error": redact(reason),  # a reference server's or a tool's words may quote a URL
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


async def adopt(
    entry: Entry,
    base: Path,
    config: ServiceConfig,
    ledger: Ledger,
    limiter: anyio.CapacityLimiter,
    *,
    changed: Callable[[Entry], bool],
) -> bool:
    """Mark the file done without counting it if its result is already in place: what a
    crash between the result's rename and the ``done`` commit leaves (see ledger.py).
    True if nothing is left to do (adopted, or the file changed meanwhile: ``changed``
    checks and records that)."""
    target = base.with_name(base.name + COUNTS_SUFFIX)
    reason = await _not_adoptable(entry, target, config, limiter)
    if reason is not None:
        if reason != "no result":
            log.info("result_not_adopted", result=os.fsdecode(target), reason=reason, action="counting it again")
        return False
    if changed(entry):
        return True
    ledger.finish(entry.path, entry.identity)
    log.info("result_adopted", result=os.fsdecode(target), reason="this file's result is already in place")
    own = config.state / "index"
    for csi, cram in indexcache.INDEX_KINDS:
        with contextlib.suppress(OSError):
            built = cached_index_path(entry.path, own, csi=csi, cram=cram)
            indexcache.drop_built(built, config.count.index_cache, own)
    return True


async def _not_adoptable(
    entry: Entry, target: Path, config: ServiceConfig, limiter: anyio.CapacityLimiter
) -> str | None:
    """Why the result file at ``target`` is not this file's result under the current
    settings, or None if it is: same BAM (path, device, inode, size, mtime), same read
    filters, same regions, a well-formed count, and the extra formats in place."""
    try:
        document = json.loads(await anyio.Path(target).read_bytes())
    except FileNotFoundError:
        return "no result"
    except (OSError, ValueError) as error:
        return f"unreadable result ({error})"
    try:
        source = document["source"]
        wanted = source_document(entry.path, entry.identity)
        for key in ("path", "device", "inode", "size", "mtime_ns"):
            if source[key] != wanted[key]:
                return f"the result is of another file (source {key} differs)"
        request = CountRequest.of(entry.path, config.count)
        if document["filters"] != request.filters.as_dict():
            return "the result was counted with other filters"
        counts = [region["count"] for region in document["regions"]]
        labels = [region["region"] for region in document["regions"]]
        if not all(type(n) is int and n >= 0 for n in counts) or document["total"] != sum(counts):
            return "the result's counts are malformed"
    except (KeyError, TypeError) as error:
        return f"the result is malformed ({type(error).__name__}: {error})"
    for suffix in (EXTRA_FORMATS[fmt] for fmt in config.formats):
        extra = target.with_name(target.name[: -len(COUNTS_SUFFIX)] + suffix)
        try:
            if os.lstat(extra).st_mtime_ns < Identity(entry.identity).stat.mtime_ns:
                return f"{extra.name} is older than the file"
        except OSError:
            return f"{extra.name} is missing"
    # The regions the current settings give for this BAM (every reference and '*' by default).
    try:
        executable = samtools.find(request.samtools)
        async with limiter:
            header = await samtools.read_header(executable, entry.path)
        regions = plan.resolve_regions(header, request.regions, request.regions_file)
    except (BamcountdError, OSError) as error:
        return f"cannot resolve the regions ({error})"
    if [region.label for region in regions] != labels:
        return "the result was counted over other regions"
    return None
