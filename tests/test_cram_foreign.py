"""CRAMs that neither bamcountd nor this samtools wrote: htslib's and samtools' own test files,
written by cramtools (Java), crumble, scramble and older samtools (tests/data/foreign/README.md
says which is which).  Each count, with the issue's four filter sets, equals samtools' count
decoding the whole CRAM; the truncated one is an error."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bamcountd import CountRequest, Filters, count_bam_sync
from bamcountd.errors import CorruptBam
from tests.support.bams import SAMTOOLS, header_names, oracle, samtools_count

FOREIGN = Path(__file__).parent / "data" / "foreign"

#: Each CRAM and the reference samtools needs to decode it whole (None: it needs none).
_CRAMS = {
    "auxf#values_java.cram": "auxf.fa",  # cramtools 3.0: every kind of aux tag
    "xx#large_aux_java.cram": "xx.fa",  # cramtools 3.0: large aux tags
    "cram21.cram": "mpileup.ref.fa",  # CRAM 2.1, a reference path (UR) from another machine
    "cram30.cram": "mpileup.ref.fa",  # CRAM 3.0, written long before samtools 1.16
    "chk2.cram": None,  # CRAM 3.1 by crumble, without a reference
    "test_input_1_a.cram": None,  # CRAM 3.0, four references, the bases in the file
}

_FILTERS = (
    ((), Filters()),
    (("-F", "0x904", "-q", "20"), Filters(exclude_flags=0x904, min_mapq=20)),
    (("-f", "2"), Filters(require_flags=2)),
    (("-G", "0x900"), Filters(exclude_all_flags=0x900)),
)


@pytest.fixture(autouse=True)
def _no_reference_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REF_PATH", str(tmp_path / "no-such-folder" / "%s"))


@pytest.mark.parametrize("name", _CRAMS)
def test_crams_written_elsewhere_count_as_samtools(name: str, tmp_path: Path) -> None:
    """bamcountd builds the CRAI (none comes with these) and never needs the reference;
    samtools, given it, decodes every field."""
    counted, checked = tmp_path / "counted", tmp_path / "checked"
    counted.mkdir()
    checked.mkdir()
    cram = Path(shutil.copy(FOREIGN / name, counted))
    copy = Path(shutil.copy(FOREIGN / name, checked))
    wanted = _CRAMS[name]  # copied too: samtools writes its .fai beside it
    reference = None if wanted is None else Path(shutil.copy(FOREIGN / wanted, checked))
    subprocess.run([SAMTOOLS, "index", str(copy)], check=True)  # the oracle's own index, apart
    names = [*header_names(copy), "*"]
    for args, filters in _FILTERS:
        result = count_bam_sync(CountRequest(bam=cram, filters=filters, verify="full"))
        assert {r.region: r.count for r in result.regions} == oracle(copy, names, args, reference=reference)
        assert result.total == samtools_count(copy, *args, reference=reference)
    assert not any(counted.glob("*.crai"))  # built into the private cache, not beside the CRAM
    assert count_bam_sync(CountRequest(bam=cram)).total > 0


def test_a_cram_cut_short_by_another_writer_is_an_error(tmp_path: Path) -> None:
    """scramble's CRAM 3.0 without its EOF container: an error naming the file, no count."""
    cram = Path(shutil.copy(FOREIGN / "scramble30.truncated.cram", tmp_path))
    with pytest.raises(CorruptBam, match=r"scramble30\.truncated\.cram.*truncated"):
        count_bam_sync(CountRequest(bam=cram))
