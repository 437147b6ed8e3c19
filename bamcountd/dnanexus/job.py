"""The applet's entry points (DNAnexus job mode): ``main``, ``count_shards`` and ``gather``.

``main`` counts with the core and uploads the seed's ``count_file``, bamcountd's JSON and the
total.  With ``input_mode`` ``stream`` (the default) samtools reads the file's byte ranges
over a preauthenticated download URL and the index is fetched small; ``download`` downloads
the inputs first.  A stream that fails for a reason a download fixes (the URL cannot be read as
samtools needs: :class:`~bamcountd.errors.RemoteUnsupported`, or the download server keeps
failing: :class:`~bamcountd.errors.RemoteUnavailable`) is counted again from a download, which
the log and the JSON's notes say.  For big BAMs (``scatter``) ``main`` plans the count into
its exact shards (:func:`~bamcountd.count.plan_count`), spreads the shards (not references: one
reference may span several subjobs) over ``count_shards`` subjobs by their expected records, one
per :data:`SCATTER_BYTES_PER_JOB` of the file, at least two, at most ``scatter_jobs``; each
counts its shards in the job's input mode (a stream reads only their byte ranges) through
:func:`~bamcountd.count.count_part`, and ``gather`` sums and verifies them as a single job does
(:func:`~bamcountd.count.gather_counts`).  Their outputs travel as job-based object references;
the platform runs the subjobs on their own workers and resolves the references, so DNAnexus is
the distributed engine.

Errors: bad input (not a BAM, truncated, unknown region, bad option) is the platform's
``AppError``; a tool failure is ``AppInternalError``; both carry the core's message, which quotes
samtools' own words.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from bamcountd import logs
from bamcountd.count import (
    CountPlan,
    CountRequest,
    CountResult,
    ShardCounts,
    available_cores,
    choose_parallelism,
    count_bam_sync,
    count_part_sync,
    gather_counts,
    plan_count_sync,
)
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
from bamcountd.options import CountOptions
from bamcountd.report import render, write_atomic

log = structlog.get_logger("bamcountd.dnanexus")

#: BAMs at least this big are scattered over subjobs unless the ``scatter`` input says otherwise.
SCATTER_BYTES = 50 * 1024**3
#: A scattered file gets one ``count_shards`` subjob per this many bytes (README: DNAnexus).
SCATTER_BYTES_PER_JOB = 10 * 1024**3
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
    options = _options(count_inputs, home)
    if scatter_jobs < 1:
        raise AppError(f"scatter_jobs must be at least 1, not {scatter_jobs}")
    if input_mode not in INPUT_MODES:
        raise AppError(f"input_mode must be one of {', '.join(INPUT_MODES)}, not {input_mode!r}")
    with _app_errors():
        bam_file = _platform.describe_input(mappings_bam)
    scattered = scatter if scatter is not None else bam_file.size >= SCATTER_BYTES
    log.info("job_started", bam=bam_file.name, size=bam_file.size, scatter=scattered, mode=input_mode)
    prefix = prefix_of(bam_file.name)
    notes: tuple[str, ...] = ()
    if reference_fasta is not None:
        # A count decodes no bases (the core asks samtools for FLAG, RNAME, POS, MAPQ, CIGAR
        # only), so a reference is never read: not downloading it saves gigabytes.
        notes = ("reference_fasta was not read: counting decodes no bases, so it needs no reference",)
    if scattered:
        spread = _scatter(
            mappings_bam, bam_file, index_file, options, count_inputs, input_mode, prefix, scatter_jobs, notes
        )
        if spread is not None:
            return spread
    result = _count_one(mappings_bam, bam_file, index_file, options, input_mode, notes, lambda: _downloaded(options))
    return _upload_results(result, prefix, home / "out")


def _options(count_inputs: Json, home: Path) -> CountOptions:
    try:
        return options_from_inputs(count_inputs, base=CountOptions(index_cache=home / "index-cache"))
    except BadOption as error:
        raise AppError(str(error)) from None


def _count_one(
    mappings_bam: Json,
    bam_file: DxFile,
    index_file: Json | None,
    options: CountOptions,
    input_mode: str,
    notes: tuple[str, ...],
    download: Callable[[], CountRequest],
) -> CountResult:
    """A single job's count: streamed, or from a download (``download``), named as the platform names it."""
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
                notes += (_fallback_note(error, "the file was downloaded and counted from the download"),)
                log.warning("stream_failed", failure=str(error), fallback="download")
    if result is None:
        request = download()
        with _app_errors():
            result = count_bam_sync(request)
    # The JSON names the BAM as the platform knows it, not a download path or a URL.
    index = None if result.index is None else Path(result.index.name)
    return replace(result, bam=Path(bam_file.name), index=index, notes=(*result.notes, *notes))


def _fallback_note(error: BamcountdError, then: str) -> str:
    return f"streaming failed ({error}); {then}"


