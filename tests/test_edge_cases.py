"""Inputs that samtools accepts and a careless counter gets wrong (found in review)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bamcountd import CountRequest, Filters, count_bam_sync
from bamcountd.cli import main
from bamcountd.synth import Reference, write_bam
from tests.support.bams import SAMTOOLS, header_names, oracle, samtools_count


def read(name: str, ref: str, pos: int, flag: int = 0, mapq: int = 60) -> str:
    return f"{name}\t{flag}\t{ref}\t{pos}\t{mapq}\t10M\t*\t0\t0\tAAAAAAAAAA\t*"


def tsv(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict[str, int]:
    assert main(["count", *map(str, args), "--format", "tsv"]) == 0, capsys.readouterr().err
    return {name: int(count) for name, count in (line.split("\t") for line in capsys.readouterr().out.splitlines())}


def expected(bam: Path, *filters: str) -> dict[str, int]:
    names = [*header_names(bam), "*"]
    return {**oracle(bam, names, filters), "total": samtools_count(bam, *filters)}


@pytest.mark.parametrize("filters", [(), ("-q", "1")])
def test_reads_starting_past_the_reference_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    references = [Reference("chrM", 1000), Reference("chr2", 1000), Reference("chr3", 1000)]
    records = [read("r1", "chrM", 500), read("r2", "chrM", 1200), read("r3", "chr2", 5), read("r4", "chr2", 4000)]
    records.append(read("r5", "chrM", 70_000))  # beyond the group's BED window
    records += [read("r6", "chr3", 7, mapq=0), read("r7", "chr3", 30_000)]  # inside it, past LN
    bam = write_bam(tmp_path / "past.bam", references, records)
    assert tsv(capsys, bam, *filters) == expected(bam, *filters)
    assert expected(bam, *filters)["chrM"] == 3
    with capture_logs() as events:  # not around main(), which configures structlog afresh
        result = count_bam_sync(CountRequest(bam=bam, filters=Filters(min_mapq=1) if filters else Filters()))
    recounted = [e["references"] for e in events if e["event"] == "group_recounted"]
    tallied = [e["references"] for e in events if e["event"] == "group_tallied"]
    # r5 is outside the group's BED: the group's records differ from the index.  Its tally
    # (unfiltered: one more pass over the group; filtered: the tally it already was) tells
    # which reference differs, and only that one is counted again on its own.
    assert (recounted, tallied, result.shards) == ([1], [] if filters else [3], 2)


@pytest.mark.parametrize("filters", [(), ("-q", "1")])
def test_names_with_braces(tmp_path: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]) -> None:
    references = [Reference("w", 1000), Reference("{w}", 1000), Reference("a}b", 1000), Reference("x}:y", 1000)]
    records = [
        read("r1", "w", 5),
        read("r2", "{w}", 5),
        read("r3", "{w}", 6),
        read("r4", "a}b", 7),
        read("r5", "x}:y", 9),
    ]
    bam = write_bam(tmp_path / "braces.bam", references, records)
    counts = tsv(capsys, bam, *filters)
    truth = {"w": 1, "{w}": 2, "a}b": 1, "x}:y": 1, "*": 0, "total": 5}
    assert counts == truth
    assert samtools_count(bam, *filters, "{{w}}") == truth["{w}"]  # samtools' own spelling of {w}
    assert samtools_count(bam, *filters) == truth["total"]
    assert main(["count", str(bam), "-r", "{{w}}:1-10"]) == 2
    assert "cannot address a range" in capsys.readouterr().err


def test_a_braced_name_that_holds_a_brace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With references ``a`` and ``a}b``, ``{a}b}`` is ``a}b`` (samtools reads it so) and ``{a}``
    is ``a``; ``{a}b}:1-15`` is refused in words (samtools cannot read it: it warns, counts 0)."""
    bam = write_bam(
        tmp_path / "brace.bam",
        [Reference("a", 1000), Reference("a}b", 1000)],
        [read("r1", "a", 10), read("r2", "a}b", 10), read("r3", "a}b", 20)],
    )
    counts = tsv(capsys, bam, "-r", "{a}b}", "-r", "{a}")
    assert counts == {"{a}b}": samtools_count(bam, "{a}b}"), "{a}": samtools_count(bam, "{a}"), "total": 3}
    assert counts["{a}b}"] == 2
    assert main(["count", str(bam), "-r", "{a}b}:1-15"]) == 2
    assert "'a}b' contains '}', so samtools cannot address a range of it" in capsys.readouterr().err
    assert main(["count", str(bam), "-r", "{a}c}"]) == 2
    assert "region '{a}c}': expected ':' after '}'" in capsys.readouterr().err
    assert main(["count", str(bam), "-r", "{b}"]) == 2
    assert "region '{b}': no reference of that name" in capsys.readouterr().err


