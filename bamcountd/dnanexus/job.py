"""The applet's entry points (DNAnexus job mode): ``main``, ``count_shards`` and ``gather``.

``main`` counts with the core and uploads the seed's ``count_file``, bamcountd's JSON and the
total.  With ``input_mode`` ``stream`` (the default) samtools reads the file's byte ranges
over a preauthenticated download URL and the index is fetched small; ``download`` downloads
the inputs first.  A stream that fails for a reason a download fixes (the URL cannot be read as
samtools needs: :class:`~bamcountd.errors.RemoteUnsupported`, or the download server keeps
failing: :class:`~bamcountd.errors.RemoteUnavailable`) is counted again from a download, which
the log and the JSON's notes say.  For big BAMs (``scatter``) it balances whole references
across ``count_shards`` subjobs by the index's own totals and hands their outputs, as
job-based object references, to a ``gather`` subjob; the platform runs the subjobs on their
own workers and resolves the references, so DNAnexus is the distributed engine.

Errors: bad input (not a BAM, truncated, unknown region, bad option) is the platform's
``AppError``; a tool failure is ``AppInternalError``; both carry the core's message, which quotes
samtools' own words.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from bamcountd import logs
from bamcountd.count import CountRequest, CountResult, RegionCount, count_bam_sync
from bamcountd.dnanexus.applet import options_from_inputs
from bamcountd.dnanexus.local import prefix_of
from bamcountd.dnanexus.model import DxFile, Json
from bamcountd.dnanexus.platform import AppError, AppInternalError, Platform, dxlink, register_entry_points
from bamcountd.errors import (
    PERMANENT,
    BadOption,
    BamcountdError,
    InputError,
    RemoteUnavailable,
    RemoteUnsupported,
    classify,
)
from bamcountd.options import CountOptions, Filters
from bamcountd.plan import default_region
from bamcountd.report import render, write_atomic

log = structlog.get_logger("bamcountd.dnanexus")

#: BAMs at least this big are scattered over subjobs unless the ``scatter`` input says otherwise.
SCATTER_BYTES = 50 * 1024**3
#: Most ``count_shards`` subjobs per BAM when ``scatter_jobs`` is not given.
SCATTER_JOBS = 8
#: How long a stream's download URLs last: longer than a job may run (dxapp.json: 24 hours).
URL_SECONDS = 48 * 3600
#: The applet's ``input_mode`` values.
INPUT_MODES = ("stream", "download")


#: Inside a job: dxpy's defaults for retries (the platform's own settings for a job).
_platform = Platform()


@contextmanager
def _app_errors() -> Iterator[None]:
    """Re-raise bamcountd's errors as the platform's: AppError for bad data, else AppInternalError."""
    try:
        yield
    except BamcountdError as error:
        # The user's to fix (the data, or the job's inputs): AppError, which is never retried.
        if classify(error) == PERMANENT or isinstance(error, InputError):
            raise AppError(str(error)) from None
        raise AppInternalError(str(error)) from None


def _setup() -> Path:
    logs.configure(level=os.environ.get("BAMCOUNTD_LOG_LEVEL", "info"), json=True)
    home = Path(os.environ.get("HOME", ".")).resolve()
    return home


def _fresh_index(bam: Path, index: Path | None) -> Path | None:
    # Downloads set mtimes in download order; the core rebuilds an index "older" than its BAM,
    # so give the given index the BAM's time when it is older only because of the download.
    if index is not None and index.stat().st_mtime < bam.stat().st_mtime:
        stat = bam.stat()
        os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return index


def _upload_results(result: CountResult, prefix: str, out: Path) -> Json:
    out.mkdir(parents=True, exist_ok=True)
    count_file = out / f"{prefix}_count.txt"
    counts_json = out / f"{prefix}.counts.json"
    write_atomic(count_file, render(result, "seed").encode())
    write_atomic(counts_json, render(result, "json").encode())
    return {
        "count_file": dxlink(_platform.upload(count_file)),
        "counts_json": dxlink(_platform.upload(counts_json)),
        "total_reads": result.total,
    }


def main(
    *,
    mappings_bam: Json,
    index_file: Json | None = None,
    reference_fasta: Json | None = None,
    input_mode: str = "stream",
    scatter: bool | None = None,
    scatter_jobs: int = SCATTER_JOBS,
    **count_inputs: Any,
) -> Json:
    """The count of one BAM; ``count_inputs`` are the options table's applet inputs (-F, -f, -q, -j)."""
    home = _setup()
    try:
        options = options_from_inputs(count_inputs, base=CountOptions(index_cache=home / "index-cache"))
    except BadOption as error:
        raise AppError(str(error)) from None
    if scatter_jobs < 1:
        raise AppError(f"scatter_jobs must be at least 1, not {scatter_jobs}")
    if input_mode not in INPUT_MODES:
        raise AppError(f"input_mode must be one of {', '.join(INPUT_MODES)}, not {input_mode!r}")
    with _app_errors():
        bam_file = _platform.describe_input(mappings_bam)
    scattered = scatter if scatter is not None else bam_file.size >= SCATTER_BYTES
    log.info("job_started", bam=bam_file.name, size=bam_file.size, scatter=scattered, mode=input_mode)
    prefix = prefix_of(bam_file.name)
    if scattered:  # the subjobs download (scatter by shards over streams is not built yet)
        request = _downloaded(options)
        return _scatter(request, mappings_bam, index_file, prefix, scatter_jobs)
    notes: tuple[str, ...] = ()
    if reference_fasta is not None:
        # A count decodes no bases (the core asks samtools for FLAG, RNAME, POS, MAPQ, CIGAR
        # only), so a reference is never read: not downloading it saves gigabytes.
        notes = ("reference_fasta was not read: counting decodes no bases, so it needs no reference",)
    result: CountResult | None = None
    if input_mode == "stream" and index_file is None:
        # Without an index one must be built, which reads the whole file: download it once.
        notes += ("no index_file was given: the file was downloaded, since building its index reads all of it",)
        log.info("downloading", reason=notes[-1])
    elif input_mode == "stream" and index_file is not None:
        with _app_errors():
            try:
                result = _count_streamed(mappings_bam, bam_file, index_file, options)
            except (RemoteUnavailable, RemoteUnsupported) as error:
                notes += (f"streaming failed ({error}); the file was downloaded and counted from the download",)
                log.warning("stream_failed", failure=str(error), fallback="download")
    if result is None:
        request = _downloaded(options)
        with _app_errors():
            result = count_bam_sync(request)
    # The JSON names the BAM as the platform knows it, not a download path or a URL.
    index = None if result.index is None else Path(result.index.name)
    result = replace(result, bam=Path(bam_file.name), index=index, notes=(*result.notes, *notes))
    return _upload_results(result, prefix, home / "out")


