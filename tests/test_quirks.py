"""Files and options from the wild that once gave a plausible wrong number or a false refusal:
quirky indexes, records no region reaches, samtools' flag habits, ``.``, unsorted BAMs, BED
headers, names no JSON or range can hold.  Every count is compared with ``samtools view -c``."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bamcountd import CountRequest, Filters, count_bam_sync
from bamcountd.cli import main
from bamcountd.options import combine_flags
from bamcountd.service.config import load
from bamcountd.synth import Reference, random_records, write_bam
from tests.support.bams import (
    SAMTOOLS,
    bam_record,
    bam_records,
    header_names,
    oracle,
    pysam_samtools,
    samtools_count,
    samtools_index,
    write_raw_bam,
)

FILTER_SETS = [(), ("-F", "0x400"), ("-F", "0x904", "-q", "20"), ("-f", "2"), ("-G", "0x900")]


def run_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict[str, Any]:
    code = main(["count", *map(str, args), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


def rows(document: dict[str, Any]) -> dict[str, int]:
    return {row["region"]: row["count"] for row in document["regions"]} | {"total": document["total"]}


def run_error(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main(["count", *map(str, args)])
    out, err = capsys.readouterr()
    assert out == ""
    errors = [line for line in err.splitlines() if not line.startswith("{")]  # the rest are log events
    assert len(errors) == 1 and errors[0].startswith("bamcountd: error: "), err
    return code, errors[0]


def read(name: str, ref: str, pos: int, flag: int = 0, mapq: int = 60) -> str:
    return f"{name}\t{flag}\t{ref}\t{pos}\t{mapq}\t10M\t*\t0\t0\tAAAAAAAAAA\t*"


# --- 1. an index whose region queries miss records it counts (biobambam2's bamindex) --------


@pytest.fixture
def biobambam_bam(tmp_path: Path) -> tuple[Path, Path]:
    """Placed unmapped reads at POS 1 before the first mapped read, indexed by ``bamindex``:
    htslib's queries through that index skip them, though its counts include them.  Returns
    the BAM (with bamindex's .bai next to it) and a samtools index of it, the oracle's."""
    references = [Reference("chr1", 400_000), Reference("chr2", 100_000)]
    records = [f"u{i}\t69\tchr1\t1\t0\t*\t=\t1\t0\tAAAAAAAAAA\t*" for i in range(2)]
    records += list(random_records(references, 3000, unplaced=20, read_length=50, seed=4))
    bam = write_bam(tmp_path / "bb.bam", references, records, index=False)
    with bam.open("rb") as source:
        built = subprocess.run(["bamindex"], stdin=source, capture_output=True, check=True)
    Path(str(bam) + ".bai").write_bytes(built.stdout)
    truth = samtools_index(bam, tmp_path / "truth.bai")
    by_bamindex = samtools_count(bam, "chr1", index=Path(str(bam) + ".bai"))
    assert by_bamindex == samtools_count(bam, "chr1", index=truth) - 2  # the trap is there
    return bam, truth


@pytest.mark.parametrize("filters", FILTER_SETS)
@pytest.mark.parametrize("how", [(), ("--no-split",), ("--min-shard-reads", "300")])
def test_index_that_misses_records_gives_the_whole_files_number(
    biobambam_bam: tuple[Path, Path], capsys: pytest.CaptureFixture[str], filters: tuple[str, ...], how: tuple[str, ...]
) -> None:
    bam, truth = biobambam_bam
    document = run_json(capsys, bam, *filters, *how)
    names = [*header_names(bam), "*"]
    assert rows(document) == {**oracle_through(bam, truth, names, filters), "total": samtools_count(bam, *filters)}
    assert document["verification"] == "index"
    assert any("miss records" in note for note in document["notes"])


def oracle_through(bam: Path, index: Path, names: list[str], filters: tuple[str, ...]) -> dict[str, int]:
    return {
        name: samtools_count(bam, *filters, name if name == "*" else "{" + name + "}", index=index) for name in names
    }


@pytest.mark.parametrize("filters", [(), ("-F", "0x400")])
def test_index_that_misses_records_explicit_regions_count_through_a_fresh_index(
    biobambam_bam: tuple[Path, Path], capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    bam, truth = biobambam_bam
    document = run_json(capsys, bam, *filters, "-r", "chr1", "-r", "chr1:1-1000", "-r", "chr2")
    expected = {r: samtools_count(bam, *filters, r, index=truth) for r in ("chr1", "chr1:1-1000", "chr2")}
    assert rows(document) == {**expected, "total": sum(expected.values())}
    assert document["index"] != str(bam) + ".bai"
    assert any("built into the cache" in note for note in document["notes"])
    code, err = run_error(capsys, bam, *filters, "-r", "chr1", "--no-index-build")
    assert code == 2
    assert str(bam) in err and "miss records" in err and "--no-index-build" in err


def test_a_verified_pair_is_not_accounted_again_unless_asked(
    biobambam_bam: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bam, truth = biobambam_bam
    shutil.copy(truth, str(bam) + ".bai")  # a good index this time
    filters = ("-F", "0x904", "-q", "20", "--no-split")
    expected = {**oracle(bam, [*header_names(bam), "*"], filters[:4]), "total": samtools_count(bam, *filters[:4])}
    first = run_json(capsys, bam, *filters)
    second = run_json(capsys, bam, *filters)
    full = run_json(capsys, bam, *filters, "--verify", "full")
    assert rows(first) == rows(second) == rows(full) == expected
    assert (first["verification"], second["verification"], full["verification"]) == ("index", "earlier", "index")
    # Once the BAM changes (here only its time stamp), the earlier proof is not its own.
    bam.touch()
    shutil.copy(truth, str(bam) + ".bai")
    assert run_json(capsys, bam, *filters)["verification"] == "index"


# --- 2. a record that names a reference but has no position ---------------------------------


@pytest.fixture
def positionless_bam(tmp_path: Path) -> Path:
    """chr2's first record: RNAME chr2, POS 0, unmapped (written byte by byte; SAM text would
    be normalised).  samtools indexes it under chr2's unmapped reads; no query returns it."""
    references = [Reference("chr1", 50_000), Reference("chr2", 30_000)]
    records = list(random_records(references, 400, unplaced=5, read_length=50, seed=8))
    plain = write_bam(tmp_path / "plain.bam", references, records, index=False)
    header, raw = bam_records(plain)
    first_on_chr2 = next(i for i, r in enumerate(raw) if int.from_bytes(r[4:8], "little", signed=True) == 1)
    raw.insert(first_on_chr2, bam_record("z0", flag=4, tid=1, pos=-1, bin_=4680))
    bam = write_raw_bam(tmp_path / "posless.bam", header, raw)
    samtools_index(bam)
    assert (
        samtools_count(bam) == samtools_count(bam, "chr1") + samtools_count(bam, "chr2") + samtools_count(bam, "*") + 1
    )
    return bam


