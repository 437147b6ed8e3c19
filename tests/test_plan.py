"""Regions as samtools reads them, and shards that never double count or drop a read."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamcountd import CountRequest, Filters, count_bam_sync, plan
from bamcountd.count import _Slots, choose_parallelism, process_cores, process_threads
from bamcountd.errors import AmbiguousRegion, BadRegionsFile, UnknownRegion
from bamcountd.plan import Region, ShardPolicy, default_region, default_regions, parse_region, plan_shards, read_bed
from bamcountd.samtools import Header
from bamcountd.samtools import Reference as HeaderReference
from bamcountd.synth import Reference, write_bam
from tests.support.bams import SAMTOOLS, oracle, samtools_count

LENGTHS = {"chr1": 1000, "chr1:weird": 500, "HLA-A*01:01:01:01": 300, "c}x": 10}


@pytest.mark.parametrize(
    ("text", "expected", "arg"),
    [
        ("chr1", Region("chr1", "chr1"), "{chr1}"),
        ("chr1:10-20", Region("chr1:10-20", "chr1", 10, 20), "{chr1}:10-20"),
        ("chr1:1,000-1,000", Region("chr1:1,000-1,000", "chr1", 1000, 1000), "{chr1}:1000-1000"),
        ("chr1:500", Region("chr1:500", "chr1", 500, None), "{chr1}:500-"),
        ("chr1:500-", Region("chr1:500-", "chr1", 500, None), "{chr1}:500-"),
        ("chr1:-20", Region("chr1:-20", "chr1", 1, 20), "{chr1}:1-20"),
        ("chr1:weird", Region("chr1:weird", "chr1:weird"), "{chr1:weird}"),
        ("{chr1:weird}:5-9", Region("{chr1:weird}:5-9", "chr1:weird", 5, 9), "{chr1:weird}:5-9"),
        ("HLA-A*01:01:01:01", Region("HLA-A*01:01:01:01", "HLA-A*01:01:01:01"), "{HLA-A*01:01:01:01}"),
        ("c}x", Region("c}x", "c}x"), "{c}x}"),  # htslib reads {c}x} as c}x
        ("*", Region("*", None), "*"),
    ],
)
def test_parse_region(text: str, expected: Region, arg: str) -> None:
    region = parse_region(text, LENGTHS)
    assert region == expected
    assert region.samtools_arg() == arg


@pytest.mark.parametrize("name", ["chr1", "chr1:weird", "chr1:5", ".", "c}x", "x}:y", "HLA-A*01:01:01:01"])
def test_a_default_region_is_handed_on_as_the_same_region(name: str) -> None:
    # dx scatter hands each reference's label to a subjob as text: it must come back the same.
    lengths = {"chr1": 100, name: 50}
    header = Header(tuple(HeaderReference(ref, length) for ref, length in lengths.items()), sort_order=None)
    for region in default_regions(header):
        assert default_region(region.label) == region
        assert parse_region(region.samtools_arg(), lengths).reference == region.reference


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("chr2", UnknownRegion),
        ("chr1:20-10", UnknownRegion),
        ("chr1:0-10", UnknownRegion),
        ("chr1:2000-3000", UnknownRegion),
        ("chr1:ten", UnknownRegion),
        ("{chr9}", UnknownRegion),
        ("{chr1}x", UnknownRegion),
    ],
)
def test_bad_regions(text: str, error: type[Exception]) -> None:
    with pytest.raises(error, match="region"):
        parse_region(text, LENGTHS)


def test_ambiguous_names_need_braces() -> None:
    lengths = {"chr1": 100, "chr1:1-10": 100}
    with pytest.raises(AmbiguousRegion, match=r"\{chr1:1-10\}"):
        parse_region("chr1:1-10", lengths)
    assert parse_region("{chr1:1-10}", lengths).reference == "chr1:1-10"
    assert parse_region("{chr1}:1-10", lengths) == Region("{chr1}:1-10", "chr1", 1, 10)


def test_bed_errors_name_file_and_line(tmp_path: Path) -> None:
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t0\t10\nchr9\t0\t10\n")
    with pytest.raises(BadRegionsFile, match=r"r\.bed:2: reference 'chr9'"):
        read_bed(bed, LENGTHS)
    bed.write_text("chr1\t10\t5\n")
    with pytest.raises(BadRegionsFile, match=r"r\.bed:1: end 5 is not after start 10"):
        read_bed(bed, LENGTHS)
    bed.write_text("track name=x\n")
    with pytest.raises(BadRegionsFile, match="no regions"):
        read_bed(bed, LENGTHS)


def test_split_shards_tile_the_region() -> None:
    regions = [Region("chr1", "chr1"), Region("chr1:101-900", "chr1", 101, 900), Region("*", None)]
    policy = ShardPolicy(slots=4, min_reads=1)
    shards = plan_shards(regions, [1000.0, 800.0, 10.0], {"chr1": 1000}, policy)
    pieces = sorted(s.args[0] for s in shards if s.regions == (0,) and s.sign == 1)
    corrections = sorted((s.args[0], s.expression) for s in shards if s.regions == (0,) and s.sign == -1)
    assert len(pieces) == 7  # ceil(1000 / (1810 / (4 slots * 3 pieces)))
    assert "{chr1}:1-142" in pieces and "{chr1}:858-" in pieces  # the last piece runs to the end
    assert ("{chr1}:143-143", "pos < 143") in corrections
    assert len(corrections) == 6
    assert all(s.expression is None for s in shards if s.sign == 1)
    ranged = sorted(s.args[0] for s in shards if s.regions == (1,) and s.sign == 1)
    assert "{chr1}:101-233" in ranged and "{chr1}:767-900" in ranged


def test_a_tally_starts_before_a_count_of_as_many_records() -> None:
    """A group tallied per reference costs half again its records (samtools encodes each one for
    the readers), so it starts before a count of a few more records, not after it."""
    lengths = {"big": 10_000, **{f"u{i}": 100 for i in range(4)}}
    regions = [Region("big", "big"), *(Region(f"u{i}", f"u{i}") for i in range(4))]
    policy = ShardPolicy(slots=2, pieces_per_slot=1, min_reads=1, split=False, filtered=True, small_reads=500)
    shards = plan_shards(regions, [1000.0, 200.0, 200.0, 200.0, 200.0], lengths, policy)
    assert [(s.kind, s.weight) for s in shards] == [(plan.TALLY, 800.0), (plan.COUNT, 1000.0)]
    assert shards[0].cost == 800.0 * plan.TALLY_COST


def test_regions_to_tally_are_grouped_apart_from_those_summed() -> None:
    """A CRAM's small contigs that share multi-reference containers need a tally; the
    references beside them, whose records the containers tell, are summed in groups of their
    own rather than swept into the tally."""
    names = ["a", "b", "c", "d", "e"]
    regions = [Region(name, name) for name in names]
    policy = ShardPolicy(slots=1, pieces_per_slot=1, min_reads=1, split=False, small_reads=500, tally=frozenset({2, 3}))
    shards = plan_shards(regions, [100.0] * 5, dict.fromkeys(names, 100), policy)
    assert sorted((s.kind, s.args) for s in shards) == [(plan.SUM, ("a", "b", "e")), (plan.TALLY, ("c", "d"))]


def test_references_that_alternate_between_tally_and_sum_make_few_groups() -> None:
    """GRCh38's alts, decoys and HLA contigs alternate, in header order, between those that
    share containers and those with their own: each kind fills its own groups, never a
    process of every few references."""
    names = [f"u{i}" for i in range(3000)]
    regions = [Region(name, name) for name in names]
    tally = frozenset(i for i in range(3000) if i % 3)  # two in three share containers
    policy = ShardPolicy(slots=2, pieces_per_slot=1, min_reads=1, split=False, small_reads=500, tally=tally)
    shards = plan_shards(regions, [10.0] * 3000, dict.fromkeys(names, 1000), policy)
    kinds = Counter(s.kind for s in shards)
    assert kinds == {plan.SUM: 1, plan.TALLY: 2}  # 30,000 records, 15,000 at most a group
    assert sorted(i for s in shards for i in s.regions) == list(range(3000))
    assert all(set(s.regions) <= tally for s in shards if s.kind == plan.TALLY)


def test_a_group_to_tally_reaches_over_few_other_records() -> None:
    """A group to tally is read as its run of containers, others' records between included:
    it closes before reaching over more than a quarter of a group's records of others."""
    names = ["a", "big", "b", "c"]
    regions = [Region(name, name) for name in names]
    policy = ShardPolicy(
        slots=1, pieces_per_slot=1, min_reads=1, split=False, small_reads=500, tally=frozenset({0, 2, 3})
    )
    shards = plan_shards(regions, [100.0, 400.0, 100.0, 100.0], dict.fromkeys(names, 1000), policy)
    assert sorted((s.kind, s.args) for s in shards) == [
        (plan.COUNT, ("{a}",)),
        (plan.COUNT, ("{big}",)),
        (plan.TALLY, ("b", "c")),
    ]