def _downloaded(options: CountOptions) -> CountRequest:
    inputs = _platform.download_inputs(exclude=("reference_fasta",))
    bam = Path(inputs["mappings_bam_path"])
    index = _fresh_index(bam, Path(inputs["index_file_path"]) if "index_file_path" in inputs else None)
    return CountRequest.of(bam, replace(options, index=index))


def _count_streamed(mappings_bam: Json, bam_file: DxFile, index_file: Json, options: CountOptions) -> CountResult:
    """The count over preauthenticated URLs of the file and its index (fetched whole: it is small).

    :raises BamcountdError: as :func:`~bamcountd.count.count_bam`
    """
    index = _platform.describe_input(index_file)
    bam_url = _platform.download_url(mappings_bam, project=bam_file.project, duration=URL_SECONDS)
    index_url = _platform.download_url(index_file, project=index.project, duration=URL_SECONDS)
    result = count_bam_sync(CountRequest.of(bam_url, replace(options, index=index_url)))
    return replace(result, index=Path(index.name), index_url=None)


def _scatter(request: CountRequest, bam_link: Json, index_link: Json | None, prefix: str, scatter_jobs: int) -> Json:
    # The index's own per-reference totals (no reads are read) weigh the references.
    with _app_errors():
        totals = count_bam_sync(
            CountRequest(bam=request.bam, index=request.index, method="index", index_cache=request.index_cache)
        )
    assert totals.index is not None  # --method index always counts through one
    if index_link is None:  # built here: share it so no worker builds it again
        index_link = dxlink(_platform.upload(totals.index))
    bins = balance([(r.region, r.count) for r in totals.regions], scatter_jobs)
    with _app_errors():  # a name samtools cannot address fails here as it would in a single job
        texts = [[default_region(label).samtools_arg() for label in labels] for labels in bins]
    filters = request.filters.as_dict()
    subjobs = [
        _platform.new_subjob(
            "count_shards",
            {
                "mappings_bam": bam_link,
                "index_file": index_link,
                "regions": regions,
                "filters": filters,
                "jobs": request.jobs,
            },
            name=f"count {len(regions)} references",
        )
        for regions in texts
    ]
    gather_job = _platform.new_subjob(
        "gather",
        {
            "labels": bins,
            "order": [r.region for r in totals.regions],
            "parts": [_platform.output_ref(job, "counts") for job in subjobs],
            "samtools": [_platform.output_ref(job, "samtools") for job in subjobs],
            "prefix": prefix,
            "bam_name": request.bam.name,
            "index_name": request.index.name if request.index is not None else request.bam.name + totals.index.suffix,
            "filters": filters,
            "jobs": request.jobs,
            "started": time.time(),
        },
        name="gather counts",
    )
    log.info("scattered", subjobs=len(subjobs), references=len(totals.regions), gather=gather_job)
    return {field: _platform.output_ref(gather_job, field) for field in ("count_file", "counts_json", "total_reads")}