@pytest.mark.parametrize("filters", [(), ("-F", "0x100"), ("-F", "0x904", "-q", "20")])
def test_positionless_record_counts_in_the_whole_file(
    positionless_bam: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    document = run_json(capsys, positionless_bam, *filters)
    assert document["total"] == samtools_count(positionless_bam, *filters)
    chr1 = rows(document)["chr1"]
    assert chr1 == samtools_count(positionless_bam, *filters, "chr1")
    assert document["notes"] == [
        "1 record of chr2 without a position (POS 0), which no region query returns: the rows come from one pass "
        "over the whole file, which counts such records under their reference"
    ]
    # Asked for by name, chr2 is what samtools counts for chr2: the record has no position.
    named = run_json(capsys, positionless_bam, *filters, "-r", "chr2")
    assert named["total"] == samtools_count(positionless_bam, *filters, "chr2")
    assert named["notes"] == [
        "1 record of chr2 without a position (POS 0), which no region query returns: chr2 leaves such records out, "
        "as samtools does (the default rows count them)"
    ]
    assert run_json(capsys, positionless_bam, *filters, "-r", "chr2", "--no-index-build")["notes"] == named["notes"]


# --- 3. repeated flag options ---------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ("-F", "4", "-F", "16"),
        ("-f", "0x10", "-f", "0x40"),
        ("-G", "0x100", "-G", "0x800"),
        ("-F", "0x400", "-F", "256"),
    ],
)
def test_repeated_flags_are_ored_like_samtools(
    shared_bam: Path, capsys: pytest.CaptureFixture[str], options: tuple[str, ...]
) -> None:
    document = run_json(capsys, shared_bam, *options)
    assert document["total"] == samtools_count(shared_bam, *options)
    assert document["total"] != samtools_count(shared_bam, *options[2:])  # the last one alone differs


