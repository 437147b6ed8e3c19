"""The orchestrator: checks, plan, concurrent samtools commands, streamed reduction.

Every shard's command runs under a capacity limiter; each finished command is sent at once
over a memory object stream to the reducer, which verifies it (exit status, stderr, output)
and adds it to its region.  The first bad result raises out of the task group, which
cancels the other shards; cancellation kills their samtools processes (see
:func:`bamcountd.samtools.run`), so a failed or interrupted count leaves no child behind.
"""

from __future__ import annotations

import gc
import json
import operator
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import cached_property, partial
from itertools import chain, repeat
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast, overload

import anyio
from anyio.abc import ObjectSendStream

from bamcountd import logs, plan
from bamcountd import samtools as st
from bamcountd.bamstream import write_intervals, write_intervals_file
from bamcountd.cramfile import (
    EOF_CONTAINER,
    EOF_CONTAINER_2,
    UNPLACED_ID,
    Container,
    CramTotals,
    Unsafe,
    container_run,
    crai_containers,
    cram2_containers,
    ending_container,
    multi_region_unsafe,
    read_totals,
)
from bamcountd.errors import (
    BadOption,
    BamcountdError,
    BamNotFound,
    CohortFailed,
    IndexMismatch,
    IndexMissing,
    NotCoordinateSorted,
    PartsIncomplete,
    RemoteAccessDenied,
    RemoteChanged,
    RemoteNotFound,
    RemoteUnavailable,
    SamtoolsBadOutput,
    SamtoolsFailed,
    SamtoolsTimeout,
    leaf_exceptions,
    one_line,
)
from bamcountd.inputs import (
    IndexLookup,
    Input,
    Verdict,
    cached_index_path,
    check_bam_file,
    check_reference,
    check_remote_bytes,
    default_cache_dir,
    find_index,
    parse_input,
    remote_index_candidates,
)
from bamcountd.options import CountOptions, Filters, OptionValueError, check
from bamcountd.urls import ATTEMPTS, ObjectInfo, Url, pause

log = logs.get_logger("bamcountd")
_T = TypeVar("_T")

#: A BAI cannot address positions past 2^29 - 1; longer references need a CSI index.
_BAI_MAX_LENGTH = (1 << 29) - 1

#: Called with (regions done, regions) as a count goes on.
ProgressCallback = Callable[[int, int], None]
#: How one shard runs: a ``view -c`` argument list and the file it saves its counts to (or its
#: scratch folder), or None and where its tally works (its BED, or the scratch folder).
_Command = tuple[list[str] | None, Path]


@dataclass(frozen=True, kw_only=True)
class CountRequest(CountOptions):
    """One input (a local file or a URL) and the options to count it with."""

    bam: Input

    @classmethod
    def of(cls, bam: str | Input, options: CountOptions) -> CountRequest:
        """:raises RemoteUnsupported: ``bam`` is a URL samtools cannot read"""
        return cls(bam=parse_input(bam), **{spec.name: getattr(options, spec.name) for spec in fields(CountOptions)})


class RegionCount(NamedTuple):
    """One row of a result (a named tuple: a BED file makes hundreds of thousands)."""

    region: str
    count: int  # type: ignore[assignment]  # the JSON key; it hides tuple.count, which nothing here calls
    name: str | None = None  # a BED line's name (its 4th column)

    @property
    def row(self) -> str:
        """The row's label in a table: the BED name if there is one, else the region."""
        return self.region if self.name is None else self.name


class RegionCounts(Sequence[RegionCount]):
    """A plain BED's rows of a result: its :class:`plan.RegionTable` and the counts, its
    :class:`RegionCount` rows made the first time any is asked for (all at once, then kept),
    so that output made from the columns (report's TSV) never makes 200,000 of them.  It
    compares equal to any sequence of the same rows."""

    __slots__ = ("_rows", "counts", "table")

    def __init__(self, table: plan.RegionTable, counts: list[int]) -> None:
        self.table = table
        self.counts = counts
        self._rows: tuple[RegionCount, ...] | None = None

    def rows(self) -> tuple[RegionCount, ...]:
        if self._rows is None:
            names = self.table.names if self.table.names is not None else repeat(None, len(self.counts))
            with _collector_paused():
                self._rows = _rows(self.table.labels(), self.counts, names)
        return self._rows

    def __len__(self) -> int:
        return len(self.counts)

    @overload
    def __getitem__(self, index: int) -> RegionCount: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[RegionCount, ...]: ...

    def __getitem__(self, index: int | slice) -> RegionCount | tuple[RegionCount, ...]:
        return self.rows()[index]

    def __iter__(self) -> Iterator[RegionCount]:
        return iter(self.rows())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class CountResult:
    bam: Input  # a URL shows itself redacted
    total: int
    regions: Sequence[RegionCount]  # a tuple, or a plain BED's RegionCounts
    filters: Filters
    samtools_version: str
    jobs: int
    threads: int
    method: str  # view, index, or stream (one pass over the whole file, no index)
    shards: int
    index: Path | None
    seconds: float
    verification: str = "index"  # index, earlier, stream or none (README: Outputs)
    notes: tuple[str, ...] = ()  # what went differently from a plain count, and why
    index_url: Url | None = None  # a URL's index, fetched for this count only (``index`` is then None)
    object: ObjectInfo | None = None  # what identified a URL's object, the same at the start and the end
    samples: tuple[str, ...] = ()  # the header's @RG SM values

    @property
    def sample(self) -> str:
        """The column's name in a matrix: the one ``@RG SM`` of the header, else the file name."""
        return self.samples[0] if len(self.samples) == 1 else self.bam.name

    def as_dict(self) -> dict[str, Any]:
        """The JSON contract other tools read (``bamcountd count --format json``)."""
        index = self.index_url if self.index_url is not None else self.index
        return {
            "bam": str(self.bam),
            "total": self.total,
            "regions": [
                {"region": r.region, "count": r.count}
                if r.name is None
                else {"region": r.region, "name": r.name, "count": r.count}
                for r in self.regions
            ],
            "filters": self.filters.as_dict(),
            "samtools": self.samtools_version,
            "jobs": self.jobs,
            "threads": self.threads,
            "method": self.method,
            "shards": self.shards,
            "index": None if index is None else str(index),
            "seconds": round(self.seconds, 3),
            "verification": self.verification,
            "notes": list(self.notes),
            "object": None if self.object is None else self.object.as_dict(),
        }


