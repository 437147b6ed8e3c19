"""CRAM inputs: every count equals samtools' own ``samtools view -c`` on the same CRAM, decoded
whole (the oracle), though bamcountd decodes only the fields a count needs and never the
reference; bad CRAMs give errors, never numbers."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from bamcountd import CountRequest, Filters, count_bam_sync, cramfile, logs
from bamcountd import samtools as st
from bamcountd.cli import main
from bamcountd.cramfile import EOF_CONTAINER, crai_entries, read_totals
from bamcountd.errors import BadOption, BadReference, BamcountdError, BamNotFound, CorruptBam, IndexMismatch
from bamcountd.service.watch import is_candidate_name
from bamcountd.synth import Reference, random_records, tricky_bam, write_bam
from tests.support.bams import (
    FILTER_CASES,
    bam_record,
    bam_records,
    header_names,
    oracle,
    samtools_count,
    write_cram,
    write_fasta,
    write_raw_bam,
)


@pytest.fixture(scope="session")
def crams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path | None]]:
    """The tricky BAM as a CRAM against a reference and as one without: (CRAM, the reference the
    oracle decodes it with).  The FASTA the header's UR: names is removed, so nothing can
    quietly read it; the oracle gets a copy."""
    folder = tmp_path_factory.mktemp("cram")
    bam = tricky_bam(folder, reads=4000, unplaced=150, seed=5)
    fasta = write_fasta(folder / "written.fa", bam)
    with_ref = write_cram(bam, folder / "with-ref.cram", reference=fasta)
    without = write_cram(bam, folder / "no-ref.cram", reference=None)
    kept = folder / "oracle"
    kept.mkdir()
    copy = Path(shutil.copy(fasta, kept / "ref.fa"))
    shutil.copy(fasta.with_name(fasta.name + ".fai"), kept / "ref.fa.fai")
    fasta.unlink()
    fasta.with_name(fasta.name + ".fai").unlink()
    return {"reference": (with_ref, copy), "no_ref": (without, None)}


@pytest.fixture(autouse=True)
def _no_reference_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The oracle is samtools with the environment of the test: never the EBI's server.
    monkeypatch.setenv("REF_PATH", str(tmp_path / "no-such-folder" / "%s"))


@pytest.mark.parametrize("kind", ["reference", "no_ref"])
@pytest.mark.parametrize("case", FILTER_CASES)
def test_default_rows_match_samtools(crams: dict[str, tuple[Path, Path | None]], kind: str, case: str) -> None:
    cram, reference = crams[kind]
    args, filters = FILTER_CASES[case]
    result = count_bam_sync(CountRequest(bam=cram, filters=filters, jobs=2))
    names = [*header_names(cram), "*"]
    assert [r.region for r in result.regions] == names
    assert {r.region: r.count for r in result.regions} == oracle(cram, names, args, reference=reference)
    assert result.total == samtools_count(cram, *args, reference=reference) > 0
    assert result.index == cram.with_name(cram.name + ".crai")
    # Each reference (or component of references sharing containers) set against the container
    # headers; a filtered count after an unfiltered one trusts that proof.
    assert result.verification in ("containers", "earlier")


@pytest.mark.parametrize("kind", ["reference", "no_ref"])
@pytest.mark.parametrize("case", ["none", "F904_q20"])
def test_small_shards_ranges_and_groups_match_samtools(
    crams: dict[str, tuple[Path, Path | None]], kind: str, case: str
) -> None:
    """Many start-position shards and small-contig groups, where a read's end decides nothing."""
    cram, reference = crams[kind]
    args, filters = FILTER_CASES[case]
    result = count_bam_sync(CountRequest(bam=cram, filters=filters, jobs=3, min_shard_reads=50, verify="full"))
    assert result.shards > len(result.regions)
    names = [*header_names(cram), "*"]
    assert {r.region: r.count for r in result.regions} == oracle(cram, names, args, reference=reference)