def test_flag_lists_everywhere_options_are_read(tmp_path: Path) -> None:
    assert combine_flags("0x4 0x10") == combine_flags(["UNMAP", 16]) == combine_flags(20) == 20
    with pytest.raises(ValueError, match="cannot read flag"):
        combine_flags("4,16")  # samtools would read 4 and drop the rest: refuse instead
    for folder in ("w", "r", "s"):
        (tmp_path / folder).mkdir()
    config = tmp_path / "bamcountd.toml"
    config.write_text(
        f'watch = ["{tmp_path}/w"]\nresults = "{tmp_path}/r"\nstate = "{tmp_path}/s"\nexclude_flags = ["0x4", "DUP"]\n'
    )
    assert load({"config": config}, environ={}).count.filters.exclude_flags == 0x404
    environ = {"BAMCOUNTD_REQUIRE_FLAGS": "1 0x40"}
    assert load({"config": config}, environ=environ).count.filters.require_flags == 0x41


# --- 4. the region "." ----------------------------------------------------------------------


def test_dot_is_the_whole_file_and_braces_name_the_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    references = [Reference(".", 1000), Reference("chr1", 1000)]
    records = [read("a", ".", 5), read("b", ".", 50, flag=16), read("c", "chr1", 9)]
    records.append("u\t4\t*\t0\t0\t*\t*\t0\t0\tAAAA\t*")
    bam = write_bam(tmp_path / "dot.bam", references, records)
    document = run_json(capsys, bam, "-r", ".", "-r", "{.}", "-F", "0x10")
    assert rows(document) == {
        ".": samtools_count(bam, "-F", "0x10", "."),
        "{.}": samtools_count(bam, "-F", "0x10", "{.}"),
        "total": samtools_count(bam, "-F", "0x10", ".") + samtools_count(bam, "-F", "0x10", "{.}"),
    }
    assert rows(document)["."] == 3  # every record but the reverse one, the unplaced one included
    default = rows(run_json(capsys, bam))
    assert list(default) == ["{.}", "chr1", "*", "total"]
    assert default["{.}"] == samtools_count(bam, "{.}") == 2


# --- 5. BAMs that are not coordinate-sorted --------------------------------------------------