def balance(weighted: list[tuple[str, int]], bins: int) -> list[list[str]]:
    """Longest-processing-time packing: heaviest first, each into the lightest bin; order kept."""
    order = {name: k for k, (name, _) in enumerate(weighted)}
    loads: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, min(bins, len(weighted))))]
    for name, weight in sorted(weighted, key=lambda item: -item[1]):
        lightest = min(range(len(loads)), key=lambda k: loads[k][0])
        load, names = loads[lightest]
        loads[lightest] = (load + weight, [*names, name])
    return [sorted(names, key=order.__getitem__) for _, names in loads if names]


def count_shards(*, mappings_bam: Json, index_file: Json, regions: list[str], filters: Json, jobs: int) -> Json:
    home = _setup()
    work = home / "shard"
    work.mkdir(parents=True, exist_ok=True)
    bam = work / "input.bam"
    index = work / "input.bam.bai"
    _platform.download(mappings_bam, bam)
    _platform.download(index_file, index)
    csi = _index_kind(index)
    if csi:
        index = index.rename(work / "input.bam.csi")
    _fresh_index(bam, index)
    request = CountRequest(
        bam=bam, regions=tuple(regions), index=index, filters=Filters(**filters), jobs=jobs, build_index=False
    )
    with _app_errors():
        result = count_bam_sync(request)
    log.info("shard_counted", regions=len(regions), total=result.total)
    return {"counts": [r.count for r in result.regions], "samtools": result.samtools_version}


def _index_kind(index: Path) -> bool:
    """True for a CSI index (gzip-compressed, ``CSI\\1``), False for a BAI (``BAI\\1``)."""
    with index.open("rb") as handle:
        return handle.read(4) != b"BAI\x01"


def gather(
    *,
    labels: list[list[str]],
    order: list[str],
    parts: list[list[int]],
    samtools: list[str],
    prefix: str,
    bam_name: str,
    index_name: str,
    filters: Json,
    jobs: int,
    started: float,
) -> Json:
    home = _setup()
    counts: dict[str, int] = {}
    for names, numbers in zip(labels, parts, strict=True):
        if len(names) != len(numbers):
            raise AppInternalError(f"a subjob returned {len(numbers)} counts for {len(names)} regions")
        counts.update(zip(names, numbers, strict=True))
    if sorted(counts) != sorted(order):
        raise AppInternalError("the subjobs' regions do not cover the BAM's references exactly once")
    result = CountResult(
        bam=Path(bam_name),
        total=sum(counts.values()),
        regions=tuple(RegionCount(name, counts[name]) for name in order),
        filters=Filters(**filters),
        samtools_version=samtools[0] if samtools else "",
        jobs=jobs,
        threads=0,
        method="view",
        shards=len(parts),
        index=Path(index_name),
        seconds=max(time.time() - started, 0.0),
    )
    log.info("gathered", subjobs=len(parts), total=result.total)
    return _upload_results(result, prefix, home / "out")


ENTRY_POINTS: dict[str, Callable[..., Json]] = {"main": main, "count_shards": count_shards, "gather": gather}
# dxpy.run() looks entry points up in its own table; the decorator form would hide the types.
register_entry_points(ENTRY_POINTS)