def _downloaded(options: CountOptions) -> CountRequest:
    inputs = _platform.download_inputs(exclude=("reference_fasta",))
    bam = Path(inputs["mappings_bam_path"])
    index = _fresh_index(bam, Path(inputs["index_file_path"]) if "index_file_path" in inputs else None)
    return CountRequest.of(bam, replace(options, index=index))


def _download_pair(mappings_bam: Json, index_file: Json | None, options: CountOptions, work: Path) -> CountRequest:
    """The file and its index downloaded into ``work`` under their own names (a subjob's inputs)."""
    work.mkdir(parents=True, exist_ok=True)
    with _app_errors():
        bam = work / _platform.describe_input(mappings_bam).name
        _platform.download(mappings_bam, bam)
        index = None
        if index_file is not None:
            index = work / _platform.describe_input(index_file).name
            _platform.download(index_file, index)
    return CountRequest.of(bam, replace(options, index=_fresh_index(bam, index)))


def _streamed(mappings_bam: Json, index_file: Json, options: CountOptions) -> CountRequest:
    """The request over preauthenticated URLs of the file and its index."""
    bam = _platform.describe_input(mappings_bam)
    index = _platform.describe_input(index_file)
    bam_url = _platform.download_url(mappings_bam, project=bam.project, duration=URL_SECONDS)
    index_url = _platform.download_url(index_file, project=index.project, duration=URL_SECONDS)
    return CountRequest.of(bam_url, replace(options, index=index_url))


def _count_streamed(mappings_bam: Json, bam_file: DxFile, index_file: Json, options: CountOptions) -> CountResult:
    """The count over preauthenticated URLs of the file and its index (fetched whole: it is small).

    :raises BamcountdError: as :func:`~bamcountd.count.count_bam`
    """
    result = count_bam_sync(_streamed(mappings_bam, index_file, options))
    return replace(result, index=Path(_platform.describe_input(index_file).name), index_url=None)


# --- scatter by shards ------------------------------------------------------------------------


def scatter_subjobs(size: int, scatter_jobs: int) -> int:
    """How many ``count_shards`` subjobs a scattered file of ``size`` bytes gets: one per
    :data:`SCATTER_BYTES_PER_JOB` (rounded up), at least two, at most ``scatter_jobs``."""
    return max(1, min(scatter_jobs, max(2, math.ceil(size / SCATTER_BYTES_PER_JOB))))


def _scatter(
    mappings_bam: Json,
    bam_file: DxFile,
    index_file: Json | None,
    options: CountOptions,
    count_inputs: Json,
    input_mode: str,
    prefix: str,
    scatter_jobs: int,
    notes: tuple[str, ...],
) -> Json | None:
    """Plan the count into its shards here, spread the shards over ``count_shards`` subjobs by
    their expected records, and gather them in a ``gather`` subjob; None when the count is not
    one of shards (then main counts it as a single job)."""
    started = time.time()
    subjobs = scatter_subjobs(bam_file.size, scatter_jobs)
    slots = subjobs * choose_parallelism(options.jobs, options.threads, available_cores())[0]
    planned, mode = None, ""
    if input_mode == "stream" and index_file is not None:
        with _app_errors():
            try:
                planned = plan_count_sync(_streamed(mappings_bam, index_file, options), slots=slots)
                mode = "stream"  # planned or not (a count not of shards): no download for the plan
            except (RemoteUnavailable, RemoteUnsupported) as error:
                notes += (_fallback_note(error, "every subjob downloaded the file and counted from the download"),)
                log.warning("stream_failed", failure=str(error), fallback="download")
    elif input_mode == "stream":  # building an index reads the whole file: here, once
        notes += ("no index_file was given: the file was downloaded, since building its index reads all of it",)
    if not mode:
        mode = "download"
        request = _downloaded(options)
        with _app_errors():
            planned = plan_count_sync(request, slots=slots)
    if planned is None or (planned.built and not Path(planned.index).is_file()):
        log.info("not_scattered", reason="the count is not one of shards")
        return None
    if planned.built or index_file is None:
        index_file = dxlink(_platform.upload(Path(planned.index)))  # shared: no subjob builds it again
    # Named as a single job names it: the index it built, or the given one's platform name.
    index_name = Path(planned.index).name if planned.built else _platform.describe_input(index_file).name
    home = Path(os.environ.get("HOME", ".")).resolve()
    plan_path = home / "plan" / f"{prefix}.plan.json"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(plan_path, json.dumps(planned.as_json()).encode())
    plan_link = dxlink(_platform.upload(plan_path))
    bins = balance([shard.cost for shard in planned.shards], subjobs)
    common = {"mappings_bam": mappings_bam, "index_file": index_file, "plan": plan_link, "count_inputs": count_inputs}
    jobs = [
        _platform.new_subjob(
            "count_shards",
            {**common, "shards": numbers, "input_mode": mode},
            name=f"count {len(numbers)} of {len(planned.shards)} shards",
        )
        for numbers in bins
    ]
    gather_job = _platform.new_subjob(
        "gather",
        {
            **common,
            "input_mode": mode,
            "parts": [_platform.output_ref(job, "parts") for job in jobs],
            "fallbacks": [_platform.output_ref(job, "fallback") for job in jobs],
            "prefix": prefix,
            "bam_name": bam_file.name,
            "index_name": index_name,
            "notes": list(notes),
            "started": started,
        },
        name="gather counts",
    )
    log.info("scattered", subjobs=len(jobs), shards=len(planned.shards), mode=mode, gather=gather_job)
    return {field: _platform.output_ref(gather_job, field) for field in ("count_file", "counts_json", "total_reads")}


