"""Every count equals samtools' own `samtools view -c` with the same inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamcountd import CountRequest, Filters, count_bam_sync
from bamcountd.count import available_cores
from bamcountd.synth import Reference, tricky_bam, write_bam
from tests.support.bams import header_names, oracle, samtools_count

FILTER_CASES = {
    "none": ((), Filters()),
    "F904_q20": (("-F", "0x904", "-q", "20"), Filters(exclude_flags=0x904, min_mapq=20)),
    "f2": (("-f", "2"), Filters(require_flags=2)),
    "G900": (("-G", "0x900"), Filters(exclude_all_flags=0x900)),
}


@pytest.mark.parametrize("case", FILTER_CASES)
@pytest.mark.parametrize("jobs", [1, 2, 10, 64])
def test_every_region_and_total_match_samtools(shared_bam: Path, case: str, jobs: int) -> None:
    args, filters = FILTER_CASES[case]
    result = count_bam_sync(CountRequest(bam=shared_bam, filters=filters, jobs=jobs))
    names = [*header_names(shared_bam), "*"]
    assert [r.region for r in result.regions] == names
    assert {r.region: r.count for r in result.regions} == oracle(shared_bam, names, args)
    assert result.total == samtools_count(shared_bam, *args)
    assert result.total > 0


def test_one_job_gets_a_helper_thread_per_idle_core(shared_bam: Path) -> None:
    cores = available_cores()
    result = count_bam_sync(CountRequest(bam=shared_bam, filters=Filters(exclude_flags=0x904, min_mapq=20), jobs=1))
    assert result.threads == (cores + 1 if cores >= 2 else 1)  # samtools -@ cores
    names = [*header_names(shared_bam), "*"]
    assert {r.region: r.count for r in result.regions} == oracle(shared_bam, names, ("-F", "0x904", "-q", "20"))
    assert result.total == samtools_count(shared_bam, "-F", "0x904", "-q", "20")


@pytest.mark.parametrize("case", ["none", "F904_q20"])
def test_small_shards_sum_back_exactly(shared_bam: Path, case: str) -> None:
    """Force many start-position shards and tally groups on a small BAM: same numbers."""
    args, filters = FILTER_CASES[case]
    result = count_bam_sync(CountRequest(bam=shared_bam, filters=filters, jobs=3, min_shard_reads=50))
    assert result.shards > len(result.regions)
    names = [*header_names(shared_bam), "*"]
    assert {r.region: r.count for r in result.regions} == oracle(shared_bam, names, args)
    assert result.total == samtools_count(shared_bam, *args)


def test_no_split_is_one_process_per_region(shared_bam: Path) -> None:
    result = count_bam_sync(CountRequest(bam=shared_bam, split=False))
    assert result.shards == len(result.regions)
    assert result.total == samtools_count(shared_bam)


def test_user_regions_ranges_and_odd_names(shared_bam: Path) -> None:
    regions = ("chr1:1000-150000", "{chr1:weird}", "{HLA-A*01:01:01:01}:100-2000", "chr2", "chr1:5000-", "*")
    result = count_bam_sync(CountRequest(bam=shared_bam, regions=regions, min_shard_reads=50))
    expected = {
        "chr1:1000-150000": samtools_count(shared_bam, "chr1:1000-150000"),
        "{chr1:weird}": samtools_count(shared_bam, "{chr1:weird}"),
        "{HLA-A*01:01:01:01}:100-2000": samtools_count(shared_bam, "{HLA-A*01:01:01:01}:100-2000"),
        "chr2": samtools_count(shared_bam, "chr2"),
        "chr1:5000-": samtools_count(shared_bam, "chr1:5000-"),
        "*": samtools_count(shared_bam, "*"),
    }
    assert {r.region: r.count for r in result.regions} == expected
    assert all(expected.values())


def test_overlapping_regions_each_count_like_samtools(shared_bam: Path) -> None:
    """Each region counts the reads that overlap it; a read in two regions is in both."""
    regions = ("chr1:1-100000", "chr1:50000-200000")
    result = count_bam_sync(CountRequest(bam=shared_bam, regions=regions))
    counts = [r.count for r in result.regions]
    assert counts == [samtools_count(shared_bam, region) for region in regions]
    assert result.total == sum(counts)


def test_bed_regions_are_zero_based_half_open(shared_bam: Path, tmp_path: Path) -> None:
    bed = tmp_path / "regions.bed"
    bed.write_text("# comment\nchr1\t999\t150000\tfirst\nchr1:weird\t0\t8000\nchr2\t0\t1\n")
    result = count_bam_sync(CountRequest(bam=shared_bam, regions_file=bed))
    expected = [
        ("chr1:1000-150000", samtools_count(shared_bam, "chr1:1000-150000")),
        ("chr1:weird:1-8000", samtools_count(shared_bam, "{chr1:weird}:1-8000")),
        ("chr2:1-1", samtools_count(shared_bam, "chr2:1-1")),
    ]
    assert [(r.region, r.count) for r in result.regions] == expected


@pytest.mark.parametrize("case", ["none", "F904_q20", "f2"])
def test_many_tiny_contigs_are_grouped_and_exact(tmp_path: Path, case: str) -> None:
    references = [Reference(f"contig_{i}:{i}", 1_000 + i) for i in range(400)]
    references.append(Reference("big", 2_000_000))
    records = []
    for i, ref in enumerate(references[:-1]):
        for k in range(i % 5):
            records.append(
                f"r{i}_{k}\t{16 * (k % 2)}\t{ref.name}\t{1 + k * 100}\t{k * 15}\t50M\t*\t0\t0\t{'A' * 50}\t*"
            )
    records += [
        f"b{k}\t{(0, 99, 147, 2048)[k % 4]}\tbig\t{1 + k * 997}\t{k % 61}\t50M\t*\t0\t0\t{'C' * 50}\t*"
        for k in range(2_000)
    ]
    records += [f"u{k}\t4\t*\t0\t0\t*\t*\t0\t0\tA\t*" for k in range(9)]
    bam = write_bam(tmp_path / "many.bam", references, records)
    args, filters = FILTER_CASES[case]
    result = count_bam_sync(CountRequest(bam=bam, filters=filters, min_shard_reads=500))
    assert result.shards < 50  # 401 references, not 401 processes
    names = [*header_names(bam), "*"]
    assert {r.region: r.count for r in result.regions} == oracle(bam, names, args)
    assert result.total == samtools_count(bam, *args)


def test_unplaced_reads_are_counted_which_the_seed_forgot(tmp_path: Path) -> None:
    bam = tricky_bam(tmp_path, reads=500, unplaced=321)
    result = count_bam_sync(CountRequest(bam=bam))
    by_region = {r.region: r.count for r in result.regions}
    assert by_region["*"] == samtools_count(bam, "*") == 321
    assert result.total == samtools_count(bam)


@st.composite
def _bam_spec(draw: st.DrawFn) -> tuple[list[Reference], list[str]]:
    n_refs = draw(st.integers(1, 4))
    references = [
        Reference(draw(st.sampled_from(["c", "chr", "x:y", "HLA*1"])) + f"_{i}", draw(st.integers(200, 5_000)))
        for i in range(n_refs)
    ]
    records = []
    for i in range(draw(st.integers(0, 60))):
        ref = draw(st.sampled_from(references))
        pos = draw(st.integers(1, ref.length))
        flag = draw(st.sampled_from([0, 4, 16, 99, 147, 256, 1024, 2048, 512]))
        length = draw(st.integers(1, 80))
        cigar = "*" if flag & 4 else f"{length}M"
        seq = "*" if flag & 4 else "A" * length
        records.append(f"h{i}\t{flag}\t{ref.name}\t{pos}\t{draw(st.integers(0, 60))}\t{cigar}\t*\t0\t0\t{seq}\t*")
    records += [f"u{i}\t4\t*\t0\t0\t*\t*\t0\t0\tA\t*" for i in range(draw(st.integers(0, 3)))]
    return references, records


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_bam_spec(), shard_reads=st.sampled_from([1, 5, 200_000]), case=st.sampled_from(sorted(FILTER_CASES)))
def test_random_bams_match_samtools(
    tmp_path: Path, spec: tuple[list[Reference], list[str]], shard_reads: int, case: str
) -> None:
    references, records = spec
    args, filters = FILTER_CASES[case]
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        folder = Path(scratch)
        bam = write_bam(folder / "random.bam", references, records)
        request = CountRequest(bam=bam, filters=filters, min_shard_reads=shard_reads, jobs=4, index_cache=folder)
        result = count_bam_sync(request)
        names = [*header_names(bam), "*"]
        assert {r.region: r.count for r in result.regions} == oracle(bam, names, args)
        assert result.total == samtools_count(bam, *args)


def test_reference_too_long_for_a_bai_gets_a_csi(tmp_path: Path) -> None:
    references = [Reference("chr1", 600_000_000), Reference("chr2", 1_000)]
    positions = [1, 536_870_000, 536_870_912, 550_000_000, 599_999_900]
    records = [f"r{i}\t0\tchr1\t{pos}\t60\t50M\t*\t0\t0\t{'A' * 50}\t*" for i, pos in enumerate(positions)]
    records.append("s\t0\tchr2\t10\t60\t5M\t*\t0\t0\tAAAAA\t*")
    bam = write_bam(tmp_path / "long.bam", references, records, index=False)  # a BAI cannot hold it
    cache = tmp_path / "cache"
    result = count_bam_sync(CountRequest(bam=bam, regions=("chr1", "chr1:536870000-", "chr2"), index_cache=cache))
    (csi,) = cache.glob("*.csi")
    assert [p.suffix for p in cache.iterdir() if p != csi] == []  # regions only: no proof of reach
    assert csi.suffix == ".csi"
    expected = [samtools_count(bam, region, index=csi) for region in ("chr1", "chr1:536870000-", "chr2")]
    assert [r.count for r in result.regions] == expected == [5, 4, 1]