@pytest.mark.parametrize("kind", ["reference", "no_ref"])
def test_ranges_and_bed_decode_the_read_ends(
    crams: dict[str, tuple[Path, Path | None]], kind: str, tmp_path: Path
) -> None:
    cram, reference = crams[kind]
    regions = ("{chr1}:1000-50000", "{chr2}:5000-6000", "{chr1:weird}:100-2000", "{HLA-A*01:01:01:01}", "*")
    args = ("-F", "0x904", "-q", "20")
    result = count_bam_sync(
        CountRequest(bam=cram, regions=regions, filters=Filters(exclude_flags=0x904, min_mapq=20), min_shard_reads=50)
    )
    assert [r.count for r in result.regions] == list(oracle(cram, regions, args, reference=reference).values())
    bed = tmp_path / "some.bed"
    bed.write_text("chr1\t999\t50000\nchr2\t4999\t6000\n")
    from_bed = count_bam_sync(CountRequest(bam=cram, regions_file=bed))
    assert [r.count for r in from_bed.regions] == [
        samtools_count(cram, "chr1:1000-50000", reference=reference),
        samtools_count(cram, "chr2:5000-6000", reference=reference),
    ]


def test_a_cram_without_an_index_gets_one_in_the_cache(
    crams: dict[str, tuple[Path, Path | None]], tmp_path: Path
) -> None:
    cram = Path(shutil.copy(crams["no_ref"][0], tmp_path / "plain.cram"))
    result = count_bam_sync(CountRequest(bam=cram, index_cache=tmp_path / "cache"))
    assert result.index is not None and result.index.parent == tmp_path / "cache"
    assert result.index.name.endswith(".crai")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "plain.cram"]  # nothing next to it
    assert result.total == samtools_count(cram)


