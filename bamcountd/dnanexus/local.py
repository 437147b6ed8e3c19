"""dx-watch's ``--local`` count of one BAM: download it (and its index), count here, upload the results.

What to count, and what a failure means for the BAM, is :mod:`.watch`'s to decide; this module
does the one count and reports how it went.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bamcountd.count import CountRequest, CountResult, count_bam_sync
from bamcountd.errors import PERMANENT, BamcountdError, classify
from bamcountd.report import render, write_atomic

if TYPE_CHECKING:
    from bamcountd.dnanexus.model import SourceBam
    from bamcountd.dnanexus.platform import Platform


@dataclass(frozen=True)
class Counted:
    result_id: str  # the uploaded count_file
    total: int


@dataclass(frozen=True)
class CountFailed:
    message: str  # ``Type: message``, naming the BAM as the platform knows it
    permanent: bool  # the file's content is at fault: no retry can fix it


def count_and_upload(
    platform: Platform,
    bam: SourceBam,
    request: Callable[[Path, Path | None], CountRequest],
    *,
    scratch: Path,
    project: str,
    folder: str,
    properties: Mapping[str, str],
) -> Counted | CountFailed:
    """Count ``bam`` in a scratch folder and upload its ``.counts.json`` and then its ``_count.txt``
    (with ``properties``) into ``project:folder``; a count that failed uploads nothing."""
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="bam-") as work:
        local_bam = Path(work) / ("input.cram" if bam.name.endswith(".cram") else "input.bam")
        platform.download(bam.id, local_bam, project=bam.project)
        local_index = None
        if bam.index is not None:
            # htslib tells .bai from .csi by the file name, so keep the source's suffix.
            suffix = next((s for s in (".csi", ".crai") if bam.index_name.endswith(s)), ".bai")
            local_index = Path(work) / f"{local_bam.name}{suffix}"
            platform.download(bam.index, local_index, project=bam.project)
            os.utime(local_index, ns=(time.time_ns(), local_bam.stat().st_mtime_ns + 1))
        try:
            result = count_bam_sync(request(local_bam, local_index))
        except BamcountdError as error:
            permanent = classify(error) == PERMANENT  # a fatal error, too, is retried, then fails the BAM
            return CountFailed(f"{type(error).__name__}: {_named(error, local_bam, bam.name)}", permanent)
        prefix = prefix_of(bam.name)
        result = _renamed(result, bam.name)
        count_file = Path(work) / f"{prefix}_count.txt"
        counts_json = Path(work) / f"{prefix}.counts.json"
        write_atomic(count_file, render(result, "seed").encode())
        write_atomic(counts_json, render(result, "json").encode())
        uploaded = [
            platform.upload(path, project=project, folder=folder, properties=properties, wait_on_close=True)
            for path in (counts_json, count_file)  # count_file last: its presence means "both there"
        ]
    return Counted(uploaded[-1], result.total)


def prefix_of(name: str) -> str:
    """A BAM's or CRAM's name without its suffix: the result files' prefix."""
    for suffix in (".bam", ".cram"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _named(error: BaseException, local: Path, name: str) -> str:
    return str(error).replace(str(local), name)


def _renamed(result: CountResult, name: str) -> CountResult:
    # The JSON names the BAM as the user knows it, not the scratch copy.
    return replace(result, bam=Path(name))