@pytest.fixture(scope="module")
def dense_bam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reads starting at every position, of several lengths, mapped and placed-unmapped, so
    that whatever the shard boundaries are, reads start exactly at S, at E, span them, and
    sit unmapped on them."""
    references = [Reference("chr1", 3000), Reference("chr:2", 1500)]
    records: list[str] = []
    for ref in references:
        for pos in range(1, ref.length + 1):
            length = 1 + (pos * 7) % 120
            flag = (0, 16, 256, 1024)[pos % 4]
            records.append(
                f"m{ref.name}_{pos}\t{flag}\t{ref.name}\t{pos}\t{pos % 61}\t{length}M\t*\t0\t0\t{'A' * length}\t*"
            )
            records.append(f"s{ref.name}_{pos}\t0\t{ref.name}\t{pos}\t60\t1M\t*\t0\t0\tA\t*")
            if pos % 3 == 0:
                records.append(f"u{ref.name}_{pos}\t4\t{ref.name}\t{pos}\t0\t*\t*\t0\t0\tA\t*")
    records += [f"x{i}\t4\t*\t0\t0\t*\t*\t0\t0\tA\t*" for i in range(7)]
    return write_bam(tmp_path_factory.mktemp("dense") / "dense.bam", references, records)


@pytest.mark.parametrize("min_shard_reads", [1, 97, 1000])
@pytest.mark.parametrize("filters", [(), ("-F", "0x404", "-q", "30")])
def test_shard_boundaries_never_double_count_or_drop(
    dense_bam: Path, min_shard_reads: int, filters: tuple[str, ...]
) -> None:
    flags = Filters(exclude_flags=0x404, min_mapq=30) if filters else Filters()
    regions = ("chr1", "{chr:2}", "chr1:1000-2000", "{chr:2}:7-", "*")
    request = CountRequest(
        bam=dense_bam, regions=regions, filters=flags, min_shard_reads=min_shard_reads, jobs=4, threads=1
    )
    result = count_bam_sync(request)
    if min_shard_reads == 1:
        assert result.shards > len(regions)
    expected = {r: samtools_count(dense_bam, *filters, r) for r in regions}
    assert {r.region: r.count for r in result.regions} == expected


def test_each_boundary_shard_agrees_with_samtools_on_its_own(dense_bam: Path) -> None:
    """The planner's pieces, run one by one through samtools, sum to samtools' region count."""
    regions = [Region("chr1", "chr1"), Region("chr1:1000-2000", "chr1", 1000, 2000)]
    shards = plan_shards(regions, [9000.0, 3000.0], {"chr1": 3000}, ShardPolicy(slots=5, min_reads=1))
    for index, region in enumerate(regions):
        total = 0
        for shard in (s for s in shards if s.regions == (index,)):
            extra = ["-e", shard.expression] if shard.expression else []
            out = subprocess.run(
                [SAMTOOLS, "view", "-c", *extra, str(dense_bam), *shard.args], capture_output=True, check=True
            )
            assert out.stderr == b""
            total += shard.sign * int(out.stdout)
        assert total == samtools_count(dense_bam, region.samtools_arg())
    assert oracle(dense_bam, ["chr1"])["chr1"] == samtools_count(dense_bam, "chr1")


@pytest.mark.parametrize(
    ("jobs", "threads", "cores", "expected"),
    [
        (10, None, 2, (2, 1)),  # a process per core
        (10, None, 16, (10, 3)),  # --jobs caps processes; the 6 spare cores: -@2 for 6 of them
        (16, None, 16, (16, 1)),
        (10, None, 19, (10, 3)),
        (10, None, 1, (1, 1)),
        (1, None, 2, (1, 3)),  # cores --jobs leaves idle get helper threads: -@2
        (1, None, 16, (1, 17)),  # like samtools view -c -@16
        (8, None, 16, (8, 3)),
        (4, None, 18, (4, 6)),  # 5, 5, 4, 4 cores: -@5 twice, -@4 twice
        (10, 1, 16, (10, 1)),  # --threads is taken as given
        (10, 4, 16, (4, 4)),  # ... and processes shrink so that cores are not oversubscribed
        (10, 4, 2, (1, 4)),
    ],
)
def test_processes_and_threads_fill_the_cores(
    jobs: int, threads: int | None, cores: int, expected: tuple[int, int]
) -> None:
    assert choose_parallelism(jobs, threads, cores) == expected


@pytest.mark.parametrize(
    ("jobs", "cores", "shares"),
    [
        (10, 16, (2,) * 6 + (1,) * 4),  # the applet's default on its 16-core instance
        (10, 2, (1, 1)),  # fewer cores than --jobs: a process per core
        (10, 64, (7,) * 4 + (6,) * 6),
        (10, 10, (1,) * 10),
        (10, 11, (2,) + (1,) * 9),
        (1, 2, (2,)),
        (3, 1, (1,)),
    ],
)
def test_every_core_works_while_at_most_jobs_processes_run(jobs: int, cores: int, shares: tuple[int, ...]) -> None:
    assert process_cores(jobs, cores) == shares
    assert sum(shares) == cores  # every core is some process's
    assert len(shares) == min(jobs, cores) and min(shares) >= 1  # at most --jobs, none without a core
    assert max(shares) - min(shares) <= 1  # as even as they go
    threads = process_threads(jobs, None, cores)
    # samtools' threads: alone on one core, a helper per core on more (-@C), never a lone -@1.
    assert threads == tuple(share + 1 if share >= 2 else 1 for share in shares)
    assert 2 not in threads
    assert choose_parallelism(jobs, None, cores) == (len(threads), threads[0])


@pytest.mark.parametrize(
    ("jobs", "threads", "cores", "expected"),
    [(10, 4, 16, (4,) * 4), (10, 3, 16, (3,) * 5), (10, 4, 2, (4,)), (2, 4, 64, (4, 4)), (10, 1, 16, (1,) * 10)],
)
def test_threads_given_are_taken_as_given(jobs: int, threads: int, cores: int, expected: tuple[int, ...]) -> None:
    assert process_threads(jobs, threads, cores) == expected
    assert sum(expected) <= max(cores, threads)  # never more than the cores (one process at least)


def test_the_biggest_shards_take_the_processes_with_the_most_threads() -> None:
    taken: list[tuple[int, int]] = []

    async def main() -> None:
        slots = _Slots(process_threads(10, None, 16)[::-1])  # given in any order
        done = [anyio.Event() for _ in range(12)]

        async def shard(number: int) -> None:
            async with slots.take() as threads:
                taken.append((number, threads))
                await done[number].wait()

        async with anyio.create_task_group() as group:
            for number in range(12):  # in plan order: biggest first
                group.start_soon(shard, number)
                await anyio.wait_all_tasks_blocked()
            assert [threads for _, threads in taken] == [3] * 6 + [1] * 4  # ten run, two wait
            done[9].set()  # a one-thread process ends: the next shard waiting gets its slot
            await anyio.wait_all_tasks_blocked()
            done[0].set()  # a three-thread one ends: the next gets three
            await anyio.wait_all_tasks_blocked()
            assert taken[10:] == [(10, 1), (11, 3)]
            for event in done:
                event.set()

    anyio.run(main)


_BED_LENGTHS = {"chr1": 1_000, "track": 500, "c:2": 300}
_BED_LINES = (
    "chr1\t0\t10",
    "chr1\t5\t1000",
    "chr1\t999\t1000",
    "chr1\t10\t20\tgeneA",
    "chr1\t10\t20\t\tx",
    "c:2\t0\t300\tname\t0\t+",
    "track\t1\t2",
    "track name=x",
    "browser position chr1:1-10",
    "#chrom\tstart\tend",
    "chr1 3 9",
    "chr1\t3\t9\r",
    "",
    "chr1\t10\t10",
    "chr1\t1000\t1001",
    "chrX\t1\t2",
    "chr1\t1\tx",
    "chr1\t+1\t5",
    "chr1\t\u0661\t5",
    "chr1\t07\t012",
)


@given(st.lists(st.sampled_from(_BED_LINES), min_size=1, max_size=12), st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bed_fast_path_reads_as_line_by_line(tmp_path: Path, lines: list[str], newline: bool) -> None:
    """Whatever the file, the whole-file fast path gives what the line-by-line reader gives
    (the same regions, or the same error)."""
    path = tmp_path / "x.bed"
    path.write_text("\n".join(lines) + ("\n" if newline else ""))

    def read(fast: bool) -> Sequence[Region] | str:
        saved = plan._fast_bed
        if not fast:
            plan._fast_bed = lambda text, lengths: None
        try:
            return read_bed(path, _BED_LENGTHS)
        except BadRegionsFile as error:
            return str(error)
        finally:
            plan._fast_bed = saved

    assert read(True) == read(False)


def test_a_bed_read_whole_is_held_as_columns(tmp_path: Path) -> None:
    """A plain BED comes back as a RegionTable: each Region made when asked for, equal to the
    line-by-line reader's list, and its labels made at once the same way."""
    bed = tmp_path / "t.bed"
    bed.write_text("chr1\t0\t10\tfirst\nchr1\t99\t100\tsecond\nchrX\t5\t9\tthird\n")
    regions = read_bed(bed, {**_BED_LENGTHS, "chrX": 100})
    assert isinstance(regions, plan.RegionTable)
    expected = [
        Region("chr1:1-10", "chr1", 1, 10, "first"),
        Region("chr1:100-100", "chr1", 100, 100, "second"),
        Region("chrX:6-9", "chrX", 6, 9, "third"),
    ]
    assert regions == expected and expected == regions and list(regions) == expected
    assert regions[-1] == expected[-1] and regions[1:] == expected[1:]
    assert regions.labels() == [region.label for region in expected]
    assert plan.whole_regions(regions) == []
    assert regions != expected[:2] and regions != "chr1"


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_sweeps_share_the_reads_evenly_one_per_process(slots: int) -> None:
    """Many ranges make one sweep per process, of equal expected reads (stretches cut between
    ranges where a share ends), and no small one over: each sweep's reader pays a start."""
    lengths = {"chr1": 1_000_000, "chr2": 600_000, "chr3": 50_000}
    regions = [
        Region(f"{name}:{start + 1}-{start + 100}", name, start + 1, start + 100)
        for name, length in lengths.items()
        for start in range(0, length - 100, 250)  # gaps read through: a stretch per reference
    ]
    densities = dict.fromkeys(lengths, 1.0)
    policy = ShardPolicy(slots=slots, min_reads=1)
    shards = plan_shards(regions, [0.0] * len(regions), lengths, policy, densities=densities)
    assert [shard.kind for shard in shards] == [plan.SWEEP] * slots
    weights = [shard.weight for shard in shards]
    assert max(weights) - min(weights) <= 500  # at most about a range and its gap apart
    assert sorted(i for shard in shards for i in shard.regions) == list(range(len(regions)))
    few = plan_shards(regions, [0.0] * len(regions), lengths, ShardPolicy(slots=slots, min_reads=10**9))
    assert len(few) == 1  # below min_reads a share: one sweep


