"""CRAM indexes that htslib before 1.18 misreads with its multi-region iterator (``view -M``):
slices nested in others (long reads) and small contigs sharing containers.  There, ``-M``
stops short of records or reads some twice, with exit status 0; bamcountd reads such
references by a query each (a CRAM 3's group of them: its run of containers, piped to samtools
as a stream), and every count still equals ``samtools view -c`` of one region."""

from __future__ import annotations

import gzip
import random
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bamcountd import CountRequest, CountResult, Filters, count_bam_sync, logs
from bamcountd import samtools as st
from bamcountd.cramfile import multi_region_unsafe
from bamcountd.urls import Url
from devtools.object_server import serve
from tests.support.bams import SAMTOOLS, header_names, oracle, samtools_count


def _cram(
    folder: Path,
    name: str,
    references: dict[str, int],
    reads: list[tuple[str, int, int]],
    *,
    flags: tuple[int, ...] = (0, 16, 1024, 256, 512, 2048),
    **options: str,
) -> Path:
    """A CRAM (and its CRAI) of ``reads``: (reference, 1-based position, length); without a
    reference unless ``options`` name one (``reference=FASTA``), the rest output format options."""
    sam = folder / f"{name}.sam"
    rng = random.Random(name)
    with open(sam, "w") as out:
        out.write("@HD\tVN:1.6\tSO:coordinate\n" + "".join(f"@SQ\tSN:{n}\tLN:{n_}\n" for n, n_ in references.items()))
        order = {n: i for i, n in enumerate(references)}
        for number, (ref, pos, length) in enumerate(sorted(reads, key=lambda r: (order[r[0]], r[1]))):
            flag = rng.choice(flags)
            mapq, cigar = (0, "*") if flag & 4 else (rng.choice([0, 10, 30, 60]), f"{length}M")
            out.write(f"r{number}\t{flag}\t{ref}\t{pos}\t{mapq}\t{cigar}\t*\t0\t0\t*\t*\n")
    cram = folder / f"{name}.cram"
    reference = options.pop("reference", None)
    how = ["--reference", reference] if reference is not None else ["--output-fmt-option", "no_ref"]
    fmt = [arg for key, value in options.items() for arg in ("--output-fmt-option", f"{key}={value}")]
    subprocess.run([SAMTOOLS, "view", "--no-PG", "-C", *how, *fmt, "-o", str(cram), str(sam)], check=True)
    subprocess.run([SAMTOOLS, "index", str(cram)], check=True)
    return cram


@pytest.fixture(scope="module")
def long_reads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Short reads and a few long ones that outreach the small slices after them: CRAI entries
    inside others."""
    rng = random.Random(3)
    lengths = {"chr1": 400_000, "chr2": 300_000}
    reads = []
    for ref, length in lengths.items():
        for _ in range(3000):
            long = rng.random() < 0.02
            span = rng.randrange(5_000, 25_000) if long else 100
            reads.append((ref, rng.randrange(1, length - 30_000), span))
    return _cram(tmp_path_factory.mktemp("nested"), "long", lengths, reads, seqs_per_slice="50")


@pytest.fixture(scope="module", params=["3.0", "2.1"])
def small_contigs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chromosome and 60 small contigs that share multi-reference containers, as CRAM 3
    (whose container headers let a tally read just their containers, as a stream) and as CRAM
    2.1 (whose CRAI does, with its EOF container)."""
    rng = random.Random(4)
    lengths = {"chr1": 200_000, **{f"chrUn_{i}": 2_000 + 37 * i for i in range(60)}}
    reads = [(ref, rng.randrange(1, length - 100), 100) for ref, length in lengths.items() for _ in range(120)]
    reads += [("chr1", rng.randrange(1, 199_000), 100) for _ in range(3000)]
    folder = tmp_path_factory.mktemp("shared")
    return _cram(folder, f"small-{request.param}", lengths, reads, version=request.param)