@pytest.mark.parametrize("order", ["unsorted", "queryname", "lying"])
@pytest.mark.parametrize("filters", [(), ("-F", "0x904", "-q", "20")])
def test_unsorted_bams_are_counted_in_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], order: str, filters: tuple[str, ...]
) -> None:
    references = [Reference("chr1", 20_000), Reference("chr2", 10_000)]
    records = list(random_records(references, 600, unplaced=30, read_length=50, seed=6))
    random.Random(3).shuffle(records)
    sorted_bam = write_bam(tmp_path / "sorted.bam", references, records)
    if order == "queryname":
        bam = tmp_path / "name.bam"
        subprocess.run([SAMTOOLS, "sort", "-n", "-o", str(bam), str(sorted_bam)], check=True, capture_output=True)
    else:  # file order as written (random); "lying" says SO:coordinate in its header
        sort_order = "coordinate" if order == "lying" else "unsorted"
        bam = write_bam(tmp_path / f"{order}.bam", references, records, sort=False, index=False, sort_order=sort_order)
    document = run_json(capsys, bam, *filters)
    names = [*header_names(sorted_bam), "*"]  # samtools' per-reference numbers, from a sorted copy of the same reads
    assert rows(document) == {**oracle(sorted_bam, names, filters), "total": samtools_count(bam, *filters)}
    assert (document["method"], document["verification"], document["index"]) == ("stream", "stream", None)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(bam.name)) == [bam.name]
    code, err = run_error(capsys, bam, "-r", "chr1:1-100")
    assert code == 2
    assert "not coordinate-sorted" in err and "samtools sort" in err


# --- 6. BED headers, and BEDs that are not plain text ----------------------------------------