def test_sweeps_of_regions_in_order_skip_the_sorts_for_the_same_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows by reference, then start (a sorted BED, duplicates and equal starts too) are
    planned as the sorts would order them; rows out of order are sorted."""
    lengths = {"chr1": 100_000, "chr2": 50_000}
    spans = [("chr1", 10, 90), ("chr1", 10, 20), ("chr1", 500, 900), ("chr1", 500, 900), ("chr2", 0, 5), ("chr2", 7, 9)]
    spans += [("chr2", 100 * k, 100 * k + 50) for k in range(1, 40)]
    policy = ShardPolicy(slots=2, min_reads=1)
    densities = dict.fromkeys(lengths, 0.5)

    def planned(rows: list[tuple[str, int, int]]) -> list[plan.Shard]:
        table = plan.RegionTable([r for r, _, _ in rows], [s for _, s, _ in rows], [e for _, _, e in rows], None)
        return plan_shards(table, [0.0] * len(rows), lengths, policy, densities=densities)

    in_order = plan._in_order
    assert in_order([0, 0, 1, 1], [5, 5, 1, 3]) and not in_order([0, 0, 1], [5, 4, 9])
    assert not in_order([0, 1, 0], [1, 2, 3])
    fast = planned(spans)
    monkeypatch.setattr(plan, "_in_order", lambda ranks, starts: False)
    assert fast == planned(spans)
    shuffled = [*spans[3:], *spans[:3]]
    monkeypatch.setattr(plan, "_in_order", in_order)
    assert [len(shard.regions) for shard in planned(shuffled)] == [len(shard.regions) for shard in fast]