def test_the_json_names_the_cram_and_its_verification(
    crams: dict[str, tuple[Path, Path | None]], capsys: pytest.CaptureFixture[str]
) -> None:
    cram, _ = crams["no_ref"]
    assert main(["count", str(cram), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["bam"] == str(cram)
    assert document["total"] == samtools_count(cram)
    assert document["verification"] in ("containers", "earlier")


def test_a_reference_is_checked_against_the_header(crams: dict[str, tuple[Path, Path | None]], tmp_path: Path) -> None:
    cram, reference = crams["reference"]
    assert reference is not None
    good = count_bam_sync(CountRequest(bam=cram, reference=reference))
    assert good.total == samtools_count(cram, reference=reference)
    with pytest.raises(BamNotFound, match="reference FASTA not found"):
        count_bam_sync(CountRequest(bam=cram, reference=tmp_path / "gone.fa"))
    unindexed = Path(shutil.copy(reference, tmp_path / "unindexed.fa"))
    with pytest.raises(BadReference, match=r"has no index unindexed\.fa\.fai"):
        count_bam_sync(CountRequest(bam=cram, reference=unindexed))
    other = tmp_path / "other.fa"
    other.write_text(">chr1\nACGT\n")
    (tmp_path / "other.fa.fai").write_text("chr1\t4\t6\t4\t5\n")
    with pytest.raises(BadReference, match="is not this CRAM's: its header has chr1 of length 300000"):
        count_bam_sync(CountRequest(bam=cram, reference=other))


def test_method_index_refuses_a_cram(crams: dict[str, tuple[Path, Path | None]]) -> None:
    with pytest.raises(BadOption, match="--method index cannot count a CRAM"):
        count_bam_sync(CountRequest(bam=crams["no_ref"][0], method="index"))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_truncated_cram_is_an_error_and_no_number(
    crams: dict[str, tuple[Path, Path | None]], tmp_path: Path, cut: float
) -> None:
    cram, _ = crams["no_ref"]
    data = cram.read_bytes()
    short = tmp_path / "short.cram"
    short.write_bytes(data[: int(len(data) * cut)])
    shutil.copy(cram.with_name(cram.name + ".crai"), tmp_path / "short.cram.crai")
    output = tmp_path / "out.json"
    assert main(["count", str(short), "--format", "json", "-o", str(output)]) != 0
    assert not output.exists()
    with pytest.raises(CorruptBam, match="truncated"):
        count_bam_sync(CountRequest(bam=short))


def test_another_crams_index_is_an_error(crams: dict[str, tuple[Path, Path | None]], tmp_path: Path) -> None:
    """A CRAI of another CRAM sends region queries to the wrong places: never a number."""
    other_bam = tricky_bam(tmp_path, reads=2500, unplaced=20, seed=9, name="other.bam")
    other = write_cram(other_bam, tmp_path / "other.cram", reference=None, slice_reads=300)
    mine_bam = tricky_bam(tmp_path, reads=4000, unplaced=50, seed=5, name="mine.bam")
    cram = write_cram(mine_bam, tmp_path / "mine.cram", reference=None, slice_reads=300)
    foreign = other.with_name("other.cram.crai")
    os.utime(foreign)  # newer than the CRAM: an older index would be set aside and one built
    for filters in (Filters(), Filters(exclude_flags=0x904, min_mapq=20)):
        with pytest.raises(BamcountdError):
            count_bam_sync(CountRequest(bam=cram, filters=filters, index=foreign, verify="full"))
    assert count_bam_sync(CountRequest(bam=cram)).total == samtools_count(cram)  # its own index: right


def test_a_cram_is_a_daemon_candidate() -> None:
    assert is_candidate_name("sample.cram")
    assert not is_candidate_name("sample.cram.part")
    assert not is_candidate_name(".cram")


def test_without_the_users_ref_path_htslib_never_asks_a_server(tmp_path: Path) -> None:
    env = st.cram_environment(tmp_path / "none", base={"HOME": "/root"})
    assert env["REF_PATH"] == f"{tmp_path / 'none'}/%s"
    assert not os.path.exists(tmp_path / "none")
    assert st.cram_environment(tmp_path, base={"REF_PATH": "http://mine/%s"})["REF_PATH"] == "http://mine/%s"


def _idxstats(cram: Path) -> dict[str, int]:
    lines = subprocess.run([st.find(None), "idxstats", str(cram)], capture_output=True, check=True, text=True).stdout
    return {
        name: int(mapped) + int(unmapped) for name, _, mapped, unmapped in (x.split("\t") for x in lines.splitlines())
    }


@pytest.mark.parametrize("slice_reads", [None, 300])
def test_the_container_headers_hold_samtools_own_counts(tmp_path: Path, slice_reads: int | None) -> None:
    """The records each reference holds, by the containers (one reference each, or several
    together), are what samtools idxstats counts by reading every record."""
    bam = tricky_bam(tmp_path, reads=3000, unplaced=70, seed=7)
    cram = write_cram(bam, tmp_path / "x.cram", reference=None, slice_reads=slice_reads)
    names = header_names(cram)
    found = read_totals(cram, cram.with_name("x.cram.crai"), len(names))
    assert found is not None
    counted = _idxstats(cram)
    label = [*names, "*"]  # -1 (the unplaced) is the last
    assert {label[ref]: n for ref, n in found.single.items()} == {
        label[ref]: counted[label[ref]] for ref in found.single
    }
    for refs, total in found.components:
        assert total == sum(counted[label[ref]] for ref in refs) > 0
    covered = set(found.single) | {ref for refs, _ in found.components for ref in refs}
    assert {label[ref] for ref in covered} == {name for name, n in counted.items() if n}


def test_a_reference_counted_alone_that_shares_containers_is_set_against_idxstats(
    crams: dict[str, tuple[Path, Path | None]],
) -> None:
    """chrM's records are known only with the references its containers share: counted alone,
    it is set against samtools' own count of its records instead."""
    cram, reference = crams["no_ref"]
    found = read_totals(cram, cram.with_name(cram.name + ".crai"), len(header_names(cram)))
    assert found is not None and found.component_of(header_names(cram).index("chrM")) is not None
    result = count_bam_sync(CountRequest(bam=cram, regions=("chrM", "chr1")))
    assert [r.count for r in result.regions] == [
        samtools_count(cram, "chrM", reference=reference),
        samtools_count(cram, "chr1", reference=reference),
    ]
    assert result.verification == "records"
    alone = count_bam_sync(CountRequest(bam=cram, regions=("chr1",)))  # no component asked for
    assert alone.total == samtools_count(cram, "chr1", reference=reference)
    assert alone.verification == "containers"


def test_a_damaged_container_header_is_an_error(crams: dict[str, tuple[Path, Path | None]], tmp_path: Path) -> None:
    cram, _ = crams["no_ref"]
    data = bytearray(cram.read_bytes())
    first = min(offset for _, offset in crai_entries(cram.with_name(cram.name + ".crai")))  # a data container
    data[first + 5] ^= 0x01  # in its header: past the length, in the reference id or start
    damaged = tmp_path / "damaged.cram"
    damaged.write_bytes(bytes(data))
    shutil.copy(cram.with_name(cram.name + ".crai"), tmp_path / "damaged.cram.crai")
    with pytest.raises(CorruptBam, match="fails its CRC32 check"):
        read_totals(damaged, tmp_path / "damaged.cram.crai", len(header_names(cram)))
    with pytest.raises(BamcountdError):
        count_bam_sync(CountRequest(bam=damaged))


def test_another_crams_index_points_at_no_container(tmp_path: Path) -> None:
    one = write_cram(tricky_bam(tmp_path, reads=2000, seed=3, name="one.bam"), tmp_path / "one.cram", reference=None)
    two = write_cram(tricky_bam(tmp_path, reads=2600, seed=4, name="two.bam"), tmp_path / "two.cram", reference=None)
    os.utime(tmp_path / "two.cram.crai")
    with pytest.raises(IndexMismatch, match="where the CRAM has no container"):
        count_bam_sync(CountRequest(bam=one, index=tmp_path / "two.cram.crai"))
    assert count_bam_sync(CountRequest(bam=two)).total == samtools_count(two)


# --- whole references read as their own runs of containers ---------------------------------


@pytest.mark.parametrize("verify", ["auto", "full"])
@pytest.mark.parametrize("case", ["F904_q20", "f2", "G900"])
def test_filtered_default_rows_read_references_as_their_own_containers(
    crams: dict[str, tuple[Path, Path | None]], tmp_path: Path, verify: str, case: str
) -> None:
    """A filtered count's whole references whose records fill containers of their own are read
    as those containers, through no index: all their records are there, so even a first
    filtered count (an empty cache: no earlier proof) accounts for none of them.  ``--verify
    full`` still does: passed and left out, piped the same way, must make the headers' total."""
    cram, reference = crams["reference"]
    args, filters = FILTER_CASES[case]
    names = [*header_names(cram), "*"]
    found = read_totals(cram, cram.with_name(cram.name + ".crai"), len(names) - 1)
    assert found is not None
    own = {"*" if ref < 0 else "{" + names[ref] + "}" for ref in found.own_runs}
    assert "{chr1}" in own and len(own) >= 3
    assert not own & {"{" + names[ref] + "}" for refs, _ in found.components for ref in refs}
    logs.configure(level="debug", json=True)
    try:
        with capture_logs() as events:
            # References of over 500 reads are a shard each (smaller ones are tallied in groups).
            request = CountRequest(
                bam=cram, filters=filters, verify=verify, index_cache=tmp_path / "cache", min_shard_reads=5000
            )
            result = count_bam_sync(request)
    finally:
        logs.configure(level="warning", json=False)
    assert {r.region: r.count for r in result.regions} == oracle(cram, names, args, reference=reference)
    assert result.total == samtools_count(cram, *args, reference=reference)
    assert result.verification == "containers"
    counted = {e["region"] for e in events if e["event"] == "count_piped"}
    tallied = {e["region"] for e in events if e["event"] == "tally_piped"}
    alone = {"{chr1}", "{chr2}"}
    assert alone <= own
    if verify == "auto":
        assert alone <= counted <= own and not alone & tallied
    else:
        assert not counted and alone <= tallied
    # Asked for by name, a reference is a region query, as samtools' own.
    with capture_logs() as events:
        named = count_bam_sync(CountRequest(bam=cram, filters=filters, regions=("chr1",)))
    assert named.total == samtools_count(cram, *args, "chr1", reference=reference)
    assert not [e for e in events if e["event"] == "count_piped"]


@pytest.mark.parametrize("case", ["none", "F904_q20"])
def test_a_reference_whose_container_starts_at_position_0_is_queried(tmp_path: Path, case: str) -> None:
    """A container that starts at position 0 may hold a record that names its reference but
    has no position, which no region query returns: that reference is queried, so that the
    count sees the difference, counts the default rows from one pass, and says so."""
    references = [Reference("chr1", 50_000), Reference("chr2", 30_000)]
    plain = write_bam(tmp_path / "plain.bam", references, random_records(references, 400, read_length=50, seed=8))
    header, raw = bam_records(plain)
    first_on_chr2 = next(i for i, r in enumerate(raw) if int.from_bytes(r[4:8], "little", signed=True) == 1)
    raw.insert(first_on_chr2, bam_record("z0", flag=4, tid=1, pos=-1, bin_=4680))
    cram = write_cram(write_raw_bam(tmp_path / "posless.bam", header, raw), tmp_path / "posless.cram", reference=None)
    found = read_totals(cram, cram.with_name("posless.cram.crai"), 2)
    assert found is not None and set(found.own_runs) == {0}
    args, filters = FILTER_CASES[case]
    logs.configure(level="debug", json=True)
    try:
        with capture_logs() as events:  # chr1 and chr2 a shard each
            request = CountRequest(bam=cram, filters=filters, index_cache=tmp_path / "cache", min_shard_reads=1000)
            result = count_bam_sync(request)
    finally:
        logs.configure(level="warning", json=False)
    assert {e["region"] for e in events if e["event"] == "count_piped"} == {"{chr1}"}
    rows = {r.region: r.count for r in result.regions}
    assert rows["chr1"] == samtools_count(cram, *args, "chr1")
    assert result.total == samtools_count(cram, *args) == sum(rows.values())
    unmapped_pass = not filters.active  # the record is unmapped: -F 0x904 leaves it out
    assert rows["chr2"] == samtools_count(cram, *args, "chr2") + unmapped_pass
    assert list(result.notes) == [
        "1 record of chr2 without a position (POS 0), which no region query returns: the rows come from one pass "
        "over the whole file, which counts such records under their reference"
    ]


def test_a_piped_file_that_ends_before_its_ranges_is_an_error(
    crams: dict[str, tuple[Path, Path | None]], tmp_path: Path
) -> None:
    cram, _ = crams["no_ref"]
    short = tmp_path / "short.cram"
    short.write_bytes(cram.read_bytes()[:5000])
    piped = st.ByteRanges(short, ((0, cram.stat().st_size),), EOF_CONTAINER)
    with pytest.raises(CorruptBam, match=f"{short}: the file ends at byte 5000, before byte"):
        anyio.run(lambda: st.run([st.find(None), "view", "--no-PG", "-c", "-"], timeout=60, piped=piped))


def test_only_a_reference_in_one_run_of_its_own_containers_is_piped() -> None:
    """Containers in file order (first byte, end, reference): 3's are not consecutive, 4 shares
    multi-reference containers (not in ``single``), 5 has one that starts at position 0."""
    spans = [(10, 20, 0), (20, 30, 0), (30, 40, 3), (40, 50, 1), (50, 60, 3), (60, 70, 5), (70, 80, -1)]
    single = {0: 2, 1: 1, 3: 2, 5: 1, -1: 1}
    assert cramfile._own_runs(spans, single, unpositioned={5}) == {0: (10, 30), 1: (40, 50), -1: (70, 80)}


@pytest.mark.parametrize("damage", ["another reference", "a line missing"])
def test_an_index_that_misfiles_or_lacks_a_container_is_an_error(
    crams: dict[str, tuple[Path, Path | None]], tmp_path: Path, damage: str
) -> None:
    """The default rows of a local CRAM 3 read most references through no index at all, so the
    CRAI is set against the containers before anything is counted: one of its lines under
    another reference, or one missing, and the count is an error, not a number."""
    cram, _ = crams["no_ref"]
    copy = Path(shutil.copy(cram, tmp_path / "x.cram"))
    lines = gzip.decompress(cram.with_name(cram.name + ".crai").read_bytes()).decode().splitlines()
    first_chr2 = next(i for i, line in enumerate(lines) if line.split("\t")[0] == "1")
    if damage == "another reference":
        lines[first_chr2] = "0" + lines[first_chr2][1:]
        expected = "under reference number 0, but it holds reference number 1's records"
    else:
        del lines[first_chr2]
        expected = "the index lacks the CRAM's container at byte"
    (tmp_path / "x.cram.crai").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(IndexMismatch, match=expected):
        count_bam_sync(CountRequest(bam=copy, filters=Filters(exclude_flags=0x904), index_cache=tmp_path / "c"))
    assert main(["count", str(copy)]) == 1
