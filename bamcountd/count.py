"""The orchestrator: checks, plan, concurrent samtools commands, streamed reduction.

Every shard's command runs under a capacity limiter; each finished command is sent at once
over a memory object stream to the reducer, which verifies it (exit status, stderr, output)
and adds it to its region.  The first bad result raises out of the task group, which
cancels the other shards; cancellation kills their samtools processes (see
:func:`bamcountd.samtools.run`), so a failed or interrupted count leaves no child behind.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectSendStream

from bamcountd import logs, plan
from bamcountd import samtools as st
from bamcountd.errors import (
    BadOption,
    BamcountdError,
    IndexMismatch,
    IndexMissing,
    NotCoordinateSorted,
    SamtoolsBadOutput,
    SamtoolsFailed,
    SamtoolsTimeout,
    leaf_exceptions,
)
from bamcountd.inputs import IndexLookup, cached_index_path, check_bam_file, default_cache_dir, find_index
from bamcountd.samtools import Filters

log = logs.get_logger("bamcountd")

METHODS = ("view", "index")
#: A BAI cannot address positions past 2^29 - 1; longer references need a CSI index.
_BAI_MAX_LENGTH = (1 << 29) - 1

ProgressCallback = Callable[[int, int], None]
#: Below this many expected reads, cutting a shard costs more in start-up than it saves.
DEFAULT_MIN_SHARD_READS = 200_000


@dataclass(frozen=True, kw_only=True)
class CountRequest:
    """What to count and how; every option has samtools' meaning where samtools has one."""

    bam: Path
    regions: tuple[str, ...] = ()
    regions_file: Path | None = None
    filters: Filters = field(default_factory=Filters)
    jobs: int = 10  # most samtools processes at once
    threads: int | None = None  # threads per samtools process; None picks from the cores
    timeout: float | None = None  # seconds per samtools command
    index: Path | None = None
    build_index: bool = True
    index_cache: Path | None = None
    samtools: str | None = None
    method: str = "view"
    split: bool = True  # balanced start-position shards for large references
    min_shard_reads: int = DEFAULT_MIN_SHARD_READS  # no smaller shards (tests lower it to force splits)


@dataclass(frozen=True)
class RegionCount:
    region: str
    count: int