def test_bed_lines_on_references_named_like_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    references = [Reference("track", 1000), Reference("browser", 1000), Reference("#hash", 1000), Reference("c", 900)]
    records = [read(f"r{i}", ref.name, 10 + 40 * i) for i, ref in enumerate(references) for _ in range(3)]
    bam = write_bam(tmp_path / "names.bam", references, records)
    bed = tmp_path / "targets.bed"
    text = "track name=targets\nbrowser position c:1-100\n# a comment\n#nope\t0\t5\n"
    text += "track\t0\t500\nbrowser\t0\t500\n#hash\t0\t500\nc\t0\t500\n"
    bed.write_text(text)
    expected = {
        f"{name}:1-500": samtools_count(bam, "{" + name + "}:1-500") for name in ("track", "browser", "#hash", "c")
    }
    assert rows(run_json(capsys, bam, "--regions-file", bed)) == {**expected, "total": sum(expected.values())}
    assert sum(expected.values()) == 12
    packed = tmp_path / "targets.bed.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert rows(run_json(capsys, bam, "--regions-file", packed)) == {**expected, "total": 12}
    binary = tmp_path / "targets.bed.xz"
    binary.write_bytes(b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4F\x02\x00!\x01")
    code, err = run_error(capsys, bam, "--regions-file", binary)
    assert code == 2
    assert "not a text BED file" in err and "\\x" not in err


# --- 7. false refusals: bamtools' index, '}' names, non-UTF-8 names ----------------------------


def test_index_without_statistics_is_replaced(
    shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bam = tmp_path / "bt.bam"
    shutil.copy(shared_bam, bam)
    subprocess.run(["bamtools", "index", "-in", str(bam)], check=True, capture_output=True)
    stats = subprocess.run([SAMTOOLS, "idxstats", str(bam)], capture_output=True, check=True, text=True).stdout
    assert {line.split("\t")[2] for line in stats.splitlines()} == {"0"}  # no statistics to check with
    names = [*header_names(bam), "*"]
    for filters in ((), ("-q", "20")):
        document = run_json(capsys, bam, *filters)
        assert rows(document) == {**oracle(shared_bam, names, filters), "total": samtools_count(bam, *filters)}
        assert any("no per-reference statistics" in note for note in document["notes"])
    code, err = run_error(capsys, bam, "--no-index-build")
    assert code == 2
    assert "no per-reference statistics" in err


@pytest.mark.parametrize("filters", [(), ("-q", "1")])
def test_a_name_with_a_brace_is_never_cut_into_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    references = [Reference("a}b", 50_000), Reference("chr1", 50_000)]
    records = list(random_records(references, 2000, read_length=50, seed=2))
    bam = write_bam(tmp_path / "brace.bam", references, records)
    document = run_json(capsys, bam, *filters, "--min-shard-reads", "100")
    assert rows(document) == {**oracle(bam, [*header_names(bam), "*"], filters), "total": samtools_count(bam, *filters)}
    assert document["shards"] > 3  # chr1 was cut; a}b was not


def test_json_is_valid_for_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    references = [Reference("chr1", 1000)]
    bam = write_bam(tmp_path / "plain.bam", references, [read("a", "chr1", 5), read("b", "chr1", 7)], index=False)
    header, raw = bam_records(bam)
    weird = header.replace(b"SN:chr1", b"SN:chr\xe9").replace(b"chr1\x00", b"chr\xe9\x00")
    odd = write_raw_bam(tmp_path / "odd.bam", weird, raw)
    samtools_index(odd)
    completed = subprocess.run(
        [sys.executable, "-m", "bamcountd", "count", str(odd), "--format", "json"], capture_output=True, check=True
    )
    document = json.loads(completed.stdout.decode("utf-8"))  # strict UTF-8: valid JSON text
    name = document["regions"][0]["region"]
    assert name.encode("utf-8", "surrogateescape") == b"chr\xe9"
    assert document["regions"][0]["count"] == samtools_count(odd, "{chr\udce9}") == 2


# --- 8. one odd read must not cost a process per reference of its group ---------------------


@pytest.mark.parametrize("filters", [Filters(), Filters(exclude_flags=0x400)])
def test_reads_past_the_end_cost_only_their_own_references(tmp_path: Path, filters: Filters) -> None:
    references = [Reference(f"ctg{i}", 2_000) for i in range(400)]
    records = [read(f"r{i}", ref.name, 100 + i % 1500) for i, ref in enumerate(references) for _ in range(3)]
    odd = [7, 150, 399]
    records += [read(f"far{i}", f"ctg{i}", 90_000) for i in odd]  # past LN and the group's BED window
    bam = write_bam(tmp_path / "many.bam", references, records)
    with capture_logs() as events:
        result = count_bam_sync(CountRequest(bam=bam, filters=filters))
    flags = ("-F", "0x400") if filters.active else ()
    assert result.total == samtools_count(bam, *flags)
    assert {r.region: r.count for r in result.regions} == oracle(bam, [*header_names(bam), "*"], flags)
    recounted = sum(e["references"] for e in events if e["event"] == "group_recounted")
    assert recounted == len(odd)


def test_one_pass_over_a_big_header_and_records_across_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Thousands of references (a header over several BGZF blocks) and records split across
    blocks, in file order: the per-reference numbers are samtools' own (idxstats of a sorted copy)."""
    references = [Reference(f"contig{i}_alt", 5_000 + i) for i in range(3000)]
    records = list(random_records(references, 8000, unplaced=100, read_length=100, seed=12))
    random.Random(5).shuffle(records)
    bam = write_bam(tmp_path / "big.bam", references, records, sort=False, index=False, sort_order="unsorted")
    sorted_bam = write_bam(tmp_path / "sorted.bam", references, records)
    stats = subprocess.run([SAMTOOLS, "idxstats", str(sorted_bam)], capture_output=True, check=True, text=True).stdout
    expected = {
        name: int(mapped) + int(unmapped) for name, _, mapped, unmapped in (s.split("\t") for s in stats.splitlines())
    }
    document = run_json(capsys, bam)
    assert document["method"] == "stream"
    assert rows(document) == {**expected, "total": samtools_count(bam)}


def test_one_pass_over_a_damaged_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    references = [Reference("chr1", 20_000)]
    records = list(random_records(references, 3000, read_length=100, seed=3))
    random.Random(1).shuffle(records)
    bam = write_bam(tmp_path / "cut.bam", references, records, sort=False, index=False, sort_order="unsorted")
    data = bam.read_bytes()
    bam.write_bytes(data[: len(data) // 2])  # cut inside a block: samtools says so
    code, err = run_error(capsys, bam)
    assert code == 1
    assert str(bam) in err and "truncated" in err


# --- samtools 1.22+: the accounting comes from `view -c --save-counts`, at no extra cost -------


@pytest.mark.parametrize("filters", [("-F", "0x400"), ("-F", "0x904", "-q", "20")])
@pytest.mark.parametrize("how", [("--no-split",), ("--min-shard-reads", "300")])
def test_newer_samtools_accounts_with_saved_counts(
    biobambam_bam: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    filters: tuple[str, ...],
    how: tuple[str, ...],
) -> None:
    bam, truth = biobambam_bam
    samtools = pysam_samtools(tmp_path)
    log = tmp_path / "argv.log"
    monkeypatch.setenv("SAMTOOLS_ARGV_LOG", str(log))
    by_bamindex = Path(str(bam) + ".bai").read_bytes()
    for good, index in ((True, truth.read_bytes()), (False, by_bamindex)):  # bamindex's misses records
        Path(str(bam) + ".bai").write_bytes(index)
        log.write_text("")
        document = run_json(capsys, bam, *filters, *how, "--samtools", samtools, "--verify", "full")
        names = [*header_names(bam), "*"]
        assert rows(document) == {**oracle_through(bam, truth, names, filters), "total": samtools_count(bam, *filters)}
        assert document["samtools"] >= "1.22"
        assert any("miss records" in note for note in document["notes"]) != good
        if good:
            commands = log.read_text().splitlines()
            counted = [line for line in commands if line.startswith("view") and "--save-counts" in line]
            assert counted and not [line for line in commands if " -U " in line and "-e" not in line]


@pytest.mark.parametrize("filters", [(), ("-q", "20")])
def test_an_index_without_its_count_of_unplaced_reads(
    shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    """n_no_coor is optional at a BAI's end (not every writer adds it): * is then counted but not checked."""
    bam = tmp_path / "short.bam"
    shutil.copy(shared_bam, bam)
    Path(str(bam) + ".bai").write_bytes(Path(str(shared_bam) + ".bai").read_bytes()[:-8])
    stats = subprocess.run([SAMTOOLS, "idxstats", str(bam)], capture_output=True, check=True, text=True).stdout
    assert stats.splitlines()[-1] == "*\t0\t0\t0" and samtools_count(bam, "*") > 0
    for _ in range(2):  # and again, with the proof that the first count left
        document = run_json(capsys, bam, *filters)
        names = [*header_names(bam), "*"]
        assert rows(document) == {**oracle(shared_bam, names, filters), "total": samtools_count(bam, *filters)}
        assert any("unplaced reads" in note for note in document["notes"])


def test_an_index_next_to_a_bam_that_is_not_sorted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A queryname-sorted BAM beside the index of its coordinate-sorted twin (same reads): the
    index's counts hold, its offsets do not; whole references come from one pass."""
    references = [Reference("chr1", 20_000), Reference("chr2", 10_000)]
    records = list(random_records(references, 600, unplaced=30, read_length=50, seed=6))
    twin = write_bam(tmp_path / "twin.bam", references, records)
    bam = tmp_path / "name.bam"
    subprocess.run([SAMTOOLS, "sort", "-n", "-o", str(bam), str(twin)], check=True, capture_output=True)
    shutil.copy(str(twin) + ".bai", str(bam) + ".bai")  # newer than the BAM: not stale
    names = [*header_names(twin), "*"]
    for filters in ((), ("-q", "20")):
        for regions in ((), ("-r", "chr1", "-r", "chr2")):
            document = run_json(capsys, bam, *filters, *regions)
            wanted = names if not regions else ["chr1", "chr2"]
            expected = oracle(twin, wanted, filters)
            assert rows(document) == {**expected, "total": sum(expected.values())}
            assert samtools_count(bam, *filters) == samtools_count(twin, *filters)
            assert (document["method"], document["index"]) == ("stream", None)
            assert any("cannot be this BAM's" in note for note in document["notes"])
    code, err = run_error(capsys, bam, "-r", "chr1:1-100")
    assert code == 2
    assert "not coordinate-sorted" in err
