"""Many ranges counted by sweeps: every count equals `samtools view -c [filters] BAM REGION`."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from bamcountd import CountRequest, Filters, count_bam_sync
from bamcountd.cli import main
from bamcountd.count import available_cores, process_threads
from bamcountd.errors import BadRegionsFile
from bamcountd.synth import Reference, write_bam
from tests.support.bams import samtools_count

FILTERS = {
    "none": ((), Filters()),
    "F904_q20": (("-F", "0x904", "-q", "20"), Filters(exclude_flags=0x904, min_mapq=20)),
    "f2": (("-f", "2"), Filters(require_flags=2)),
    "G900": (("-G", "0x900"), Filters(exclude_all_flags=0x900)),
}
REFERENCES = (Reference("chrA", 400_000), Reference("chrB", 6_000), Reference("HLA-A*01:01", 3_000))
#: Spans from the reference-consuming operations, clips that consume none, a large N, and
#: CIGARs that consume no reference at all (a read then covers one base).
CIGARS = ("60M", "10S50M", "5H40M5H", "20M150000N30M", "20M2000N20M", "15M10D30M", "20M5I20M", "30=2X20=", "12S")
FLAGS = (0, 16, 99, 147, 256, 2048, 1024, 512, 4)


def _records(rng: random.Random, count: int) -> list[str]:
    lines = []
    for serial in range(count):
        ref = rng.choice(REFERENCES)
        cigar = rng.choice(CIGARS)
        flag = rng.choice(FLAGS)
        if "N" in cigar and ref.length < 200_000:
            cigar = "25M"
        position = rng.choice([1, 2, ref.length, ref.length - 30, *(rng.randrange(1, ref.length) for _ in range(6))])
        query = sum(int(n) for n, op in _ops(cigar) if op in "MIS=X")
        seq = "".join(rng.choice("ACGT") for _ in range(query))
        if flag & 4:
            lines.append(f"r{serial}\t{flag}\t{ref.name}\t{position}\t0\t*\t=\t{position}\t0\t{seq}\t*")
        else:
            lines.append(
                f"r{serial}\t{flag}\t{ref.name}\t{position}\t{rng.randrange(0, 61)}\t{cigar}\t*\t0\t0\t{seq}\t*"
            )
    return lines


def _ops(cigar: str) -> list[tuple[str, str]]:
    import re

    return re.findall(r"([0-9]+)([MIDNSHP=X])", cigar)


@pytest.fixture(scope="module")
def edge_bam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    rng = random.Random(14)
    return write_bam(folder / "edges.bam", REFERENCES, _records(rng, 4_000))


def _intervals(rng: random.Random) -> list[tuple[str, int, int]]:
    """Overlapping, nested, adjacent, one-base, duplicate and reference-end intervals."""
    rows: list[tuple[str, int, int]] = []
    for ref in REFERENCES:
        n = ref.length
        rows += [(ref.name, 0, 1), (ref.name, n - 1, n), (ref.name, n - 200, n), (ref.name, 0, n)]
        rows += [(ref.name, 100, 900), (ref.name, 300, 400), (ref.name, 900, 1_000), (ref.name, 900, 1_000)]
        rows += [(ref.name, 999, 1_000), (ref.name, 1_000, 1_001), (ref.name, n - 10, n + 500)]
        for _ in range(12):
            start = rng.randrange(0, n - 1)
            rows.append((ref.name, start, min(n, start + rng.randrange(1, 400))))
    rows += [("chrA", 20_000, 200_000), ("chrA", 20_070, 20_071), ("chrA", 170_000, 170_010)]  # inside a large N
    return rows


def _bed(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    path.write_text("".join(f"{name}\t{start}\t{end}\n" for name, start, end in rows))
    return path


def _expected(bam: Path, rows: list[tuple[str, int, int]], args: tuple[str, ...]) -> list[int]:
    return [samtools_count(bam, *args, f"{{{name}}}:{start + 1}-{end}") for name, start, end in rows]


@pytest.mark.parametrize("case", FILTERS)
@pytest.mark.parametrize("min_shard_reads", [1, 200_000])
def test_every_interval_equals_samtools(edge_bam: Path, tmp_path: Path, case: str, min_shard_reads: int) -> None:
    """Tiny shards (min 1 read) cut the stretches between ranges, so reads reach across shards."""
    args, filters = FILTERS[case]
    rows = _intervals(random.Random(case))
    bed = _bed(tmp_path / "targets.bed", rows)
    request = CountRequest(bam=edge_bam, regions_file=bed, filters=filters, min_shard_reads=min_shard_reads, jobs=3)
    result = count_bam_sync(request)
    assert result.shards < len(rows)  # swept, not one command per range
    counts = [r.count for r in result.regions]
    assert counts == _expected(edge_bam, rows, args)
    assert [r.region for r in result.regions] == [f"{name}:{s + 1}-{e}" for name, s, e in rows]
    assert sum(counts) > 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hst.lists(
        hst.tuples(hst.sampled_from([0, 1]), hst.integers(0, 5_990), hst.integers(1, 3_000)), min_size=16, max_size=40
    ),
    hst.sampled_from(list(FILTERS)),
)
def test_generated_interval_sets(edge_bam: Path, spans: list[tuple[int, int, int]], case: str) -> None:
    args, filters = FILTERS[case]
    rows = []
    for which, offset, width in spans:
        ref = REFERENCES[which]
        start = min(offset, ref.length - 1)
        rows.append((ref.name, start, start + width))
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        bed = _bed(Path(folder) / "t.bed", rows)
        result = count_bam_sync(CountRequest(bam=edge_bam, regions_file=bed, filters=filters, min_shard_reads=5))
    assert [r.count for r in result.regions] == _expected(edge_bam, rows, args)


def test_few_ranges_keep_one_command_each(edge_bam: Path) -> None:
    regions = ("chrA:101-900", "chrB:1-6000", "{HLA-A*01:01}:10-20")
    result = count_bam_sync(CountRequest(bam=edge_bam, regions=regions))
    assert result.shards == len(regions)
    assert [r.count for r in result.regions] == [samtools_count(edge_bam, region) for region in regions]


def test_bed_names_headers_and_matrix(edge_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 4th column names the row; track/browser/# lines are skipped; two BAMs make a matrix
    whose columns equal their single counts."""
    other = write_bam(tmp_path / "other.bam", REFERENCES, _records(random.Random(3), 1_500))
    bed = tmp_path / "named.bed"
    lines = ["track name=t", "browser position chrA", "# comment", ""]
    lines += [f"chrA\t{k * 500}\t{k * 500 + 700}\tt{k}\t0\t+" for k in range(20)]
    bed.write_text("\n".join(lines) + "\n")
    assert main(["count", str(edge_bam), str(other), "--regions-file", str(bed), "--format", "tsv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "region\tedges.bam\tother.bam"
    rows = [line.split("\t") for line in out[1:-1]]
    assert [row[0] for row in rows] == [f"t{k}" for k in range(20)]
    for column, bam in ((1, edge_bam), (2, other)):
        expected = [samtools_count(bam, f"chrA:{k * 500 + 1}-{k * 500 + 700}") for k in range(20)]
        assert [int(row[column]) for row in rows] == expected
        assert int(out[-1].split("\t")[column]) == sum(expected)


def test_a_failing_bam_writes_no_matrix(edge_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.tsv"
    broken = tmp_path / "broken.bam"
    broken.write_bytes(b"not a bam")
    listing = tmp_path / "bams.txt"
    listing.write_text(f"{edge_bam}\n# skipped\n\n{broken}\n{tmp_path / 'missing.bam'}\n")
    assert main(["count", "--bams-from", str(listing), "-o", str(out)]) == 1  # the corrupt one is a data error
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "broken.bam" in err[0] and "not a BAM" in err[0]
    assert "missing.bam" in err[1] and "no such file" in err[1]
    assert not out.exists()


def test_sample_names_from_read_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The one @RG SM names a column, else the file name; a clash gets _2."""
    from bamcountd.samtools import index_sync, write_bam_sync

    bams = []
    for k, samples in enumerate([["NA1"], ["NA1", "NA1"], [], ["X", "Y"]]):
        header = ["@HD\tVN:1.6\tSO:coordinate", *(f"@SQ\tSN:{r.name}\tLN:{r.length}" for r in REFERENCES)]
        header += [f"@RG\tID:g{n}\tSM:{sample}" for n, sample in enumerate(samples)]
        path = tmp_path / f"b{k}.bam"
        write_bam_sync("samtools", [*header, *_records(random.Random(k), 200)], path)
        index_sync("samtools", path)
        bams.append(path)
    assert main(["count", *map(str, bams), "--format", "tsv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "region\tNA1\tNA1_2\tb2.bam\tb3.bam"
    assert out[-1] == "total\t" + "\t".join(str(samtools_count(bam)) for bam in bams)


def _our_readers() -> list[int]:
    """This process's children that are sweep readers (``python -m bamcountd.overlaps``), live."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(stat[1]) == os.getpid() and stat[0] != "Z" and b"bamcountd.overlaps" in cmdline:
            found.append(int(entry.name))
    return found


def _reader_kinds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How each sweep's reader came: 'ahead' (started as the count began) or 'own' (with its sweep)."""
    from bamcountd import samtools

    kinds: list[str] = []
    real = samtools.run_tally

    async def recording(*args: Any, **kwargs: Any) -> samtools.Tally:
        kinds.append("ahead" if isinstance(kwargs.get("readers"), samtools.Reader) else "own")
        return await real(*args, **kwargs)

    monkeypatch.setattr(samtools, "run_tally", recording)
    return kinds


@pytest.mark.parametrize("jobs", [1, 3])
def test_sweeps_take_the_readers_started_ahead(
    edge_bam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    """A BED big enough to be swept starts a reader per process as the count starts; each sweep
    takes one (its intervals written before its samtools starts), and none outlives the count."""
    kinds = _reader_kinds(monkeypatch)
    rows = _intervals(random.Random(jobs))
    bed = _bed(tmp_path / "t.bed", rows)
    result = count_bam_sync(CountRequest(bam=edge_bam, regions_file=bed, jobs=jobs, min_shard_reads=1))
    assert [r.count for r in result.regions] == _expected(edge_bam, rows, ())
    processes = len(process_threads(jobs, None, available_cores()))
    assert kinds == ["ahead"] * processes  # one sweep per process, each with a reader started ahead
    assert _our_readers() == []


def test_readers_ahead_without_sweeps_are_dropped(
    edge_bam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BED big enough for a sweep that holds too few rows for one (long lines) counts one
    command per row; the readers started ahead are killed, and a bad BED fails as before."""
    kinds = _reader_kinds(monkeypatch)
    bed = tmp_path / "few.bed"
    bed.write_text("".join(f"chrA\t{k * 100}\t{k * 100 + 50}\t{'n' * 80}{k}\n" for k in range(4)))
    result = count_bam_sync(CountRequest(bam=edge_bam, regions_file=bed))
    assert [r.count for r in result.regions] == [
        samtools_count(edge_bam, f"chrA:{k * 100 + 1}-{k * 100 + 50}") for k in range(4)
    ]
    assert kinds == [] and _our_readers() == []
    bed.write_text(bed.read_text() + "chrZ\t1\t2\n")
    with pytest.raises(BadRegionsFile, match="chrZ"):
        count_bam_sync(CountRequest(bam=edge_bam, regions_file=bed))
    assert _our_readers() == []


@pytest.mark.parametrize("named", ["none", "all", "some"])
def test_a_bed_result_is_its_columns_and_its_tsv_is_the_rows(edge_bam: Path, tmp_path: Path, named: str) -> None:
    """A plain BED's result rows (RegionCounts) are made only when asked for, equal the rows
    of any other result, and the TSV written from its columns is the one its rows give."""
    from bamcountd.count import RegionCount, RegionCounts
    from bamcountd.report import format_tsv

    rows = _intervals(random.Random(named))
    names = {"none": [""] * len(rows), "all": [f"n{k}" for k in range(len(rows))]}.get(
        named, [f"n{k}" if k % 3 else "" for k in range(len(rows))]
    )
    bed = tmp_path / "t.bed"
    bed.write_text(
        "".join(
            f"{n}\t{s}\t{e}" + (f"\t{name}" if named != "none" else "") + "\n"
            for (n, s, e), name in zip(rows, names, strict=True)
        )
    )
    result = count_bam_sync(CountRequest(bam=edge_bam, regions_file=bed))
    assert isinstance(result.regions, RegionCounts)
    counts = _expected(edge_bam, rows, ())
    expected = [
        RegionCount(f"{n}:{s + 1}-{e}", count, name or None)
        for (n, s, e), count, name in zip(rows, counts, names, strict=True)
    ]
    assert result.regions == expected and expected == list(result.regions) and result.regions[-1] == expected[-1]
    assert result.regions[1:3] == tuple(expected[1:3]) and len(result.regions) == len(expected)
    lines = [f"{row.row}\t{row.count}" for row in expected]
    assert format_tsv(result) == "\n".join([*lines, f"total\t{sum(counts)}"]) + "\n"
