from __future__ import annotations

from pathlib import Path

from bamcountd import CountRequest, count_bam_sync
from tests.support.bams import header_names, oracle, samtools_count


def test_default_regions_match_samtools(shared_bam: Path) -> None:
    result = count_bam_sync(CountRequest(bam=shared_bam))
    names = [*header_names(shared_bam), "*"]
    assert [r.region for r in result.regions] == names
    assert {r.region: r.count for r in result.regions} == oracle(shared_bam, names)
    assert result.total == samtools_count(shared_bam)