@dataclass(frozen=True, kw_only=True)
class CountResult:
    bam: Path
    total: int
    regions: tuple[RegionCount, ...]
    filters: Filters
    samtools_version: str
    jobs: int
    threads: int
    method: str
    shards: int
    index: Path
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON contract other tools read (``bamcountd count --format json``)."""
        return {
            "bam": str(self.bam),
            "total": self.total,
            "regions": [{"region": r.region, "count": r.count} for r in self.regions],
            "filters": self.filters.as_dict(),
            "samtools": self.samtools_version,
            "jobs": self.jobs,
            "threads": self.threads,
            "method": self.method,
            "shards": self.shards,
            "index": str(self.index),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Outcome:
    shard: plan.Shard
    completed: st.Completed
    tallies: dict[bytes, tuple[int, int]] | None = None  # TALLY shards: (records, passing) per reference


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def choose_parallelism(jobs: int, threads: int | None, cores: int) -> tuple[int, int]:
    """(processes at once, threads per process) that fill the cores without oversubscribing.

    ``threads`` counts samtools' own thread: N means ``-@ N-1`` helpers.  Balanced shards make
    one thread per process the best use of the cores that ``--jobs`` lets processes fill: on 2
    cores two single-threaded processes took 3.39 s where one with two helpers took 4.30 s.  A
    single helper adds nothing (``samtools view -c -@1`` decompresses on one thread, as without
    it: 5.70 s against 5.48 s on 2 cores; ten processes with ``-@1`` on 16 cores were no faster).
    So only when ``--jobs`` leaves two or more cores per process idle does each process get a
    helper per core (``-j 1`` on 2 cores: ``-@2``, 4.30 s instead of 6.60 s).  ``--threads`` is
    taken as given, and then the process count shrinks to fit; ``--jobs`` always caps it.
    """
    if threads is not None:
        return max(1, min(jobs, cores // threads)), threads
    processes = max(1, min(jobs, cores))
    helpers = cores // processes
    return processes, helpers + 1 if helpers >= 2 else 1


def _validate(request: CountRequest) -> None:
    if request.jobs < 1:
        raise BadOption(f"--jobs must be at least 1, not {request.jobs}")
    if request.threads is not None and request.threads < 1:
        raise BadOption(f"--threads must be at least 1, not {request.threads}")
    if request.timeout is not None and not (math.isfinite(request.timeout) and request.timeout > 0):
        raise BadOption(f"--timeout must be positive, not {request.timeout}")
    if request.method not in METHODS:
        raise BadOption(f"--method must be one of {', '.join(METHODS)}, not {request.method!r}")
    if request.method == "index" and request.filters.active:
        raise BadOption("--method index reads only the index, so it cannot apply -f/-F/-G/-q filters")
    if not 0 <= request.filters.min_mapq <= 255:
        raise BadOption(f"--min-mapq must be between 0 and 255, not {request.filters.min_mapq}")


async def count_bam(
    request: CountRequest,
    *,
    limiter: anyio.CapacityLimiter | None = None,
    progress: ProgressCallback | None = None,
) -> CountResult:
    """Count the reads of one BAM per region; raise a :class:`BamcountdError` on any doubt.

    ``limiter`` is shared with other counts (the daemon's global cap on samtools processes);
    the request's own ``jobs`` still applies within it.
    """
    started = time.monotonic()
    _validate(request)
    executable = st.find(request.samtools)
    bam = check_bam_file(request.bam)
    lookup = find_index(bam, request.index)
    fresh = lookup.path if lookup.path is not None and not lookup.stale else None
    # The checks are independent samtools runs: start them together (a count of a small BAM
    # is mostly these), then report the first failure in this order.
    samtools, _, header, early_stats = await _gather(
        partial(st.locate, executable),
        partial(st.quickcheck, executable, bam),
        partial(st.read_header, executable, bam),
        partial(st.idxstats, executable, bam, fresh) if fresh is not None else _no_stats,
    )
    regions = plan.resolve_regions(header, request.regions, request.regions_file)
    index = fresh if fresh is not None else await _built_index(samtools, bam, header, request, lookup)
    index_stats = early_stats if early_stats is not None else await st.idxstats(executable, bam, index)
    stats = {stat.name: stat for stat in index_stats}
    _check_index_names(bam, header, stats)
    lengths = {ref.name: ref.length for ref in header.references}
    bound = log.bind(bam=str(bam))

    index_totals = [_index_total(region, stats) for region in regions]
    processes, threads = choose_parallelism(request.jobs, request.threads, available_cores())
    if request.method == "index":
        _check_whole(bam, regions)
        counts = index_totals
        shard_count = 0
    else:
        policy = plan.ShardPolicy(
            slots=processes,
            split=request.split and samtools.supports_expressions,
            group=request.split,
            filtered=request.filters.active,
            min_reads=request.min_shard_reads,
            small_reads=min(request.min_shard_reads // 10, 20_000),
        )
        weights = plan.region_weights(regions, stats, lengths)
        index_empty = not any(stat.reads for stat in stats.values())
        shards = plan.plan_shards(regions, weights, lengths, policy, index_empty=index_empty)
        bound.debug("planned", regions=len(regions), shards=len(shards), processes=processes, threads=threads)
        counts = await _run_shards(
            samtools,
            bam,
            index,
            regions,
            shards,
            index_totals=index_totals,
            lengths=lengths,
            request=request,
            processes=processes,
            threads=threads,
            limiter=limiter,
            progress=progress,
        )
        shard_count = len(shards)
        _cross_check(bam, regions, counts, index_totals, filtered=request.filters.active)
    result = CountResult(
        bam=bam,
        total=sum(counts),
        regions=tuple(RegionCount(r.label, c) for r, c in zip(regions, counts, strict=True)),
        filters=request.filters,
        samtools_version=samtools.version,
        jobs=request.jobs,
        threads=threads,
        method=request.method,
        shards=shard_count,
        index=index,
        seconds=time.monotonic() - started,
    )
    bound.info(
        "counted", total=result.total, regions=len(regions), shards=shard_count, seconds=round(result.seconds, 3)
    )
    return result


def count_bam_sync(request: CountRequest, *, progress: ProgressCallback | None = None) -> CountResult:
    """:func:`count_bam` for callers without an event loop."""
    return anyio.run(partial(count_bam, request, progress=progress))


async def _no_stats() -> None:
    return None


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


async def _built_index(
    samtools: st.Samtools, bam: Path, header: st.Header, request: CountRequest, lookup: IndexLookup
) -> Path:
    """Build (or reuse from the cache) an index for a BAM whose own is missing or stale."""
    if lookup.path is None:
        reason = "has no index (looked for .bai and .csi next to it)"
    else:
        reason = f"has an index older than the BAM ({lookup.path})"
    if not request.build_index:
        raise IndexMissing(f"{bam}: {reason}; run `samtools index` on it, or drop --no-index-build")
    if header.sort_order in ("unsorted", "queryname"):
        raise NotCoordinateSorted(
            f"{bam}: the BAM is not coordinate-sorted (SO:{header.sort_order}), so it cannot be indexed; "
            f"sort it first (samtools sort -o sorted.bam {bam.name})"
        )
    cache = Path(request.index_cache) if request.index_cache is not None else default_cache_dir()
    csi = any(ref.length > _BAI_MAX_LENGTH for ref in header.references)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        out = cached_index_path(bam, cache, csi=csi)
    except OSError as error:
        raise IndexMissing(f"{bam}: {reason}, and the index cache {cache} is not usable ({error.strerror})") from None
    if not out.is_file():
        log.info("building_index", bam=str(bam), reason=reason, index=str(out))
        await st.build_index(samtools, bam, out, csi=csi, threads=available_cores())
    return out


def _check_index_names(bam: Path, header: st.Header, stats: dict[str, st.IndexStat]) -> None:
    # idxstats prints the header's names with the index's numbers, so this catches an index
    # with a different number of references only; the count cross-check catches the rest.
    named = [name for name in stats if name != plan.UNPLACED]
    if len(named) != len(header.references):
        raise IndexMismatch(f"{bam}: the index describes {len(named)} references, the header {len(header.references)}")


def _check_whole(bam: Path, regions: Sequence[plan.Region]) -> None:
    for region in regions:
        if not region.whole:
            raise BadOption(f"{bam}: --method index counts whole references only, not {region.label!r}")


def _index_total(region: plan.Region, stats: dict[str, st.IndexStat]) -> int:
    if region.reference is None:
        return stats[plan.UNPLACED].unmapped if plan.UNPLACED in stats else 0
    return stats[region.reference].reads


def _cross_check(
    bam: Path,
    regions: Sequence[plan.Region],
    counts: Sequence[int],
    index_totals: Sequence[int],
    *,
    filtered: bool,
) -> None:
    """Compare whole-reference counts with the index's own totals.

    Unfiltered, they must be equal; filtered, a count can only be smaller.  A difference
    means the index was made from another file (or the file changed under us).
    """
    for region, count, expected in zip(regions, counts, index_totals, strict=True):
        if not region.whole:
            continue
        if count != expected and (not filtered or count > expected):
            raise IndexMismatch(
                f"{bam}: region {region.label} has {count} reads but its index says {expected}; "
                "the index does not belong to this BAM (or the BAM changed during the count): "
                "re-index it with `samtools index`"
            )


async def _run_shards(
    samtools: st.Samtools,
    bam: Path,
    index: Path,
    regions: Sequence[plan.Region],
    shards: Sequence[plan.Shard],
    *,
    index_totals: Sequence[int],
    lengths: dict[str, int],
    request: CountRequest,
    processes: int,
    threads: int,
    limiter: anyio.CapacityLimiter | None,
    progress: ProgressCallback | None,
) -> list[int]:
    reducer = _Reducer(bam, regions, index_totals)
    if not shards:
        return reducer.counts
    local = anyio.CapacityLimiter(processes)
    send, receive = anyio.create_memory_object_stream[_Outcome](max_buffer_size=processes)

    async def run_one(shard: plan.Shard, argv: list[str] | Path, results: ObjectSendStream[_Outcome]) -> None:
        """Run one shard: a ``view -c`` argument list, or the BED of a tally."""
        async with results, local:
            try:
                async with limiter if limiter is not None else nullcontext():
                    if isinstance(argv, list):
                        outcome = _Outcome(shard, await st.run(argv, timeout=request.timeout))
                    else:
                        tally = await st.run_tally(
                            samtools,
                            bam,
                            index,
                            argv,
                            filters=request.filters,
                            threads=threads,
                            cwd=argv.parent,
                            timeout=request.timeout,
                        )
                        what = f"{bam}: region {shard.label}"  # a big header makes long tables: off the loop
                        tallies = await anyio.to_thread.run_sync(st.parse_tally, tally, what)
                        outcome = _Outcome(shard, tally.view, tallies)
            except SamtoolsTimeout:
                raise SamtoolsTimeout(
                    f"{bam}: region {shard.label}: samtools killed after the {request.timeout:g} s time limit"
                ) from None
            except OSError as error:
                raise SamtoolsFailed(f"{bam}: cannot start samtools for {shard.label}: {error}") from None
            await results.send(outcome)

    with tempfile.TemporaryDirectory(prefix="bamcountd-") as scratch_name:
        scratch = Path(scratch_name)

        def command(number: int, shard: plan.Shard) -> list[str] | Path:
            if not shard.bed:
                return st.count_argv(
                    samtools,
                    bam,
                    index,
                    shard.args,
                    filters=request.filters,
                    threads=threads,
                    expression=shard.expression,
                )
            bed = _write_bed(scratch / f"group{number}.bed", shard.args, lengths)
            if shard.kind == plan.TALLY:
                return bed
            # An unfiltered group's total is checked against the index (see _Reducer.add).
            return st.count_argv(samtools, bam, index, (), filters=request.filters, threads=threads, bed=bed)

        started = len(shards)
        try:
            with send, receive:  # ours stays open until every shard, extra ones too, reported
                async with anyio.create_task_group() as group:
                    for number, shard in enumerate(shards):
                        group.start_soon(run_one, shard, command(number, shard), send.clone())
                    while reducer.done < started:
                        for extra in reducer.add(await receive.receive()):
                            group.start_soon(run_one, extra, command(started, extra), send.clone())
                            started += 1
                        if progress is not None:
                            progress(reducer.done, started)
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
    return reducer.counts


def _write_bed(path: Path, names: Sequence[str], lengths: dict[str, int]) -> Path:
    # -L keeps reads that start before END.  Reads further out make the group's total differ
    # from the index, and it is then counted one reference at a time.
    ends = (plan.bed_end(lengths[name]) for name in names)
    path.write_bytes(b"".join(os.fsencode(f"{name}\t0\t{end}\n") for name, end in zip(names, ends, strict=True)))
    return path


class _Reducer:
    """Verifies each finished samtools command and adds it to its regions, as it arrives."""

    def __init__(self, bam: Path, regions: Sequence[plan.Region], index_totals: Sequence[int]) -> None:
        self.bam = bam
        self.regions = regions
        self.counts = [0] * len(regions)
        self.done = 0
        self._index_totals = index_totals

    def add(self, outcome: _Outcome) -> list[plan.Shard]:
        """Take one result; return shards that must run instead of it (a group to recount)."""
        shard, completed = outcome.shard, outcome.completed
        what = f"{self.bam}: region {shard.label}"
        self.done += 1
        if shard.kind == plan.COUNT:
            count = st.parse_count(completed, what)
            self.counts[shard.regions[0]] += shard.sign * count
        elif shard.kind == plan.SUM:
            count = st.parse_count(completed, what)
            if count != sum(self._index_totals[i] for i in shard.regions):
                return self._one_by_one(shard, count)
            for i in shard.regions:  # the data was read and its sum verified; the split is the index's
                self.counts[i] += self._index_totals[i]
        else:
            tallies = outcome.tallies
            assert tallies is not None
            unknown = set(tallies) - {os.fsencode(self.regions[i].reference or "") for i in shard.regions}
            if unknown:
                raise SamtoolsBadOutput(f"{what}: samtools returned records on {sorted(unknown)!r}")
            found = [tallies.get(os.fsencode(self.regions[i].reference or ""), (0, 0)) for i in shard.regions]
            if any(every != self._index_totals[i] for i, (every, _) in zip(shard.regions, found, strict=True)):
                return self._one_by_one(shard, sum(every for every, _ in found))
            count = sum(passed for _, passed in found)
            for i, (_, passed) in zip(shard.regions, found, strict=True):
                self.counts[i] += passed
        log.debug(
            "shard_counted", bam=str(self.bam), region=shard.label, count=count, seconds=round(completed.seconds, 4)
        )
        return []

    def _one_by_one(self, shard: plan.Shard, count: int) -> list[plan.Shard]:
        # Reads past a reference's end, or an index that is not this BAM's: count each reference
        # whole; the final cross-check against the index then tells which it was.
        log.warning("group_recounted", bam=str(self.bam), references=len(shard.regions), read=count)
        return [plan.Shard((i,), (self.regions[i].samtools_arg(),)) for i in shard.regions]


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