def test_unplaced_region_when_there_are_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bam = write_bam(
        tmp_path / "placed.bam", [Reference("c", 1000), Reference("e", 10)], [read("r1", "c", 5), read("r2", "c", 50)]
    )
    assert tsv(capsys, bam, "-r", "*", "-r", "e") == {
        "*": samtools_count(bam, "*"),
        "e": samtools_count(bam, "e"),
        "total": 0,
    }


def test_bed_references_named_like_header_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bam = write_bam(
        tmp_path / "t.bam",
        [Reference("chr1", 1000), Reference("track2", 1000)],
        [read("r1", "chr1", 5), read("r2", "track2", 5)],
    )
    bed = tmp_path / "t.bed"
    bed.write_text("track name=mine\nbrowser position chr1:1-10\nchr1\t0\t100\ntrack2\t0\t100 \n")
    counts = tsv(capsys, bam, "--regions-file", bed)
    assert counts == {
        "chr1:1-100": samtools_count(bam, "chr1:1-100"),
        "track2:1-100": samtools_count(bam, "track2:1-100"),
        "total": 2,
    }


def test_unaligned_bam_without_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bam = write_bam(tmp_path / "u.bam", [], [f"u{i}\t4\t*\t0\t0\t*\t*\t0\t0\tAAAA\t*" for i in range(3)], sort=False)
    assert tsv(capsys, bam) == {"*": samtools_count(bam, "*"), "total": samtools_count(bam)} == {"*": 3, "total": 3}


def test_non_utf8_reference_names_are_written_as_their_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sam = tmp_path / "n.sam"
    sam.write_bytes(
        b"@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:caf\xe9\tLN:100\ncaf\t0\tcaf\xe9\t5\t60\t4M\t*\t0\t0\tAAAA\t*\n"
    )
    bam = tmp_path / "n.bam"
    subprocess.run([SAMTOOLS, "view", "-b", "-o", str(bam), str(sam)], check=True)
    subprocess.run([SAMTOOLS, "index", str(bam)], check=True)
    out = tmp_path / "n.tsv"
    assert main(["count", str(bam), "-o", str(out), "--format", "tsv"]) == 0, capsys.readouterr().err
    assert out.read_bytes() == b"caf\xe9\t1\n*\t0\ntotal\t1\n"
    assert samtools_count(bam) == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--timeout", "nan"), "--timeout"),
        (("-q", "300"), "between 0 and 255"),
        (("-F", "0b100"), "0b100"),
        (("-F", "1_024"), "1_024"),
    ],
)
def test_bad_numbers_are_usage_errors(
    shared_bam: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], words: str
) -> None:
    assert main(["count", str(shared_bam), *args]) == 2
    assert words in capsys.readouterr().err


def test_bed_with_non_ascii_digits_is_a_usage_error(
    shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bed = tmp_path / "u.bed"
    bed.write_text("chr1\t0\t1\u00b2\n")
    assert main(["count", str(shared_bam), "--regions-file", str(bed)]) == 2
    assert "u.bed:1" in capsys.readouterr().err


def test_flag_spellings_match_samtools(shared_bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for spelling in ("0x904", "2308", "04404", "SECONDARY,SUPPLEMENTARY,UNMAP"):
        theirs = subprocess.run(
            [SAMTOOLS, "view", "-c", "-F", spelling, str(shared_bam)], capture_output=True, check=True
        )
        assert tsv(capsys, shared_bam, "-F", spelling)["total"] == int(theirs.stdout)


@pytest.mark.parametrize("index_kind", ["bai", "csi"])
def test_filtered_groups_with_either_index(
    shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], index_kind: str
) -> None:
    """Small references are counted together through `view -u -U | idxstats -` with a BAI or
    a CSI alike: the records that pass and those that do not must add up to the index."""
    bam = tmp_path / "copy.bam"
    shutil.copy(shared_bam, bam)
    flag = "-c" if index_kind == "csi" else "-b"
    subprocess.run([SAMTOOLS, "index", flag, str(bam), f"{bam}.{index_kind}"], check=True)
    filters = ("-F", "0x904", "-q", "20")
    with capture_logs() as events:
        result = count_bam_sync(CountRequest(bam=bam, filters=Filters(exclude_flags=0x904, min_mapq=20)))
    assert result.shards < len(result.regions)  # grouped, not one process per reference
    assert not [e for e in events if e["event"] == "group_recounted"]
    assert {r.region: r.count for r in result.regions} == oracle(bam, [*header_names(bam), "*"], filters)
    assert tsv(capsys, bam, *filters)["total"] == samtools_count(bam, *filters)


def test_an_index_named_dash_in_the_working_folder_is_not_read(
    shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`samtools idxstats -` looks for `-.bai` in its working folder and, if one is there, prints
    that index instead of reading the stream; bamcountd runs it in a private folder."""
    other = write_bam(tmp_path / "other.bam", [Reference("chr1", 1000)], [read("x", "chr1", 5)])
    shutil.copy(f"{other}.bai", tmp_path / "-.bai")
    monkeypatch.chdir(tmp_path)
    assert tsv(capsys, shared_bam, "-q", "20") == expected(shared_bam, "-q", "20")