def balance(weights: Sequence[float], bins: int) -> list[list[int]]:
    """Shards (by number) into at most ``bins`` lists of about equal expected records:
    longest-processing-time packing, heaviest first, each into the lightest list (the first of
    equals), every shard costing at least one record (a start); each list in shard order."""
    loads: list[tuple[float, list[int]]] = [(0.0, []) for _ in range(max(1, min(bins, len(weights))))]
    for number in sorted(range(len(weights)), key=lambda n: (-weights[n], n)):
        lightest = min(range(len(loads)), key=lambda k: (loads[k][0], k))
        load, numbers = loads[lightest]
        loads[lightest] = (load + max(weights[number], 1.0), [*numbers, number])
    return [sorted(numbers) for _, numbers in loads if numbers]


def _plan(plan: Json, home: Path) -> CountPlan:
    path = home / "plan.json"
    with _app_errors():
        _platform.download(plan, path)
        return CountPlan.from_json(json.loads(path.read_bytes()))


def count_shards(
    *,
    mappings_bam: Json,
    index_file: Json,
    plan: Json,
    shards: list[int],
    count_inputs: Json,
    input_mode: str,
) -> Json:
    """Count the plan's ``shards`` over a stream of the file (only their byte ranges are read)
    or a download of it; each shard's share of its regions, and how the file was read."""
    home = _setup()
    options = _options(count_inputs, home)
    planned = _plan(plan, home)
    parts: list[ShardCounts] | None = None
    mode, fallback = input_mode, ""
    if input_mode == "stream":
        with _app_errors():
            try:
                parts = count_part_sync(_streamed(mappings_bam, index_file, options), planned, shards)
            except (RemoteUnavailable, RemoteUnsupported) as error:
                log.warning("stream_failed", failure=str(error), fallback="download")
                mode, fallback = (
                    "download",
                    _fallback_note(error, "a subjob downloaded the file and counted from the download"),
                )
    if parts is None:
        request = _download_pair(mappings_bam, index_file, options, home / "shard")
        with _app_errors():
            parts = count_part_sync(request, planned, shards)
    log.info("shards_counted", shards=len(shards), total=sum(sum(part.counts) for part in parts))
    return {"parts": [list(part) for part in parts], "mode": mode, "fallback": fallback}


def gather(
    *,
    mappings_bam: Json,
    index_file: Json,
    plan: Json,
    count_inputs: Json,
    input_mode: str,
    parts: list[list[Any]],
    fallbacks: list[str],
    prefix: str,
    bam_name: str,
    index_name: str,
    notes: list[str],
    started: float,
) -> Json:
    """Sum the subjobs' shards into the regions and verify them as a single job does; if they
    disagree with the index, count the file as a single job (whose recovery tells why)."""
    home = _setup()
    options = _options(count_inputs, home)
    planned = _plan(plan, home)
    shares = [ShardCounts(n, tuple(counts), tuple(reached)) for part in parts for n, counts, reached in part]
    _, threads = choose_parallelism(options.jobs, options.threads, available_cores())
    with _app_errors():
        result = gather_counts(
            planned, shares, filters=options.filters, jobs=options.jobs, threads=threads, seconds=time.time() - started
        )
    if result is None:
        log.warning("parts_differ", action="counted as a single job")
        bam_file = _platform.describe_input(mappings_bam)
        result = _count_one(
            mappings_bam,
            bam_file,
            index_file,
            options,
            input_mode,
            tuple(notes),
            lambda: _download_pair(mappings_bam, index_file, options, home / "whole"),
        )
    else:
        result = replace(
            result,
            bam=Path(bam_name),
            index=Path(index_name),
            notes=(*result.notes, *notes, *sorted({f for f in fallbacks if f})),
        )
    log.info("gathered", subjobs=len(parts), total=result.total)
    return _upload_results(result, prefix, home / "out")


ENTRY_POINTS: dict[str, Callable[..., Json]] = {"main": main, "count_shards": count_shards, "gather": gather}
# dxpy.run() looks entry points up in its own table; the decorator form would hide the types.
register_entry_points(ENTRY_POINTS)