@dataclass(frozen=True)
class _Outcome:
    shard: plan.Shard
    completed: st.Completed
    tallies: dict[bytes, tuple[int, int]] | None = None  # tallies: (records reached, passing) per reference
    counts: list[int] | None = None  # a sweep's: one per region of the shard, in its order


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def process_threads(jobs: int, threads: int | None, cores: int) -> tuple[int, ...]:
    """Each samtools process's threads (most first) that put every core to work while at most
    ``jobs`` processes run.

    ``threads`` counts samtools' own thread: N means ``-@ N-1`` helpers.  Balanced shards make
    one thread per process the best use of the cores that ``--jobs`` lets processes fill: on 2
    cores two single-threaded processes took 3.39 s where one with two helpers took 4.30 s.  The
    cores ``--jobs`` leaves over are shared out as evenly as they go, so that the processes'
    shares of the cores sum to the cores: a process with one core runs alone, one with C >= 2
    gets a helper per core (``-@C``: samtools' own thread mostly parses while the helpers
    decompress; ``-j 1`` on 2 cores: ``-@2``, 4.30 s instead of 6.60 s).  Never a lone helper:
    ``samtools view -c -@1`` decompresses on one thread, as without it (5.70 s against 5.48 s).
    ``--threads`` is taken as given, and then the process count shrinks to fit; ``--jobs``
    always caps it.
    """
    if threads is not None:
        return (threads,) * max(1, min(jobs, cores // threads))
    return tuple(share + 1 if share >= 2 else 1 for share in process_cores(jobs, cores))


def process_cores(jobs: int, cores: int) -> tuple[int, ...]:
    """Each process's share of the cores, most first: ``min(jobs, cores)`` processes (at least
    one), the cores shared out as evenly as they go; they sum to ``cores`` (or one)."""
    processes = max(1, min(jobs, cores))
    base, more = divmod(max(cores, 1), processes)
    return (base + 1,) * more + (base,) * (processes - more)


def choose_parallelism(jobs: int, threads: int | None, cores: int) -> tuple[int, int]:
    """(processes at once, the most threads a process gets): see :func:`process_threads`."""
    slots = process_threads(jobs, threads, cores)
    return len(slots), slots[0]


def _validate(request: CountRequest) -> None:
    try:
        check(request)
    except OptionValueError as error:
        raise BadOption(f"{error.option.flag}: {error}") from None
    if request.method == "index" and request.filters.active:
        raise BadOption("--method index reads only the index, so it cannot apply -f/-F/-G/-q filters")
    if request.reference is not None and not request.reference.is_file():
        raise BamNotFound(f"{request.reference}: reference FASTA not found")


async def count_bam(
    request: CountRequest,
    *,
    limiter: anyio.CapacityLimiter | None = None,
    progress: ProgressCallback | None = None,
) -> CountResult:
    """Count the reads of one BAM or CRAM, a local file or a URL, per region; raise a
    :class:`BamcountdError` on any doubt.

    ``limiter`` is shared with other counts (the daemon's global cap on samtools processes);
    the request's own ``jobs`` still applies within it.

    :raises BamcountdError: the input, the data, its server or samtools failed; nothing was counted
    """
    started = time.monotonic()
    async with _opened(request) as opened:
        return await _count(request, opened, started, limiter, progress)


@dataclass(frozen=True)
class _Opened:
    """An input checked enough to count: its samtools, the file or URL, CRAM or not, a URL's state."""

    executable: str
    bam: Path | Url
    cram: bool
    fetched: _Remote | None
    cache: Path


@asynccontextmanager
async def _opened(request: CountRequest) -> AsyncIterator[_Opened]:
    """The request's input, checked; a URL's count has a private folder in the cache (samtools
    works there: htslib drops a downloaded index in its working folder, and trusts one it finds
    there; the index is fetched into it once), and its object is checked again at the end."""
    _validate(request)
    executable = st.find(request.samtools)
    source = parse_input(request.bam)
    cache = Path(request.index_cache) if request.index_cache is not None else default_cache_dir()
    if isinstance(source, Path):
        bam, cram = check_bam_file(source)
        yield _Opened(executable, bam, cram, None, cache)
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        private = tempfile.TemporaryDirectory(prefix=".url-", dir=cache)
    except OSError as error:
        raise IndexMissing(f"{source}: the index cache {cache} is not usable ({error.strerror})") from None
    with private as folder:
        from bamcountd import remote  # here: http.client and ssl are a tenth of a local count's start

        probe = await anyio.to_thread.run_sync(remote.probe, source)
        cram = check_remote_bytes(source, probe.head, probe.tail)
        fetched = _Remote(
            url=source,
            info=probe.info,
            folder=Path(folder),
            cram_eof=ending_container(probe.head, probe.tail) if cram else None,
        )
        yield _Opened(executable, source, cram, fetched, cache)
        await fetched.recheck()  # the object the count began with is the one it ended with


class _Started(NamedTuple):
    job: _Job
    lookup: IndexLookup
    fresh: Path | None  # the index to trust as it is
    stats: list[st.IndexStat] | None  # its idxstats, if read already


async def _start(
    request: CountRequest,
    opened: _Opened,
    limiter: anyio.CapacityLimiter | None,
    progress: ProgressCallback | None,
    *,
    stats: bool = True,
    ahead: AsyncExitStack | None = None,
) -> _Started:
    """The checks, the header, the regions and the count's state; ``stats``: read the index's
    totals too (a part of a scattered count has them in its plan); ``ahead``: start sweep
    readers ahead (_readers_ahead), held there (for as long as the count)."""
    bam, cram, fetched, cache = opened.bam, opened.cram, opened.fetched, opened.cache
    if cram and request.method == "index":
        raise BadOption(f"{bam}: --method index cannot count a CRAM: its index (CRAI) holds no read counts")
    if fetched is None:
        assert isinstance(bam, Path)
        lookup = find_index(bam, _local(request.index), cram=cram)
    else:
        lookup = IndexLookup(await fetched.index(request.index, cram=cram), False)  # an object's age is not checked
    fresh = lookup.path if lookup.path is not None and not lookup.stale else None
    env = st.cram_environment(cache / "no-reference") if cram else None
    cwd = None if fetched is None else fetched.folder
    # A CRAM's idxstats reads every record: it is the count's cross-check, so no time limit but the user's.
    stats_timeout = request.timeout if cram else 300
    executable = opened.executable
    # The checks are independent samtools runs: start them together (a count of a small BAM
    # is mostly these), then report the first failure in this order.
    for attempt in range(1, ATTEMPTS + 1):
        try:
            samtools, _, header, early_stats = await _gather(
                partial(st.locate, executable),
                partial(st.quickcheck, executable, bam, env=env, cwd=cwd),
                partial(st.read_header, executable, bam, env=env, cwd=cwd),
                partial(st.idxstats, executable, bam, fresh, env=env, timeout=stats_timeout, cwd=cwd)
                if stats and fresh is not None and not (cram and fetched is None)  # a local CRAM's headers count
                else _no_stats,
            )
            break
        except BamcountdError as error:
            if fetched is None:
                raise
            await fetched.recheck()  # an object that has gone or expired says so before samtools' words
            if attempt == ATTEMPTS:
                raise  # the object is there and the same: what samtools said is the error
            log.bind(bam=str(bam)).warning("checks_retried", attempt=attempt, failure=one_line(error))
            await anyio.sleep(pause(attempt))
    if request.reference is not None:
        check_reference(request.reference, header, bam)
    # After the checks, whose samtools they would slow: the BED is read and the plan made meanwhile.
    readers = [] if ahead is None else await ahead.enter_async_context(_readers_ahead(request, limiter))
    with _collector_paused():
        regions = plan.resolve_regions(header, request.regions, request.regions_file)
    if cram:
        fields_needed = _required_fields(request, regions)
        samtools = replace(samtools, view_options=st.cram_view_options(fields_needed, request.reference))
    samtools = replace(samtools, env=env, cwd=cwd)
    slots = process_threads(request.jobs, request.threads, available_cores())
    job = _Job(
        samtools=samtools,
        bam=bam,
        cram=cram,
        header=header,
        request=request,
        regions=regions,
        whole_file=not request.regions and request.regions_file is None,
        processes=len(slots),
        threads=slots[0],
        thread_slots=slots,
        limiter=limiter,
        progress=progress,
        remote=fetched,
        readers=readers,
    )
    if fresh is not None and header.sort_order in ("unsorted", "queryname"):
        # samtools indexes only coordinate-sorted BAMs: this index was made from another file.
        job.notes.append(f"its index {fresh} cannot be this BAM's, which is not coordinate-sorted: it was not used")
        fresh = early_stats = None
    return _Started(job, lookup, fresh, early_stats)


async def _count(
    request: CountRequest,
    opened: _Opened,
    started: float,
    limiter: anyio.CapacityLimiter | None,
    progress: ProgressCallback | None,
) -> CountResult:
    async with AsyncExitStack() as ahead:
        job, lookup, fresh, early_stats = await _start(request, opened, limiter, progress, ahead=ahead)
        bam, cram, fetched, regions = opened.bam, opened.cram, opened.fetched, job.regions
        index = fresh if fresh is not None else await job.index_for(lookup)
        if index is None and request.method == "index":
            raise IndexMissing(f"{bam}: --method index needs an index, and this BAM is not coordinate-sorted")
        if index is None:
            counts, method, verification, shard_count = await job.stream(), "stream", "stream", 1
        else:
            counts, method, verification, shard_count, index = await job.through(index, early_stats)
            if cram and verification == "index":
                verification = "records"  # a CRAI has no totals: idxstats counted the records (README: Outputs)
    index_url = fetched.index_url if fetched is not None and index == lookup.path else None
    with _collector_paused():
        rows = _region_counts(regions, counts)
    result = CountResult(
        bam=bam,
        total=sum(counts),
        regions=rows,
        filters=request.filters,
        samtools_version=job.samtools.version,
        jobs=request.jobs,
        threads=job.threads,
        method=method,
        shards=shard_count,
        index=None if index_url is not None else index,
        seconds=time.monotonic() - started,
        verification=verification,
        notes=tuple(job.notes),
        index_url=index_url,
        object=None if fetched is None else fetched.info,
        samples=job.header.samples,
    )
    log.bind(bam=str(bam)).info(
        "counted", total=result.total, regions=len(regions), shards=shard_count, seconds=round(result.seconds, 3)
    )
    return result


#: A reader started ahead of its sweep, and the intervals file to write for it before its samtools starts.
_ReaderAhead = tuple[st.Reader, Path]


@asynccontextmanager
async def _readers_ahead(
    request: CountRequest, limiter: anyio.CapacityLimiter | None
) -> AsyncIterator[list[_ReaderAhead]]:
    """A sweep reader for each process the count will run, started before the regions file is
    read when it may well be swept (big enough for plan.SWEEP_FROM rows of 16 bytes): a
    reader's start is mostly numpy's import, which then runs on a core that would wait while
    the file is read and the sweeps are planned.  None under a shared limiter (the daemon's, a
    many-BAM count's: a count may wait its turn there); those not taken are dropped (_Job._pass)."""
    try:
        big = request.regions_file is not None and request.regions_file.stat().st_size >= plan.SWEEP_FROM * 16
    except OSError:
        big = False  # read_bed says why
    if not (big and request.split and request.method != "index" and limiter is None):
        yield []
        return
    processes = len(process_threads(request.jobs, request.threads, available_cores()))
    with tempfile.TemporaryDirectory(prefix="bamcountd-readers-") as name:
        folder = Path(name)
        paths = [folder / f"reader{k}.intervals" for k in range(processes)]
        async with st.readers_ahead([_reader_argv(path) for path in paths], cwd=folder) as readers:
            yield list(zip(readers, paths, strict=True))


def _reader_argv(intervals: Path) -> list[str]:
    """The interval sweep's reader of ``intervals`` (see bamcountd.overlaps)."""
    return [sys.executable, "-m", "bamcountd.overlaps", str(intervals)]


def _region_counts(regions: Sequence[plan.Region], counts: list[int]) -> Sequence[RegionCount]:
    if isinstance(regions, plan.RegionTable):  # made from the columns, if at all
        return RegionCounts(regions, counts)
    return _rows(map(_LABEL, regions), counts, map(_NAME, regions))


def _rows(labels: Iterable[str], counts: Iterable[int], names: Iterable[str | None]) -> tuple[RegionCount, ...]:
    # tuple.__new__ on the rows makes each RegionCount with no Python call per row.
    return tuple(map(tuple.__new__, repeat(RegionCount), zip(labels, counts, names, strict=True)))


_LABEL, _REFERENCE, _START, _END, _NAME = map(operator.itemgetter, range(5))  # Region's fields


def _run_sync(call: Callable[[], Awaitable[_T]]) -> _T:
    """``anyio.run(call)``, its result handed back outside the event loop's main task: asyncio
    formats that task's repr as it restores the SIGINT handler (``repr(result)``, all of it,
    which takes seconds for 200,000 regions)."""
    box: list[_T] = []

    async def main() -> None:
        box.append(await call())

    st.wait_through_pidfds()
    anyio.run(main)
    return box[0]


def _local(index: Path | Url | None) -> Path | None:
    """A local file's ``--index``: a path (an index URL is for a URL's count)."""
    if isinstance(index, Url):
        raise BadOption(f"--index {index}: an index URL goes with a URL input; a local BAM's index is a local file")
    return index


@dataclass
class _Remote:
    """A URL's count: the object's identity when it began, and its private folder."""

    url: Url
    info: ObjectInfo
    folder: Path
    index_url: Url | None = None  # the index fetched into ``folder``
    #: The container a CRAM ends with: a CRAM 3's, or a CRAM 2.1's that has one (None: a BAM,
    #: a CRAM 2.0, a 2.1 without one).
    cram_eof: bytes | None = None

    async def recheck(self) -> None:
        """Raise if the object cannot be read now as it was when the count began: gone (404),
        refused (a presigned URL that expired: 403), or changed.

        :raises RemoteNotFound, RemoteAccessDenied, RemoteUnavailable, RemoteChanged:
        """
        from bamcountd import remote

        now = await anyio.to_thread.run_sync(remote.identify, self.url)
        if now != self.info:
            raise RemoteChanged(
                f"{self.url}: the object changed during the count (size, ETag, Last-Modified: "
                f"{self.info.size}, {self.info.etag}, {self.info.last_modified} at the start; "
                f"{now.size}, {now.etag}, {now.last_modified} now)"
            )

    async def index(self, given: Path | Url | None, *, cram: bool) -> Path | None:
        """The index: the user's file, or the user's URL or one next to the object fetched
        into the private folder; None if there is none next to it.

        :raises BamNotFound: the user's index file does not exist
        :raises RemoteNotFound, RemoteAccessDenied, RemoteUnavailable: the user's index URL failed
        """
        if isinstance(given, Path):
            if not given.is_file():
                raise BamNotFound(f"{given}: index file not found")
            return given
        from bamcountd import remote

        candidates = [given] if given is not None else remote_index_candidates(self.url, cram=cram)
        for candidate in candidates:
            suffix = next((s for s in (".bai", ".csi", ".crai") if candidate.name.endswith(s)), ".idx")
            out = self.folder / f"index{suffix}"
            try:
                await anyio.to_thread.run_sync(remote.fetch, candidate, out)
            except (RemoteNotFound, RemoteAccessDenied):
                if given is not None:
                    raise
                continue  # not there (a store that hides what it holds says 403)
            self.index_url = candidate
            return out
        return None


def count_bam_sync(request: CountRequest, *, progress: ProgressCallback | None = None) -> CountResult:
    """:func:`count_bam` for callers without an event loop.

    :raises BamcountdError: as :func:`count_bam`
    """
    return _run_sync(partial(count_bam, request, progress=progress))


#: Called with (BAMs done, BAMs) as a cohort's count goes on.
CohortProgress = Callable[[int, int], None]


async def count_bams(
    requests: Sequence[CountRequest],
    *,
    limiter: anyio.CapacityLimiter | None = None,
    progress: CohortProgress | None = None,
) -> list[CountResult]:
    """Count several BAMs at once, in the order given, under one limiter of samtools commands
    (``limiter``, else one sized by the first request's ``jobs`` and ``threads``).  Every BAM is
    counted even when another fails, so that every failure can be reported.

    :raises CohortFailed: one or more BAMs failed; it holds each one's error, in input order
    """
    if not requests:
        return []
    first = requests[0]
    processes, _ = choose_parallelism(first.jobs, first.threads, available_cores())
    shared = limiter if limiter is not None else anyio.CapacityLimiter(processes)
    at_once = anyio.CapacityLimiter(processes + 1)  # one more, whose checks overlap the others' shards
    results: list[CountResult | None] = [None] * len(requests)
    failures: dict[int, BamcountdError] = {}
    done = 0

    async def one(position: int, request: CountRequest) -> None:
        nonlocal done
        async with at_once:
            try:
                results[position] = await count_bam(request, limiter=shared)
            except BamcountdError as error:
                failures[position] = error
        done += 1
        if progress is not None:
            progress(done, len(requests))

    async with anyio.create_task_group() as group:
        for position, request in enumerate(requests):
            group.start_soon(one, position, request)
    if failures:
        raise CohortFailed([(requests[i].bam, failures[i]) for i in sorted(failures)])
    return [result for result in results if result is not None]


def count_bams_sync(requests: Sequence[CountRequest], *, progress: CohortProgress | None = None) -> list[CountResult]:
    """:func:`count_bams` for callers without an event loop.

    :raises CohortFailed: as :func:`count_bams`
    """
    return _run_sync(partial(count_bams, requests, progress=progress))


# --- a count in parts: its plan, its shards counted anywhere, and the parts gathered -------


@dataclass(frozen=True, kw_only=True)
class CountPlan:
    """A count cut into its exact shards, and what its verification sets them against: the
    shards a :func:`count_bam` of the same request cuts (for ``slots`` processes at once).  Any
    worker can count any of its shards (:func:`count_part`); :func:`gather_counts` sums them
    and verifies as a single count does.  :meth:`as_json` and :meth:`from_json` carry it."""

    bam: str  # the input as shown (a URL redacted), for messages
    cram: bool
    index: str  # the index the shards count through (``built``: one this count built)
    built: bool
    references: tuple[tuple[str, int], ...]  # the header's (name, length): each part checks its file's
    regions: tuple[plan.Region, ...]
    shards: tuple[plan.Shard, ...]
    totals: tuple[int | None, ...]  # each region's records by the index (None: not known alone)
    account: bool  # the shards account for the records their filters leave out
    earlier: bool  # an earlier count proved this pair record by record
    components: tuple[tuple[tuple[int, ...], int], ...] | None  # a local CRAM's (see _check_pass)
    unplaced_unrecorded: bool  # the index does not record how many unplaced reads there are
    empty: tuple[int, ...]  # a CRAM's references without records
    samtools_version: str
    notes: tuple[str, ...]
    samples: tuple[str, ...]
    object: ObjectInfo | None = None  # a URL's object as planned: every part must read the same

    def as_json(self) -> dict[str, Any]:
        """Only JSON types (a job's input, a file)."""
        values = {spec.name: getattr(self, spec.name) for spec in fields(self) if spec.name != "shards"}
        values["object"] = None if self.object is None else self.object.as_dict()
        values["regions"] = [list(region) for region in self.regions]
        values["shards"] = [
            [list(s.regions), list(s.args), s.expression, s.kind, s.sign, s.weight, [list(x) for x in s.stretches]]
            for s in self.shards
        ]
        carried: dict[str, Any] = json.loads(json.dumps(values))  # tuples become lists, as they come back
        return carried

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> CountPlan:
        """:raises PartsIncomplete: ``values`` is not a plan's JSON"""
        try:
            shards = tuple(
                plan.Shard(tuple(r), tuple(a), e, k, g, float(w), tuple((n, b, c) for n, b, c in x))
                for r, a, e, k, g, w, x in values["shards"]
            )
            components, info = values["components"], values["object"]
            return cls(
                **{key: values[key] for key in ("bam", "cram", "index", "built", "account", "earlier")},
                **{key: values[key] for key in ("unplaced_unrecorded", "samtools_version")},
                references=tuple((name, length) for name, length in values["references"]),
                regions=tuple(plan.Region(*region) for region in values["regions"]),
                shards=shards,
                totals=tuple(values["totals"]),
                components=None if components is None else tuple((tuple(r), t) for r, t in components),
                empty=tuple(values["empty"]),
                notes=tuple(values["notes"]),
                samples=tuple(values["samples"]),
                object=None if info is None else ObjectInfo(**info),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PartsIncomplete(f"not a count's plan ({type(error).__name__}: {error})") from None


class ShardCounts(NamedTuple):
    """One shard's share of its regions (in the shard's order): reads counted, and records
    reached (None where filters left records uncounted and nothing says how many)."""

    shard: int  # its number in the plan
    counts: tuple[int, ...]
    reached: tuple[int | None, ...]


async def plan_count(request: CountRequest, *, slots: int | None = None) -> CountPlan | None:
    """The request's count cut into its exact shards, for ``slots`` processes at once (default:
    as :func:`count_bam` would on this machine); None when it is not counted in shards (``--method
    index``, or a BAM without an index that is not coordinate-sorted: one pass over it).

    :raises BamcountdError: as :func:`count_bam`, for what its checks find
    """
    async with _opened(request) as opened:
        job, lookup, fresh, early_stats = await _start(request, opened, None, None)
        if request.method == "index":
            return None
        index = fresh if fresh is not None else await job.index_for(lookup)
        if index is None:
            return None
        index, stats = await job.stats_for(index, early_stats)
        by_name, totals, earlier, account = job.prepare(index, stats)
        shards = job.plan_pass(by_name, totals, account=account, slots=slots)
        containers = job.containers
        return CountPlan(
            bam=str(opened.bam),
            cram=opened.cram,
            index=str(index),
            built=index == job.built,
            references=tuple((ref.name, ref.length) for ref in job.header.references),
            regions=tuple(job.regions),
            shards=tuple(shards),
            totals=tuple(totals),
            account=account,
            earlier=earlier,
            components=None
            if containers is None
            else tuple((tuple(sorted(refs)), total) for refs, total in containers.components),
            unplaced_unrecorded=not opened.cram and _uncounted_unplaced(index),
            empty=tuple(sorted(job.empty)),
            samtools_version=job.samtools.version,
            notes=tuple(job.notes),
            samples=job.header.samples,
            object=None if opened.fetched is None else opened.fetched.info,
        )


async def count_part(
    request: CountRequest, counted: CountPlan, shards: Sequence[int], *, limiter: anyio.CapacityLimiter | None = None
) -> list[ShardCounts]:
    """Count the plan's ``shards`` (by number) over the request's input (a file, or a URL read by
    byte ranges) and its index, which must be the plan's file and index; each shard's share of
    its regions, in the order given.  Shards a result sends to be counted again (a group that
    differs from the index) run here too, within their shard.

    :raises PartsIncomplete: a shard number the plan does not have, or given twice
    :raises IndexMismatch: the file's header is not the plan's
    :raises BamcountdError: as :func:`count_bam`
    """
    if len(set(shards)) != len(shards) or not all(0 <= n < len(counted.shards) for n in shards):
        raise PartsIncomplete(
            f"{counted.bam}: shards {sorted(shards)} are not each once of the plan's 0 to {len(counted.shards) - 1}"
        )
    async with _opened(request) as opened:
        job, lookup, fresh, _ = await _start(request, opened, limiter, None, stats=False)
        if opened.fetched is not None and counted.object is not None and opened.fetched.info != counted.object:
            raise RemoteChanged(
                f"{opened.bam}: the object is not the one its count was planned with (size, ETag, Last-Modified: "
                f"{counted.object.size}, {counted.object.etag}, {counted.object.last_modified} then; "
                f"{opened.fetched.info.size}, {opened.fetched.info.etag}, {opened.fetched.info.last_modified} now)"
            )
        if tuple((ref.name, ref.length) for ref in job.header.references) != counted.references:
            raise IndexMismatch(f"{opened.bam}: its header is not the one its count was planned with")
        if tuple(job.regions) != counted.regions:
            raise PartsIncomplete(f"{opened.bam}: the regions asked for are not the ones the count was planned with")
        index = fresh if fresh is not None else lookup.path
        if index is None:
            raise IndexMissing(f"{opened.bam}: a part of a count needs the index its plan counts through")
        job.index, job.empty = index, frozenset(counted.empty)
        chosen = [counted.shards[n] for n in shards]
        reducer = _PartReducer(
            opened.bam,
            job.regions,
            counted.totals,
            filtered=request.filters.active,
            account=counted.account,
            origins={id(shard): n for shard, n in zip(chosen, shards, strict=True)},
        )
        await job._run_shards(index, chosen, reducer)
    return [reducer.share(n, counted.shards[n]) for n in shards]


def gather_counts(
    counted: CountPlan, parts: Iterable[ShardCounts], *, filters: Filters, jobs: int, threads: int, seconds: float
) -> CountResult | None:
    """The count from its parts, verified as a single :func:`count_bam` verifies; None when
    whole regions reached other numbers of records than the index holds (or a CRAM's container
    headers do not explain them): only a single count's recovery, which reads the whole file,
    can tell why, so count it as one.

    :raises PartsIncomplete: the parts do not hold each of the plan's shards exactly once
    """
    regions = counted.regions
    counts, reached = [0] * len(regions), [0] * len(regions)
    unknown: set[int] = set()
    seen: set[int] = set()
    for part in parts:
        if not 0 <= part.shard < len(counted.shards) or part.shard in seen:
            raise PartsIncomplete(f"{counted.bam}: shard {part.shard} is not the plan's, or was counted twice")
        seen.add(part.shard)
        members = counted.shards[part.shard].regions
        if not len(members) == len(part.counts) == len(part.reached):
            raise PartsIncomplete(
                f"{counted.bam}: shard {part.shard} came back with {len(part.counts)} counts for {len(members)} regions"
            )
        for i, count, records in zip(members, part.counts, part.reached, strict=True):
            counts[i] += count
            if records is None:
                unknown.add(i)
            else:
                reached[i] += records
    if len(seen) != len(counted.shards):
        missing = sorted(set(range(len(counted.shards))) - seen)
        raise PartsIncomplete(
            f"{counted.bam}: {len(missing)} of the plan's {len(counted.shards)} shards were not counted ({missing[:5]})"
        )
    done = _Pass(counts, [None if i in unknown else n for i, n in enumerate(reached)], len(counted.shards))
    checked = _check_pass(
        regions,
        plan.whole_regions(regions),
        done,
        counted.totals,
        components=counted.components,
        ref_ids={name: i for i, (name, _) in enumerate(counted.references)},
        earlier=counted.earlier,
        index=counted.index,
        unplaced_unrecorded=lambda: counted.unplaced_unrecorded,
    )
    if checked.verification is None:
        return None
    verification = "records" if counted.cram and checked.verification == "index" else checked.verification
    with _collector_paused():
        rows = _region_counts(regions, counts)
    return CountResult(
        bam=Path(counted.bam),
        total=sum(counts),
        regions=rows,
        filters=filters,
        samtools_version=counted.samtools_version,
        jobs=jobs,
        threads=threads,
        method="view",
        shards=len(counted.shards),
        index=Path(counted.index),
        seconds=seconds,
        verification=verification,
        notes=(*counted.notes, *checked.notes),
        samples=counted.samples,
        object=counted.object,
    )


def plan_count_sync(request: CountRequest, *, slots: int | None = None) -> CountPlan | None:
    """:func:`plan_count` for callers without an event loop.

    :raises BamcountdError: as :func:`plan_count`
    """
    return _run_sync(partial(plan_count, request, slots=slots))


def count_part_sync(request: CountRequest, counted: CountPlan, shards: Sequence[int]) -> list[ShardCounts]:
    """:func:`count_part` for callers without an event loop.

    :raises BamcountdError: as :func:`count_part`
    """
    return _run_sync(partial(count_part, request, counted, shards))


async def _no_stats() -> None:
    return None


def _required_fields(request: CountRequest, regions: Sequence[plan.Region]) -> int:
    """The CRAM fields a count decodes: FLAG, RNAME and POS always (the flag filters, the
    reference, the start position that whole references and their shards are cut by), MAPQ for
    ``-q``, and CIGAR (a read's end) only where a range or a BED interval is asked for, which
    counts the reads that overlap it.  Cutting a whole reference into pieces needs no end: a
    piece and its correction see the same ends, whatever they are (see plan)."""
    needed = st.SAM_FLAG | st.SAM_RNAME | st.SAM_POS
    if request.filters.min_mapq:
        needed |= st.SAM_MAPQ
    if request.regions_file is not None or not all(region.whole for region in regions):
        needed |= st.SAM_CIGAR
    return needed


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run calls concurrently; return their results, or raise the failure of the earliest
    call that failed, so that the error reported never depends on which finished first."""
    outcomes: list[tuple[bool, Any]] = [(True, None)] * len(calls)

    async def one(position: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            outcomes[position] = (True, await call())
        except BamcountdError as error:
            outcomes[position] = (False, error)

    async with anyio.create_task_group() as group:
        for position, call in enumerate(calls):
            group.start_soon(one, position, call)
    for succeeded, value in outcomes:
        if not succeeded:
            raise value
    return [value for _, value in outcomes]


class _Pass(NamedTuple):
    """One counting pass over shards: per region, the reads counted and the records reached
    (None where filters left records uncounted and nothing says how many)."""

    counts: list[int]
    reached: list[int | None]
    shards: int


class _Counted(NamedTuple):
    counts: list[int]
    method: str  # view or index
    verification: str
    shards: int
    through: Path | None  # the index it counted through (one it rebuilt, if it had to)


@dataclass(kw_only=True)
class _Job:
    """One count's state: what is asked, and how far the verification has got."""

    samtools: st.Samtools
    bam: Path | Url
    cram: bool
    header: st.Header
    request: CountRequest
    regions: Sequence[plan.Region]
    whole_file: bool  # the default rows: every reference, then *
    processes: int
    threads: int  # the most a process gets (``thread_slots``' first)
    limiter: anyio.CapacityLimiter | None
    progress: ProgressCallback | None
    notes: list[str] = field(default_factory=list)
    empty: frozenset[int] = frozenset()  # a CRAM's references (header numbers) without records
    index: Path | None = None
    built: Path | None = None  # an index this count built (or found in its cache)
    remote: _Remote | None = None  # a URL's count
    containers: CramTotals | None = None  # a local CRAM's records per reference, by its container headers
    thread_slots: tuple[int, ...] = ()  # each process's threads, most first (process_threads); () for ``threads`` each
    readers: list[_ReaderAhead] = field(default_factory=list)  # sweep readers started already (_readers_ahead)
    #: A CRAM's references that this samtools' multi-region iterator may misread, by the index
    #: they were found in (see cramfile.multi_region_unsafe): they are read without it.
    unsafe_found: tuple[Path | None, Unsafe] = (None, Unsafe(frozenset(), frozenset()))

    def __post_init__(self) -> None:
        self.lengths = {ref.name: ref.length for ref in self.header.references}
        self.ref_ids = {ref.name: i for i, ref in enumerate(self.header.references)}
        # The whole references (and *) among the regions: the only ones an index has totals
        # for, found without a Python step per region (a BED's 200,000 ranges have none).
        self.whole = plan.whole_regions(self.regions)
        request = self.request
        self.cache = Path(request.index_cache) if request.index_cache is not None else default_cache_dir()
        self.log = log.bind(bam=str(self.bam))

    async def through(self, index: Path, stats: list[st.IndexStat] | None) -> _Counted:
        """The counts through ``index`` (with ``--method index``, its own totals alone); ``stats``
        are its idxstats if they were read already."""
        index, stats = await self.stats_for(index, stats)
        if self.request.method == "index":
            _check_whole(self.bam, self.regions)
            by_name = {stat.name: stat for stat in stats}
            return _Counted([_index_total(r, by_name) or 0 for r in self.regions], "index", "none", 0, index)
        counts, verification, shards = await self.view(index, stats)
        return _Counted(counts, "view", verification, shards, self.index)

    async def stats_for(self, index: Path, stats: list[st.IndexStat] | None) -> tuple[Path, list[st.IndexStat]]:
        """The index to count through and its totals per reference (``stats`` if read already):
        a local CRAM's from its container headers; an index without statistics rebuilt."""
        if stats is None and self.cram and self.remote is None and self.request.method != "index":
            stats = await self._container_stats(index)
        if stats is None:
            stats = await self._idxstats(index)
        placed = any(stat.reads for stat in stats if stat.name != plan.UNPLACED)
        if not placed and not self.cram and _lacks_statistics(index):
            index = await self.fresh_index(f"its index {index} has no per-reference statistics (written by bamtools?)")
            stats = await self._idxstats(index)
        _check_index_names(self.bam, self.header, stats)
        return index, stats

    async def _container_stats(self, index: Path) -> list[st.IndexStat] | None:
        """A local CRAM 3's records per reference from its container headers (cramfile), as
        idxstats' lines; a reference that shares multi-reference containers gets its share of
        its component's records (for planning only: its total is None, see _totals)."""
        assert isinstance(self.bam, Path)
        references = self.header.references
        found = await anyio.to_thread.run_sync(read_totals, self.bam, index, len(references))
        if found is None:  # CRAM 2: idxstats reads the records
            return None
        self.containers = found
        shares: dict[int, float] = {}
        for refs, total in found.components:
            lengths = {ref: references[ref].length if ref >= 0 else 1 for ref in refs}
            whole = max(sum(lengths.values()), 1)
            for ref, length in lengths.items():
                shares[ref] = total * length / whole
        stats = [
            st.IndexStat(ref.name, ref.length, found.single.get(i, round(shares.get(i, 0))), 0)
            for i, ref in enumerate(references)
        ]
        unplaced = found.single.get(UNPLACED_ID, round(shares.get(UNPLACED_ID, 0)))
        return [*stats, st.IndexStat(plan.UNPLACED, 0, 0, unplaced)]

    def _totals(self, by_name: dict[str, st.IndexStat]) -> list[int | None]:
        """Each region's records by the index (or a CRAM's container headers); None where they
        are known only with other references' (a multi-reference container's)."""
        totals: list[int | None] = [None] * len(self.regions)
        for i in self.whole:
            totals[i] = _index_total(self.regions[i], by_name)
        if self.containers is None:
            return totals
        unknown = self._shared_references()
        for i in self.whole:
            region = self.regions[i]
            if (region.everything and unknown) or (self._ref_id(region) in unknown):
                totals[i] = None
        return totals

    def _shared_references(self) -> set[int]:
        assert self.containers is not None
        return {ref for refs, _ in self.containers.components for ref in refs}

    def _ref_id(self, region: plan.Region) -> int | None:
        return _ref_id(region, self.ref_ids)

    async def _idxstats(self, index: Path) -> list[st.IndexStat]:
        timeout = self.request.timeout if self.cram else 300
        samtools = self.samtools
        return await st.idxstats(
            samtools.executable, self.bam, index, env=samtools.env, timeout=timeout, cwd=samtools.cwd
        )

    # --- the index ---------------------------------------------------------------------

    async def index_for(self, lookup: IndexLookup) -> Path | None:
        """The index to count through, built into the cache if need be; None when the BAM is
        not coordinate-sorted and every region can be counted in one pass without one."""
        streamable = all(region.whole for region in self.regions)
        if lookup.path is None:
            reason = f"has no index (looked for {'.crai' if self.cram else '.bai and .csi'} next to it)"
        else:
            reason = f"has an index older than the BAM ({lookup.path})"
        unsorted = self.header.sort_order in ("unsorted", "queryname")
        if unsorted and streamable:
            return None
        if not self.request.build_index and not unsorted:
            raise IndexMissing(f"{self.bam}: {reason}; run `samtools index` on it, or drop --no-index-build")
        try:
            return await self.fresh_index(reason, note=False)  # as before: no news to the user
        except NotCoordinateSorted:
            if streamable:
                return None
            raise

    async def fresh_index(self, reason: str, *, note: bool = True) -> Path:
        """An index built by this samtools into the cache (or one it built there before).

        :raises IndexMissing: building is not allowed, or the cache is not usable
        :raises NotCoordinateSorted: the BAM cannot be indexed
        """
        bam, header = self.bam, self.header
        if header.sort_order in ("unsorted", "queryname"):
            raise NotCoordinateSorted(
                f"{bam}: the BAM is not coordinate-sorted (SO:{header.sort_order}), so it cannot be indexed, and "
                f"ranges and BED intervals need an index (whole references and * are counted without one); "
                f"sort it first (samtools sort -o sorted.bam {bam.name})"
            )
        if not self.request.build_index:
            raise IndexMissing(f"{bam}: {reason}; drop --no-index-build so that bamcountd builds one into its cache")
        csi = any(ref.length > _BAI_MAX_LENGTH for ref in header.references)
        identity = None if self.remote is None else self.remote.info.key
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            if self.remote is not None and identity is None:  # known by its size alone: for this count only
                out = self.remote.folder / f"built.{'crai' if self.cram else 'csi' if csi else 'bai'}"
            else:
                out = cached_index_path(bam, self.cache, csi=csi, cram=self.cram, identity=identity)
        except OSError as error:
            raise IndexMissing(
                f"{bam}: {reason}, and the index cache {self.cache} is not usable ({error.strerror})"
            ) from None
        if not out.is_file():
            self.log.info("building_index", reason=reason, index=str(out))
            await st.build_index(self.samtools, bam, out, csi=csi, threads=available_cores())
        self.built = out
        if note:
            self.notes.append(f"{reason}; counted through an index built into the cache ({out})")
        return out

    # --- counting through the index ----------------------------------------------------

    async def view(self, index: Path, stats: Sequence[st.IndexStat]) -> tuple[list[int], str, int]:
        """Count every region through ``index``; verify whole references against it, and
        recover where region queries miss records that the BAM and the index both hold."""
        by_name, totals, earlier, account = self.prepare(index, stats)
        first = await self._pass(index, by_name, totals, account=account)
        checked = _check_pass(
            self.regions,
            self.whole,
            first,
            totals,
            components=None if self.containers is None else self.containers.components,
            ref_ids=self.ref_ids,
            earlier=earlier,
            index=str(index),
            unplaced_unrecorded=lambda: not self.cram and _uncounted_unplaced(index),
        )
        if checked.containers_differ:
            # Set the records against samtools' own count of them instead (it explains what the
            # headers cannot: which references differ, and why).
            self.log.info("containers_differ", index=str(index), missed=len(checked.missed))
            self.containers = None
            return await self.view(index, await self._idxstats(index))
        self.notes += checked.notes
        if checked.verification is not None:
            self._remember(index, first, checked.totals)
            return first.counts, checked.verification, first.shards
        return await self._recover(index, by_name, checked.totals, first, checked.missed)

    def prepare(
        self, index: Path, stats: Sequence[st.IndexStat]
    ) -> tuple[dict[str, st.IndexStat], list[int | None], bool, bool]:
        """What a count through ``index`` sets its regions against: the index's lines by name,
        each region's total (see _totals), whether an earlier count proved the pair record by
        record, and whether the shards must account for what the filters leave out."""
        self.index = index
        by_name = {stat.name: stat for stat in stats}
        if self.cram:  # a CRAI has no entry for a reference without records, and htslib says so
            self.empty = frozenset(
                i for i, ref in enumerate(self.header.references) if ref.name in by_name and not by_name[ref.name].reads
            )
        totals = self._totals(by_name)
        filtered = self.request.filters.active
        # samtools 1.22+ accounts at no cost (view -c --save-counts): no earlier proof is needed.
        trust = filtered and self.request.verify == "auto" and not self.samtools.supports_save_counts
        verdict = self._verdict(index) if trust else None
        earlier = verdict is not None and verdict.holds()
        return by_name, totals, earlier, filtered and not earlier

    async def _pass(
        self, index: Path, stats: dict[str, st.IndexStat], totals: Sequence[int | None], *, account: bool
    ) -> _Pass:
        shards = self.plan_pass(stats, totals, account=account)
        sweeps = sum(shard.kind == plan.SWEEP for shard in shards)
        for reader, _ in self.readers[sweeps:]:  # no sweep for them: they would only take a core
            reader.drop()
        del self.readers[sweeps:]
        reducer = self.reducer(totals, account=account)
        await self._run_shards(index, shards, reducer)
        return _Pass(reducer.counts, reducer.reached(), len(shards))

    def reducer(self, totals: Sequence[int | None], *, account: bool) -> _Reducer:
        return _Reducer(self.bam, self.regions, totals, filtered=self.request.filters.active, account=account)

    def plan_pass(
        self, stats: dict[str, st.IndexStat], totals: Sequence[int | None], *, account: bool, slots: int | None = None
    ) -> list[plan.Shard]:
        """The shards of one pass, cut for ``slots`` processes at once (default: this count's)."""
        slots = self.processes if slots is None else slots
        small_reads = min(self.request.min_shard_reads // 10, 20_000)
        policy = plan.ShardPolicy(
            slots=slots,
            split=self.request.split and self.samtools.supports_expressions,
            group=self.request.split,
            filtered=self.request.filters.active,
            account=account,
            min_reads=self.request.min_shard_reads,
            small_reads=small_reads,
            tally=frozenset(i for i in self.whole if totals[i] is None),
            sweep_from=plan.SWEEP_FROM,
        )
        with _collector_paused():
            swept = plan.swept_regions(self.regions, policy)
            weights = plan.region_weights(self.regions, stats, self.lengths, skip=swept)
            if self.cram and self.request.split and not self.request.filters.active:
                # Each CRAM shard pays samtools' start and its first container's decoding: cut into
                # about as many shards as the policy aims for, references grouped up to that size
                # (filtered, a group is tallied per reference, which costs more than the starts).
                per_shard = int(sum(weights) / (slots * plan.ShardPolicy.pieces_per_slot))
                policy = replace(policy, small_reads=max(small_reads, per_shard))
            index_empty = not any(stat.reads for stat in stats.values())
            densities = plan.densities(stats, self.lengths)
            shards = plan.plan_shards(
                self.regions, weights, self.lengths, policy, index_empty=index_empty, densities=densities, swept=swept
            )
        if account and self.request.verify == "auto" and not self.samtools.supports_save_counts:
            # Read as its own containers, a reference's records are all there by construction:
            # no region query has to be proved to reach them, so none is accounted.
            shards = [replace(s, kind=plan.COUNT) if s.kind == plan.ACCOUNT and self._own_run(s) else s for s in shards]
        shared = self._unsafe(self.index).shared
        if shared:  # a group that shares containers: tallied, which can read their run of them once
            shards = [
                replace(s, kind=plan.TALLY)
                if s.kind == plan.SUM and any(self.ref_ids[n] in shared for n in s.args)
                else s
                for s in shards
            ]
        self.log.debug("planned", regions=len(self.regions), shards=len(shards), processes=slots, threads=self.threads)
        return shards

    def _remember(self, index: Path, done: _Pass, totals: Sequence[int | None]) -> None:
        """Once every reference was set record by record against the index, say so for later
        filtered counts of this pair (see inputs.Verdict)."""
        proven = {
            plan.UNPLACED if region.reference is None else region.reference
            for region, reached, total in ((self.regions[i], done.reached[i], totals[i]) for i in self.whole)
            if total is not None and not region.everything and reached is not None
        }
        verdict = self._verdict(index) if {*self.lengths, plan.UNPLACED} <= proven else None
        if verdict is not None and not verdict.holds() and not verdict.record():
            self.log.debug("verdict_not_recorded", cache=str(self.cache))

    def _verdict(self, index: Path) -> Verdict | None:
        """The proof of reach for this input and ``index``; None for an object whose server
        gives neither an ETag nor a Last-Modified (its size alone would not tell a new one)."""
        if isinstance(self.bam, Path):
            return Verdict.of(self.bam, index, self.cache, self.samtools.version)
        assert self.remote is not None
        key = self.remote.info.key
        return None if key is None else Verdict.of_object(self.bam, key, index, self.cache, self.samtools.version)

    async def _recover(
        self,
        index: Path,
        stats: dict[str, st.IndexStat],
        totals: Sequence[int | None],
        first: _Pass,
        missed: Sequence[int],
    ) -> tuple[list[int], str, int]:
        """Region queries reached other numbers of records than the index holds.  One pass
        over the whole file (no index) tells whether the BAM holds what the index says: if
        not, the index is another file's or the BAM was cut short, and that is the error.  If
        it does, the queries miss records: records without a position, which no query
        returns, or records the index's bins lead past (some other tools' indexes).  The
        default rows then come from that pass; asked-for regions count through an index
        built by this samtools, and records without a position stay uncounted there, as in
        samtools, with a note."""
        bam, shards = self.bam, first.shards + 1
        if any(first.reached[i] is None for i in missed):  # an earlier proof, and yet: set it aside
            first = await self._pass(index, stats, totals, account=True)
            missed = _mismatches(self.regions, self.whole, first, totals)
            shards += first.shards
            if not missed:
                return first.counts, "index", shards
        found, positionless = await self._stream_tallies()
        for name in [*self.lengths, plan.UNPLACED]:
            data = found.get(os.fsencode(name), (0, 0))[0]
            stat = stats.get(name)
            expected = 0 if stat is None else stat.unmapped if name == plan.UNPLACED else stat.reads
            lacking = name == plan.UNPLACED and expected == 0 and not self.cram and _uncounted_unplaced(index)
            if data != expected and not lacking:
                raise IndexMismatch(
                    f"{bam}: its index ({index}) says {name} holds {expected} records, but the BAM holds {data}: "
                    "the index belongs to another file, or the BAM was cut short (truncated at a block boundary) "
                    "or changed during the count; re-index it with `samtools index` if the BAM is whole"
                )
        unexplained = self._shortfalls(first, totals, missed, positionless)
        if unexplained:
            self.log.warning("queries_miss_records", index=str(index), missed=unexplained)
        if self.whole_file:
            if unexplained:
                self.notes.append(
                    f"region queries through {index} miss records that the BAM and the index both hold "
                    f"({unexplained}); the rows were counted from one pass over the whole file instead"
                )
            return self._from_tallies(found), "index", shards
        if unexplained:
            if self.built == index:
                raise IndexMismatch(
                    f"{bam}: region queries through the index built from it miss records ({unexplained}); "
                    "the BAM changed during the count"
                )
            reason = (
                f"region queries through its index {index} miss records that the BAM and the index both hold "
                f"({unexplained}), as through some indexes written by other tools"
            )
            try:
                fresh = await self.fresh_index(reason)
            except NotCoordinateSorted:
                if not all(region.whole for region in self.regions):
                    raise
                # An index next to a BAM that is not sorted (another file's): the pass has the counts.
                self.notes.append(f"{reason}; the BAM is not coordinate-sorted, so they come from one pass over it")
                self.index = None
                return self._from_tallies(found), "stream", shards
            fresh_stats = {stat.name: stat for stat in await self._idxstats(fresh)}
            self.index = fresh
            again = await self._pass(fresh, fresh_stats, totals, account=self.request.filters.active)
            shards += again.shards
            missed = _mismatches(self.regions, self.whole, again, totals)
            unexplained = self._shortfalls(again, totals, missed, positionless)
            if unexplained:
                raise IndexMismatch(
                    f"{bam}: region queries through the index built from it miss records ({unexplained}); "
                    "the BAM changed during the count"
                )
            if not missed:
                self._remember(fresh, again, totals)
            first = again
        return first.counts, "index", shards

    def _shortfalls(
        self, done: _Pass, totals: Sequence[int | None], missed: Sequence[int], positionless: dict[bytes, int]
    ) -> str:
        """The mismatches that records without a position do not explain, described; a note
        for those they do."""
        unexplained: list[str] = []
        for i in missed:
            region, reached, total = self.regions[i], done.reached[i], totals[i]
            assert total is not None  # an unknown total is never missed
            short = total - (reached or 0)
            without = positionless.get(os.fsencode(region.reference), 0) if region.reference is not None else 0
            if reached is not None and short == without > 0:
                where = (
                    "the rows come from one pass over the whole file, which counts such records under their reference"
                    if self.whole_file
                    else f"{region.label} leaves such records out, as samtools does (the default rows count them)"
                )
                note = (
                    f"{_records(short)} of {region.reference} without a position (POS 0), which no region query "
                    f"returns: {where}"
                )
                if note not in self.notes:  # the second pass, through a fresh index, finds them again
                    self.notes.append(note)
            else:
                unexplained.append(f"{region.label}: {short} of {totals[i]}")
        return ", ".join(unexplained)

    # --- one pass over the whole file ------------------------------------------------------

    async def stream(self) -> list[int]:
        """Every region (whole references, ``*``, ``.``) from one pass over the whole file."""
        found, _ = await self._stream_tallies()
        return self._from_tallies(found)

    async def _stream_tallies(self) -> tuple[dict[bytes, tuple[int, int]], dict[bytes, int]]:
        """(records, passing) per reference name, by reading the file from start to end: what
        the whole-file ``samtools view -c`` counts, split by reference as ``idxstats`` would."""
        bam, request = self.bam, self.request
        self.log.info("streaming", reason="counted in one pass over the whole file")
        with _named_failures(f"{bam}: the whole file", request.timeout):
            async with self.limiter if self.limiter is not None else nullcontext():
                stream = await st.run_stream(
                    self.samtools,
                    bam,
                    filters=request.filters,
                    threads=max(available_cores(), self.threads),
                    timeout=request.timeout,
                )
        names = stream.passed.keys() | stream.failed.keys()
        found = {
            name: (stream.passed.get(name, 0) + stream.failed.get(name, 0), stream.passed.get(name, 0))
            for name in names
        }
        return found, stream.positionless

    def _from_tallies(self, found: dict[bytes, tuple[int, int]]) -> list[int]:
        counts: list[int] = []
        for region in self.regions:
            if region.everything:
                counts.append(sum(passed for _, passed in found.values()))
            else:
                name = region.reference if region.reference is not None else plan.UNPLACED
                counts.append(found.get(os.fsencode(name), (0, 0))[1])
        return counts

    # --- shards ----------------------------------------------------------------------------

    async def _run_shards(self, index: Path, shards: Sequence[plan.Shard], reducer: _Reducer) -> None:
        """Every shard under the limiters, each result streamed to ``reducer`` as it comes; the
        extra shards the reducer asks for (to explain a mismatch) run the same way."""
        if not shards:
            return
        self._unsafe(index)
        local = _Slots(self.thread_slots or (self.threads,) * self.processes)
        send, receive = anyio.create_memory_object_stream[_Outcome](max_buffer_size=self.processes)
        with tempfile.TemporaryDirectory(prefix="bamcountd-") as scratch_name:
            scratch = Path(scratch_name)
            started = len(shards)
            pending = _Pending(shards, len(self.regions))
            try:
                with send, receive:  # ours stays open until every shard, extra ones too, reported
                    async with anyio.create_task_group() as group:
                        for number, shard in enumerate(shards):  # costliest first: they take the most threads
                            group.start_soon(self._run_one, index, shard, (number, scratch), send.clone(), local)
                        while reducer.done < started:
                            outcome = await receive.receive()
                            extras = reducer.add(outcome)
                            pending.add(extras)
                            for extra in extras:
                                group.start_soon(self._run_one, index, extra, (started, scratch), send.clone(), local)
                                started += 1
                            pending.done(outcome.shard)
                            if self.progress is not None:
                                self.progress(pending.finished, len(self.regions))
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None

    async def _run_one(
        self,
        index: Path,
        shard: plan.Shard,
        where: tuple[int, Path],
        results: ObjectSendStream[_Outcome],
        local: _Slots,
    ) -> None:
        """Run one shard: a ``view -c`` (with the file it saves its counts to), or a tally.  A
        URL's shard that samtools could not read is tried again (bounded) while the object is
        still there and the same: htslib does not retry a dropped connection."""
        what = f"{self.bam}: region {shard.label}"
        async with results, local.take() as threads:
            how = self._command(index, where[0], shard, where[1], threads)
            with _named_failures(what, self.request.timeout):
                async with self.limiter if self.limiter is not None else nullcontext():
                    for attempt in range(1, ATTEMPTS + 1):
                        outcome = await self._attempt(index, shard, how, threads)
                        failure = outcome.completed.describe_failure()
                        if self.remote is None or failure is None:
                            break
                        await self.remote.recheck()  # gone, expired or changed: that is the error
                        self.log.warning("shard_retried", region=shard.label, attempt=attempt, failure=failure)
                        if attempt == ATTEMPTS:
                            raise RemoteUnavailable(
                                f"{what}: samtools could not read the object in {ATTEMPTS} tries ({failure})"
                            )
                        await anyio.sleep(pause(attempt))
                    if shard.kind == plan.ACCOUNT and how[0] is not None:
                        tallies = {st.WHOLE_STREAM: st.parse_saved_counts(outcome.completed, how[1], what)}
                        outcome = _Outcome(shard, outcome.completed, tallies)
            await results.send(outcome)

    async def _attempt(self, index: Path, shard: plan.Shard, how: _Command, threads: int) -> _Outcome:
        argv, where = how
        if shard.kind == plan.SWEEP:
            return await self._sweep(index, shard, where, threads)
        if argv is None:
            return await self._tally(index, shard, where, threads)
        piped = self._own_run(shard)
        if piped is not None:
            self.log.debug("count_piped", region=shard.label, bytes=sum(end - first for first, end in piped.ranges))
        completed = await st.run(
            argv, timeout=self.request.timeout, env=self.samtools.env, cwd=self.samtools.cwd, piped=piped
        )
        if shard.bed and self.empty:
            completed = st.without_empty_reference_notes(completed, self.empty)
        return _Outcome(shard, completed)

    def _command(self, index: Path, number: int, shard: plan.Shard, scratch: Path, threads: int) -> _Command:
        """How shard ``number`` runs with ``threads``: its ``view -c`` argv, or None for a tally (see _Command)."""
        samtools, bam, filters = self.samtools, self.bam, self.request.filters
        if shard.kind == plan.SWEEP:
            return None, scratch / f"sweep{number}.intervals"  # written as it starts (see _sweep)
        saved: Path | None = None
        if shard.kind == plan.ACCOUNT:
            # samtools 1.22+ saves what one `view -c` reached; a boundary correction's
            # `-e 'pos < S'` would count as rejected there, so corrections are tallied.
            if not samtools.supports_save_counts or shard.expression is not None:
                return None, scratch
            saved = scratch / f"counts{number}.json"
        if not shard.bed:
            argv = st.count_argv(
                samtools,
                bam,
                index,
                shard.args,
                filters=filters,
                threads=threads,
                expression=shard.expression,
                save_counts=saved,
                piped=self._own_run(shard) is not None,
            )
            return argv, scratch if saved is None else saved
        if self._one_query_each(shard):
            if shard.kind == plan.TALLY:
                return None, scratch
            whole = tuple(map(plan.reference_arg, shard.args))
            return st.count_argv(samtools, bam, index, whole, filters=filters, threads=threads), scratch
        bed = _write_bed(scratch / f"group{number}.bed", shard.args, self.lengths)
        if shard.kind == plan.TALLY:
            return None, bed
        # An unfiltered group's total is checked against the index (see _Reducer.add).
        return st.count_argv(samtools, bam, index, (), filters=filters, threads=threads, bed=bed), scratch

    def _own_run(self, shard: plan.Shard) -> st.ByteRanges | None:
        """What samtools reads instead of a whole reference's region query, for the default rows
        of a local CRAM 3: the reference's own run of containers (cramfile._own_runs), each of
        its records once, through no index, and no other's; None for any other shard."""
        containers = self.containers
        if containers is None or self.remote is not None or not isinstance(self.bam, Path):
            return None
        if not self.whole_file or shard.kind not in (plan.COUNT, plan.ACCOUNT) or len(shard.regions) != 1:
            return None
        region = self.regions[shard.regions[0]]
        if not region.whole or region.everything or shard.expression is not None or shard.sign != 1:
            return None
        run = containers.own_runs.get(UNPLACED_ID if region.reference is None else self.ref_ids[region.reference])
        if run is None or shard.args != (region.samtools_arg(),):
            return None
        return st.ByteRanges(self.bam, ((0, containers.header_end), run), EOF_CONTAINER)

    def _unsafe(self, index: Path | None) -> Unsafe:
        """This count's references that its samtools' multi-region iterator may misread through
        ``index`` (none but for a CRAM, and a samtools before 1.18), found once per index."""
        if index is None or not self.cram or self.samtools.multi_region_reads_any_crai:
            return Unsafe(frozenset(), frozenset())
        if self.unsafe_found[0] != index:
            self.unsafe_found = (index, multi_region_unsafe(index))  # a CRAI is small: read here
            count = len(self.unsafe_found[1].all)
            if count:
                self.log.info("multi_region_avoided", references=count)
                self.notes.append(
                    f"samtools {self.samtools.version}'s multi-region iterator misreads CRAM indexes whose slices "
                    f"nest or share containers (fixed in 1.18); {count} references of {index} are like that, and "
                    "were read without it (their run of containers as a stream, or a query each)"
                )
        return self.unsafe_found[1]

    def _one_query_each(self, shard: plan.Shard) -> bool:
        """Whether a group's or a sweep's references must each be read by a query of their own,
        not by the multi-region iterator, which this samtools may misread their index with."""
        unsafe = self.unsafe_found[1].all
        if not unsafe or not (shard.bed or shard.kind == plan.SWEEP):
            return False
        names = shard.args if shard.bed else dict.fromkeys(name for name, _, _ in shard.stretches)
        return any(self.ref_ids[name] in unsafe for name in names)

    @cached_property
    def columns(self) -> tuple[Sequence[str], Sequence[int], Sequence[int]]:
        """The regions' references, 0-based starts and ends (for sweeps: ranges on named references)."""
        return cast(tuple[Sequence[str], Sequence[int], Sequence[int]], plan.region_columns(self.regions))

    async def _sweep(self, index: Path, shard: plan.Shard, where: Path, threads: int) -> _Outcome:
        """A sweep: ``view -u [filters]`` of the shard's stretches into the interval sweep
        (:mod:`bamcountd.overlaps`), which credits each read to every one of the shard's ranges
        it overlaps.  Its files are written here (``where``: its intervals file, unless its
        reader was started ahead with its own), so that the first sweeps run while the others'
        are written."""
        ahead = self.readers.pop() if self.readers else None
        # A reader started already reads its own file, once samtools starts.
        intervals = where if ahead is None else ahead[1]
        references, all_starts, all_ends = self.columns
        chosen = shard.regions
        mine = list(map(references.__getitem__, chosen))
        names = list(dict.fromkeys(mine))
        numbers = list(map({name: k for k, name in enumerate(names)}.__getitem__, mine))
        starts = list(map(all_starts.__getitem__, chosen))  # 0-based, as a BED's
        intervals.write_bytes(write_intervals_file(names, numbers, starts, list(map(all_ends.__getitem__, chosen))))
        stretches: Path | None = None
        whole: tuple[str, ...] = ()
        if self._one_query_each(shard):  # whole references: the sweep credits only its ranges
            whole = tuple(map(plan.reference_arg, dict.fromkeys(n for n, _, _ in shard.stretches)))
        else:
            stretches = where.with_suffix(".bed")
            stretches.write_bytes(write_intervals(shard.stretches))
        tally = await st.run_tally(
            self.samtools,
            st.with_index(self.bam, index),
            regions=whole,
            bed=stretches,
            filters=self.request.filters,
            readers=_reader_argv(intervals) if ahead is None else ahead[0],
            threads=threads,
            one_query_each=bool(whole),
            cwd=where.parent,
            timeout=self.request.timeout,
        )
        counts = st.parse_sweep(tally, len(shard.regions), f"{self.bam}: region {shard.label}")
        return _Outcome(shard, tally.view, counts=counts)

    async def _tally(self, index: Path, shard: plan.Shard, where: Path, threads: int) -> _Outcome:
        """A shard counted with the records its filters leave out: a group by its BED (per
        reference), or one region (one total, ``-e`` applied to both streams)."""
        bam, request = self.bam, self.request
        regions: tuple[str, ...] = ()
        one_query_each = self._one_query_each(shard)
        run = await self._containers_of(index, shard, where) if one_query_each and shard.kind == plan.TALLY else None
        piped, others = (None, frozenset[bytes]()) if run is None else run
        if piped is not None:  # ``where``: the scratch folder
            bed, cwd, readers = None, where, st.PER_REFERENCE
        elif shard.kind == plan.TALLY and one_query_each:
            bed, cwd, readers, regions = None, where, st.PER_REFERENCE, tuple(map(plan.reference_arg, shard.args))
        elif shard.kind == plan.TALLY:
            bed, cwd, readers = where, where.parent, st.PER_REFERENCE
        else:
            bed, cwd, readers, regions = None, where, st.TOTAL, shard.args
            piped = self._own_run(shard)
            if piped is not None:
                regions = ()
        if piped is not None:
            source = "-"
            self.log.debug("tally_piped", region=shard.label, bytes=sum(end - first for first, end in piped.ranges))
        else:
            source = st.with_index(bam, index) if (regions or bed is not None) else st.source(bam)
        tally = await st.run_tally(
            self.samtools,
            source,
            regions=regions,
            bed=bed,
            filters=request.filters,
            expression=shard.expression,
            readers=readers,
            threads=threads,
            one_query_each=one_query_each,
            piped=piped,
            cwd=cwd,
            timeout=request.timeout,
        )
        if bed is not None and self.empty:
            tally = replace(tally, view=st.without_empty_reference_notes(tally.view, self.empty))
        what = f"{bam}: region {shard.label}"  # a big header makes long tables: off the loop
        tallies = await anyio.to_thread.run_sync(st.parse_tally, tally, what)
        for name in others:  # records of other references in the run: their own shards count them
            tallies.pop(name, None)
        return _Outcome(shard, tally.view, tallies)

    async def _containers_of(
        self, index: Path, shard: plan.Shard, scratch: Path
    ) -> tuple[st.ByteRanges, frozenset[bytes]] | None:
        """A CRAM 3's bytes that hold a group's records: its header, the run of containers from
        the first with the group's records to the last, the EOF container; and the names of the
        other references (``*`` too) that run holds records of, which are not the group's to
        count.  samtools reads them as a stream, each record once, through no index; a URL's
        are fetched into ``scratch`` first.  A CRAM 2.1's containers are found by its CRAI.  None
        where the containers are out of order, or for a CRAM 2.0 (it ends in no EOF container)."""
        refs = frozenset(self.ref_ids[name] for name in shard.args)
        remote = self.remote
        containers: Sequence[Container] | None
        if remote is None and self.containers is not None:  # a local CRAM 3's, from their headers
            containers, header_end, eof = self.containers.containers, self.containers.header_end, EOF_CONTAINER
        else:
            if remote is None:  # a local CRAM 2.1's (None for any other: a query each)
                assert isinstance(self.bam, Path)
                containers, eof = await anyio.to_thread.run_sync(cram2_containers, self.bam, index), EOF_CONTAINER_2
            elif remote.cram_eof is not None:
                eof = remote.cram_eof
                find = partial(crai_containers, index, data_end=remote.info.size - len(eof))
                containers = await anyio.to_thread.run_sync(find)
            else:
                return None
            header_end = containers[0][0] if containers else 0
        run = container_run(containers, refs) if containers else None
        if run is None:
            return None
        ranges, others = ((0, header_end), run[:2]), self._names(run.others)
        if remote is None:
            assert isinstance(self.bam, Path)
            return st.ByteRanges(self.bam, ranges, eof), others
        from bamcountd import remote as http  # (a local count imports no http.client)

        fd, name = tempfile.mkstemp(prefix="containers-", suffix=".cram", dir=scratch)
        os.close(fd)
        out = Path(name)
        await anyio.to_thread.run_sync(partial(http.fetch_ranges, remote.url, ranges, out, info=remote.info))
        return st.ByteRanges(out, ((0, out.stat().st_size),), eof), others

    def _names(self, ref_ids: Iterable[int]) -> frozenset[bytes]:
        """The names of references by header number, -1 as ``*``, as samtools prints them."""
        references = self.header.references
        return frozenset(os.fsencode(references[i].name if i >= 0 else plan.UNPLACED) for i in ref_ids)


def _lacks_statistics(index: Path) -> bool:
    from bamcountd.indexfile import lacks_statistics  # here: only asked when idxstats shows no records

    return lacks_statistics(index)


def _uncounted_unplaced(index: Path) -> bool:
    from bamcountd.indexfile import lacks_unplaced_count

    return lacks_unplaced_count(index)


def _records(n: int) -> str:
    return f"{n} record" if n == 1 else f"{n} records"


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a region list's hundreds of thousands of tuples are
    made or walked: they hold no cycles, and each collection would walk them all again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _named_failures(what: str, timeout: float | None) -> Iterator[None]:
    """A samtools run's timeout or failed start, said with what was being counted."""
    try:
        yield
    except SamtoolsTimeout:
        raise SamtoolsTimeout(f"{what}: samtools killed after the {timeout:g} s time limit") from None
    except OSError as error:
        raise SamtoolsFailed(f"{what}: cannot start samtools: {error}") from None


def _mismatches(
    regions: Sequence[plan.Region], whole: Sequence[int], done: _Pass, totals: Sequence[int | None]
) -> list[int]:
    """Whole regions (``whole``, by number) whose records reached differ from the index's (or,
    where filters left records uncounted, whose count exceeds it)."""
    missed: list[int] = []
    for i in whole:
        total = totals[i]
        if total is None:  # unknown to the index
            continue
        reached = done.reached[i]
        if (reached is not None and reached != total) or (reached is None and done.counts[i] > total):
            missed.append(i)
    return missed


def _ref_id(region: plan.Region, ref_ids: dict[str, int]) -> int | None:
    if region.everything:
        return None
    if region.reference is None:
        return UNPLACED_ID
    return ref_ids[region.reference]


#: A CRAM's components: references sharing multi-reference containers, and their records.
_Components = Sequence[tuple[Collection[int], int]]


def _components_hold(
    components: _Components,
    regions: Sequence[plan.Region],
    ref_ids: dict[str, int],
    done: _Pass,
    totals: list[int | None],
) -> bool:
    """Every component of references sharing multi-reference containers that the count
    asked for reached as many records as its containers hold; their totals are then the
    records reached.  False when one did not, or when only some of its references were
    counted whole (nothing to set their records against)."""
    by_ref = {_ref_id(r, ref_ids): i for i, r in enumerate(regions) if r.whole and not r.everything}
    everything = any(region.everything for region in regions)
    for refs, total in components:
        members = [by_ref.get(ref) for ref in refs]
        if not everything and all(i is None for i in members):
            continue  # none of it asked for
        if any(i is None or done.reached[i] is None for i in members):
            return False
        if sum(done.reached[i] or 0 for i in members if i is not None) != total:
            return False
        for i in members:
            assert i is not None
            totals[i] = done.reached[i]
    for i, region in enumerate(regions):
        if region.everything:
            totals[i] = sum(done.reached[j] or 0 for j in by_ref.values())
    return True


class _Checked(NamedTuple):
    """What one pass's counts came to, set against the index (or a CRAM's containers)."""

    verification: str | None  # None: whole regions missed records (``missed``): recover
    missed: list[int]
    totals: list[int | None]  # as the check left them (components' filled in, an unrecorded * dropped)
    notes: list[str]
    containers_differ: bool  # a CRAM's container headers do not explain the pass: ask idxstats


def _check_pass(
    regions: Sequence[plan.Region],
    whole: Sequence[int],
    done: _Pass,
    totals: Sequence[int | None],
    *,
    components: _Components | None,
    ref_ids: dict[str, int],
    earlier: bool,
    index: str,
    unplaced_unrecorded: Callable[[], bool],
) -> _Checked:
    """The one verification of a pass, a single job's or a scattered count's gathered parts:
    whole regions' records reached against the index's totals (a CRAM's components by their
    sum); ``unplaced_unrecorded`` says whether the index lacks the count of unplaced reads."""
    checked_totals = list(totals)
    missed = _mismatches(regions, whole, done, checked_totals)
    # An earlier count proved the pair record by record (components included): a filtered
    # count that did not account for what it left out has nothing to set against them.
    if components is not None:
        held = earlier or _components_hold(components, regions, ref_ids, done, checked_totals)
        if missed or not held:
            return _Checked(None, missed, checked_totals, [], True)
    notes: list[str] = []
    unplaced = [i for i in missed if regions[i].reference is None and not regions[i].everything]
    if unplaced and all(checked_totals[i] == 0 for i in unplaced) and unplaced_unrecorded():
        # A BAI's count of unplaced reads is optional: without it, * is counted, not checked.
        notes.append(f"its index {index} does not record how many unplaced reads there are: * is not checked")
        checked_totals = [None if i in unplaced else total for i, total in enumerate(checked_totals)]
        missed = _mismatches(regions, whole, done, checked_totals)
    if missed:
        return _Checked(None, missed, checked_totals, notes, False)
    verification = "earlier" if earlier else "containers" if components is not None else "index"
    if not whole:
        verification = "none"
    return _Checked(verification, [], checked_totals, notes, False)


def _check_index_names(bam: Path | Url, header: st.Header, stats: Sequence[st.IndexStat]) -> None:
    # idxstats prints the header's names with the index's numbers, so this catches an index
    # with a different number of references only; the count cross-check catches the rest.
    named = [stat.name for stat in stats if stat.name != plan.UNPLACED]
    if len(named) != len(header.references):
        raise IndexMismatch(f"{bam}: the index describes {len(named)} references, the header {len(header.references)}")


def _check_whole(bam: Path | Url, regions: Sequence[plan.Region]) -> None:
    for region in regions:
        if not region.whole:
            raise BadOption(f"{bam}: --method index counts whole references only, not {region.label!r}")


def _index_total(region: plan.Region, stats: dict[str, st.IndexStat]) -> int | None:
    """The index's records for a whole region (None for a range: the index cannot say)."""
    if region.start is not None or region.end is not None:
        return None
    if region.everything:
        return sum(stat.reads if stat.name != plan.UNPLACED else stat.unmapped for stat in stats.values())
    if region.reference is None:
        return stats[plan.UNPLACED].unmapped if plan.UNPLACED in stats else 0
    return stats[region.reference].reads


def _write_bed(path: Path, names: Sequence[str], lengths: dict[str, int]) -> Path:
    # -L keeps reads that start before END.  Reads further out make the group's records differ
    # from the index, and those references are then counted one at a time.
    ends = (plan.bed_end(lengths[name]) for name in names)
    path.write_bytes(b"".join(os.fsencode(f"{name}\t0\t{end}\n") for name, end in zip(names, ends, strict=True)))
    return path


class _Slots:
    """The processes that may run at once, each with its threads: a shard takes the free one
    with the most threads, so that the shards started first (the costliest: plans sort them so)
    get the most, and a big slot that frees goes to the next shard waiting."""

    def __init__(self, threads: Sequence[int]) -> None:
        self._free = sorted(threads, reverse=True)
        self._limiter = anyio.CapacityLimiter(len(self._free))

    @asynccontextmanager
    async def take(self) -> AsyncIterator[int]:
        async with self._limiter:  # waiters are served in the order they came
            threads = self._free.pop(0)
            try:
                yield threads
            finally:
                self._free.append(threads)
                self._free.sort(reverse=True)


class _Pending:
    """How many regions are done, from the shards still out: a region is done when the last
    of its shards is.  Most regions are in one shard, so only those in several are followed
    one by one."""

    def __init__(self, shards: Sequence[plan.Shard], regions: int) -> None:
        # A swept range is in one sweep and in no other shard (plan._sweeps): only the others
        # are counted one by one.
        swept = sum(len(shard.regions) for shard in shards if shard.kind == plan.SWEEP)
        uses = Counter(chain.from_iterable(shard.regions for shard in shards if shard.kind != plan.SWEEP))
        self.finished = regions - len(uses) - swept  # regions in no shard at all
        self._shared = {i: n for i, n in uses.items() if n > 1}

    def add(self, extras: Sequence[plan.Shard]) -> None:
        """More shards for regions of the shard about to be :meth:`done` (a recount)."""
        for shard in extras:
            for i in shard.regions:
                self._shared[i] = self._shared.get(i, 1) + 1

    def done(self, shard: plan.Shard) -> None:
        common = self._shared.keys() & set(shard.regions) if self._shared else set()
        for i in common:
            self._shared[i] -= 1
            if not self._shared[i]:
                del self._shared[i]
                self.finished += 1
        self.finished += len(shard.regions) - len(common)


class _Reducer:
    """Verifies each finished samtools command and adds it to its regions, as it arrives."""

    def __init__(
        self,
        bam: Path | Url,
        regions: Sequence[plan.Region],
        index_totals: Sequence[int | None],
        *,
        filtered: bool,
        account: bool,
    ) -> None:
        self.bam = bam
        self.regions = regions
        self.counts = [0] * len(regions)
        self.done = 0
        self._reached = [0] * len(regions)
        self._unknown: set[int] = set()  # regions with filtered, unaccounted shards
        self._index_totals = index_totals
        self._filtered = filtered
        self._account = account

    def _total(self, i: int) -> int:
        total = self._index_totals[i]
        assert total is not None  # groups hold whole references, whose totals the index always has
        return total

    def reached(self) -> list[int | None]:
        reached: list[int | None] = list(self._reached)
        deque(map(reached.__setitem__, self._unknown, repeat(None)), maxlen=0)  # (a sweep's 200,000 at C speed)
        return reached

    def add(self, outcome: _Outcome) -> list[plan.Shard]:
        """Take one result; return shards that must run instead of it (a group to recount)."""
        shard, completed = outcome.shard, outcome.completed
        what = f"{self.bam}: region {shard.label}"
        self.done += 1
        if shard.kind == plan.COUNT:
            count = st.parse_count(completed, what)
            index = shard.regions[0]
            self.counts[index] += shard.sign * count
            self._reached[index] += shard.sign * count
            if self._filtered:
                self._unknown.add(index)
        elif shard.kind == plan.ACCOUNT:
            assert outcome.tallies is not None
            reached, count = outcome.tallies.get(st.WHOLE_STREAM, (0, 0))
            self.counts[shard.regions[0]] += shard.sign * count
            self._reached[shard.regions[0]] += shard.sign * reached
        elif shard.kind == plan.SWEEP:
            assert outcome.counts is not None
            # A swept range is in this sweep alone (plan._sweeps): its count is the sweep's.
            deque(map(self.counts.__setitem__, shard.regions, outcome.counts), maxlen=0)
            self._unknown.update(shard.regions)  # ranges: nothing to set them against
            count = sum(outcome.counts)
        elif shard.kind == plan.SUM:
            count = st.parse_count(completed, what)
            if count != sum(self._total(i) for i in shard.regions):
                # Which references differ, the group's own tally tells: one more pass over it.
                log.warning("group_tallied", bam=str(self.bam), references=len(shard.regions), read=count)
                return [plan.Shard(shard.regions, shard.args, kind=plan.TALLY, weight=shard.weight)]
            for i in shard.regions:  # the data was read and its sum verified; the split is the index's
                self.counts[i] += self._total(i)
                self._reached[i] += self._total(i)
        else:
            count, again = self._add_tally(shard, outcome.tallies, what)
            log.debug(
                "shard_counted", bam=str(self.bam), region=shard.label, count=count, seconds=round(completed.seconds, 4)
            )
            return again
        log.debug(
            "shard_counted", bam=str(self.bam), region=shard.label, count=count, seconds=round(completed.seconds, 4)
        )
        return []

    def _add_tally(
        self, shard: plan.Shard, tallies: dict[bytes, tuple[int, int]] | None, what: str
    ) -> tuple[int, list[plan.Shard]]:
        """A group's tally: references whose records match the index are done; the others
        (reads placed past a reference's end, beyond the group's BED; an index that is not
        this BAM's) are counted again one at a time, and only they."""
        assert tallies is not None
        names = {os.fsencode(self.regions[i].reference or ""): i for i in shard.regions}
        unknown = set(tallies) - set(names)
        if unknown:
            raise SamtoolsBadOutput(f"{what}: samtools returned records on {sorted(unknown)!r}")
        again: list[plan.Shard] = []
        count = 0
        for name, i in names.items():
            reached, passed = tallies.get(name, (0, 0))
            total = self._index_totals[i]
            if total is None or reached == total:  # None: checked with its component (count._Job)
                self.counts[i] += passed
                self._reached[i] += reached
                count += passed
            else:
                kind = plan.ACCOUNT if self._account else plan.COUNT
                again.append(plan.Shard((i,), (self.regions[i].samtools_arg(),), kind=kind))
        if again:
            log.warning("group_recounted", bam=str(self.bam), references=len(again), of=len(shard.regions))
        return count, again


class _PartReducer(_Reducer):
    """A part's reducer: each shard's share of its regions, kept apart (with the shards a
    result sends to run instead, which count within its regions)."""

    def __init__(self, *args: Any, origins: dict[int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origins = origins  # id of a shard running -> the plan's shard it counts for
        self._shares: dict[int, dict[int, tuple[int, int, bool]]] = {}

    def add(self, outcome: _Outcome) -> list[plan.Shard]:
        members = set(outcome.shard.regions)
        origin = self.origins.pop(id(outcome.shard))
        before = {i: (self.counts[i], self._reached[i]) for i in members}
        kept, self._unknown = self._unknown, set()  # what this result leaves unknown, alone
        extras = super().add(outcome)
        marked, self._unknown = self._unknown, kept | self._unknown
        share = self._shares.setdefault(origin, {})
        for i in members:
            count, reached, unknown = share.get(i, (0, 0, False))
            share[i] = (
                count + self.counts[i] - before[i][0],
                reached + self._reached[i] - before[i][1],
                unknown or i in marked,
            )
        self.origins.update((id(extra), origin) for extra in extras)
        return extras

    def share(self, number: int, shard: plan.Shard) -> ShardCounts:
        share = self._shares.get(number, {})
        rows = [share.get(i, (0, 0, False)) for i in shard.regions]
        return ShardCounts(number, tuple(c for c, _, _ in rows), tuple(None if u else r for _, r, u in rows))


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: ours first, then anything that is not a cancel."""
    leaves = leaf_exceptions(group)
    for leaf in leaves:
        if isinstance(leaf, BamcountdError):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, anyio.get_cancelled_exc_class()):
            return leaf
    return group