@pytest.fixture(params=["this samtools", "forced"])
def forced(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """As the samtools under test decides, or with every affected reference read by a query of
    its own whatever the version (a samtools 1.18+ would otherwise never take that path)."""
    if request.param == "forced":
        monkeypatch.setattr(st, "MULTI_REGION_CRAM_VERSION", (999,))
    return bool(request.param == "forced")


def _read_one_by_one(result: CountResult, forced: bool) -> bool:
    """Whether the count says it read references by a query each, and whether it had to."""
    version = tuple(int(part) for part in result.samtools_version.split("."))
    said = any("were read without it" in note for note in result.notes)
    return said == (forced or version < st.MULTI_REGION_CRAM_VERSION)


@pytest.fixture(autouse=True)
def _no_reference_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REF_PATH", str(tmp_path / "no-such-folder" / "%s"))


def test_the_index_layouts_are_found(tmp_path: Path) -> None:
    """Nested entries and references at one container are unsafe; a clean index has none."""
    crai = tmp_path / "x.crai"

    def found(rows: list[tuple[int, int, int, int]]) -> tuple[set[int], set[int]]:
        crai.write_bytes(gzip.compress("".join(f"{r}\t{s}\t{n}\t{o}\t100\t50\n" for r, s, n, o in rows).encode()))
        unsafe = multi_region_unsafe(crai)
        return set(unsafe.nested), set(unsafe.shared)

    assert found([(0, 1, 500, 100), (0, 400, 600, 900), (1, 1, 300, 1500), (-1, 0, 0, 2000), (-1, 0, 0, 2500)]) == (
        set(),
        set(),
    )
    assert found([(0, 1, 5000, 100), (0, 400, 600, 900), (1, 1, 300, 1500)]) == ({0}, set())  # 400-999 in 1-5000
    assert found([(0, 1, 500, 100), (1, 1, 300, 900), (2, 5, 30, 900), (3, 1, 9, 1500)]) == (set(), {1, 2})


def test_nested_slices_leave_no_range_short(long_reads: Path, forced: bool) -> None:
    """A BED's ranges (swept) and regions on references whose slices nest: each count is
    samtools' own count of that one range (``-M`` on this CRAM stops short of records)."""
    assert multi_region_unsafe(long_reads.with_name(long_reads.name + ".crai")).nested == {0, 1}
    rng = random.Random(8)
    intervals = sorted(
        (ref, start, start + rng.randrange(200, 8_000))
        for ref, length in (("chr1", 400_000), ("chr2", 300_000))
        for start in rng.sample(range(length * 9 // 10), 25)
    )
    bed = long_reads.with_name("ranges.bed")
    bed.write_text("".join(f"{ref}\t{start}\t{end}\n" for ref, start, end in intervals))
    for filters, args in ((Filters(), ()), (Filters(exclude_flags=0x904, min_mapq=20), ("-F", "0x904", "-q", "20"))):
        result = count_bam_sync(CountRequest(bam=long_reads, regions_file=bed, filters=filters))
        wanted = [samtools_count(long_reads, *args, f"{ref}:{start + 1}-{end}") for ref, start, end in intervals]
        assert [r.count for r in result.regions] == wanted
        assert sum(wanted) > 0
        assert result.shards < len(intervals)  # swept, not counted one command each
        assert _read_one_by_one(result, forced)
    regions = ("{chr1}:1000-90000", "{chr1}:150000-250000", "{chr2}:1-300000")
    few = count_bam_sync(CountRequest(bam=long_reads, regions=regions))
    assert [r.count for r in few.regions] == list(oracle(long_reads, regions).values())


@pytest.mark.parametrize("filters", [(), ("-F", "0x904", "-q", "20"), ("-G", "0x900")])
def test_small_contigs_sharing_containers_count_exactly(
    small_contigs: Path, forced: bool, filters: tuple[str, ...]
) -> None:
    """Every reference of a CRAM whose small contigs share containers, tallied per reference:
    ``-M`` over them here reads records twice and out of order."""
    unsafe = multi_region_unsafe(small_contigs.with_name(small_contigs.name + ".crai"))
    assert len(unsafe.shared) > 30
    parsed = {
        (): Filters(),
        ("-F", "0x904", "-q", "20"): Filters(exclude_flags=0x904, min_mapq=20),
        ("-G", "0x900"): Filters(exclude_all_flags=0x900),
    }[filters]
    logs.configure(level="debug", json=True)
    with capture_logs() as events:
        result = count_bam_sync(CountRequest(bam=small_contigs, filters=parsed, verify="full"))
    logs.configure(level="warning", json=False)
    names = [*header_names(small_contigs), "*"]
    assert {r.region: r.count for r in result.regions} == oracle(small_contigs, names, filters)
    assert result.total == samtools_count(small_contigs, *filters)
    assert _read_one_by_one(result, forced)
    # Without -M, a local CRAM 3's or 2.1's small contigs are tallied from their run of
    # containers, as a stream.
    avoided = any("were read without it" in note for note in result.notes)
    piped = [e for e in events if e["event"] == "tally_piped"]
    assert bool(piped) == avoided


@pytest.fixture(scope="module")
def alts_and_decoys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GRCh38-shaped header: two chromosomes, then 400 alts and decoys whose reads range
    from none to hundreds, so that in header order they alternate between sharing
    containers and having their own."""
    rng = random.Random(5)
    lengths = {"chr1": 300_000, "chr2": 200_000}
    lengths.update({f"chr1_KI{i:06d}v1_alt": rng.randrange(2_000, 40_000) for i in range(150)})
    lengths.update({f"chrUn_JTFH{i:08d}v1_decoy": rng.randrange(1_500, 9_000) for i in range(250)})
    reads = [(ref, rng.randrange(1, lengths[ref] - 150), 100) for ref in ("chr1", "chr2") for _ in range(1500)]
    for ref, length in list(lengths.items())[2:]:
        reads += [(ref, rng.randrange(1, length - 150), 100) for _ in range(rng.choice([0, 1, 3, 20, 60, 400]))]
    return _cram(tmp_path_factory.mktemp("alts"), "alts", lengths, reads, seqs_per_slice="300")


@pytest.mark.parametrize("filters", [(), ("-F", "0x904", "-q", "20")])
def test_alternating_alts_and_decoys_count_exactly_in_few_processes(
    alts_and_decoys: Path, forced: bool, filters: tuple[str, ...]
) -> None:
    """References that alternate between shared containers and their own fill a few groups
    of each kind, never a process of every few (which took a GRCh38-shaped CRAM of 3,300
    references 1,366 processes); a group's run of containers holds others' records, which it
    leaves to their own groups."""
    crai = alts_and_decoys.with_name(alts_and_decoys.name + ".crai")
    shared = multi_region_unsafe(crai).shared
    names = header_names(alts_and_decoys)
    changes = sum((i in shared) != (i + 1 in shared) for i in range(2, len(names) - 1))
    assert len(shared) > 100 and changes > 50  # alternating, as in GRCh38
    parsed = Filters(exclude_flags=0x904, min_mapq=20) if filters else Filters()
    result = count_bam_sync(CountRequest(bam=alts_and_decoys, filters=parsed, verify="full"))
    assert {r.region: r.count for r in result.regions} == oracle(alts_and_decoys, [*names, "*"], filters)
    assert result.total == samtools_count(alts_and_decoys, *filters)
    assert result.shards <= 12
    assert _read_one_by_one(result, forced)


def test_at_a_url_the_same_references_are_read_a_query_each(
    small_contigs: Path, long_reads: Path, forced: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL's CRAM has no container headers read up front: a CRAM 3's or 2.1's group of such
    references is fetched by its CRAI's offsets and piped, a sweep reads whole references, and
    each counts as the local file does."""
    monkeypatch.chdir(tmp_path)  # htslib may drop an index where it runs: never the test's folder
    bed = long_reads.with_name("url-ranges.bed")
    rng = random.Random(12)
    bed.write_text("".join(f"chr1\t{s}\t{s + 3_000}\n" for s in sorted(rng.sample(range(350_000), 30))))
    filtered = Filters(exclude_flags=0x904, min_mapq=20)
    # Unfiltered, a URL's small contigs would be summed as a group (their totals come from
    # idxstats): a group that shares containers is tallied instead.
    for cram, regions_file, filters in (
        (small_contigs, None, Filters()),
        (small_contigs, None, filtered),
        (long_reads, bed, filtered),
    ):
        logs.configure(level="debug", json=True)
        with serve(cram.parent) as server, capture_logs() as events:
            url = Url(server.url(cram.name))
            by_url = count_bam_sync(CountRequest(bam=url, filters=filters, regions_file=regions_file, verify="full"))
        logs.configure(level="warning", json=False)
        local = count_bam_sync(CountRequest(bam=cram, filters=filters, regions_file=regions_file, verify="full"))
        assert [(r.region, r.count) for r in by_url.regions] == [(r.region, r.count) for r in local.regions]
        assert _read_one_by_one(by_url, forced)
        avoided = any("were read without it" in note for note in by_url.notes)
        piped = any(e["event"] == "tally_piped" for e in events)
        assert piped == (avoided and cram.name.startswith("small-"))
    bed_rows = [line.split("\t") for line in bed.read_text().splitlines()]
    wanted = [samtools_count(long_reads, "-F", "0x904", "-q", "20", f"chr1:{int(s) + 1}-{e}") for _, s, e in bed_rows]
    assert [r.count for r in by_url.regions] == wanted


_LAYOUTS = {
    "3.1": {"version": "3.1"},
    "2.1": {"version": "2.1"},
    "lzma, bzip2": {"use_lzma": "1", "use_bzip2": "1"},
    "small slices, 4 a container": {"seqs_per_slice": "40", "slices_per_container": "4"},
    "references mixed in slices": {"multi_seq_per_slice": "1", "seqs_per_slice": "300"},
    "embedded reference": {"embed_ref": "1"},
}


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_crams_written_every_way_count_as_samtools(layout: str, tmp_path: Path) -> None:
    """The same reads as CRAMs written with samtools' other layouts (versions, codecs, slices,
    multi-reference slices, an embedded reference): every default row, with the issue's four
    filter sets, equals samtools' count decoding the whole CRAM."""
    rng = random.Random(layout)
    lengths = {"chr1": 120_000, "chr2": 60_000, **{f"chrUn_{i}": 1_500 + 91 * i for i in range(12)}}
    reads = [
        (ref, rng.randrange(1, length - 150), rng.choice([100, 150]))
        for ref, length in lengths.items()
        for _ in range(60)
    ]
    reads += [(ref, rng.randrange(1, lengths[ref] - 150), 100) for ref in ("chr1", "chr2") for _ in range(1500)]
    options = dict(_LAYOUTS[layout])
    if layout == "embedded reference":  # needs a reference to embed
        fasta = tmp_path / "ref.fa"
        fasta.write_text(
            "".join(f">{n}\n{'ACGT' * (length // 4)}{'A' * (length % 4)}\n" for n, length in lengths.items())
        )
        subprocess.run([SAMTOOLS, "faidx", str(fasta)], check=True)
        options["reference"] = str(fasta)
    paired_too = (0, 16, 99, 147, 83, 163, 1024, 256, 512, 2048, 4)  # 4: placed, unmapped
    cram = _cram(tmp_path, "layout", lengths, reads, flags=paired_too, **options)
    names = [*header_names(cram), "*"]
    for args, filters in (
        ((), Filters()),
        (("-F", "0x904", "-q", "20"), Filters(exclude_flags=0x904, min_mapq=20)),
        (("-f", "2"), Filters(require_flags=2)),
        (("-G", "0x900"), Filters(exclude_all_flags=0x900)),
    ):
        result = count_bam_sync(CountRequest(bam=cram, filters=filters, verify="full"))
        assert {r.region: r.count for r in result.regions} == oracle(cram, names, args)
        assert result.total > 0
