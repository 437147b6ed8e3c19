"""A count in parts (plan_count, count_part, gather_counts) against a single count_bam and samtools."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from bamcountd.count import (
    CountPlan,
    CountRequest,
    ShardCounts,
    count_bam_sync,
    count_part_sync,
    gather_counts,
    plan_count_sync,
)
from bamcountd.errors import IndexMismatch, PartsIncomplete
from bamcountd.options import CountOptions, Filters
from bamcountd.synth import tricky_bam
from tests.support.bams import FILTER_CASES, header_names, oracle, samtools_count, write_cram


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tricky_bam(tmp_path_factory.mktemp("parts"), reads=30000, seed=5, name="parts.bam")


def _in_parts(request: CountRequest, parts: int, *, seed: int = 0) -> tuple[CountPlan, list[ShardCounts]]:
    planned = plan_count_sync(request, slots=4)
    assert planned is not None
    planned = CountPlan.from_json(json.loads(json.dumps(planned.as_json())))  # as a subjob gets it
    numbers = list(range(len(planned.shards)))
    random.Random(seed).shuffle(numbers)
    counted: list[ShardCounts] = []
    for k in range(parts):
        counted += count_part_sync(request, planned, numbers[k::parts])
    return planned, counted


def _gathered(planned: CountPlan, counted: list[ShardCounts], filters: Filters) -> dict[str, int]:
    result = gather_counts(planned, counted, filters=filters, jobs=1, threads=1, seconds=0.0)
    assert result is not None
    assert result.method == "view" and result.verification in ("index", "records", "containers")
    return {row.region: row.count for row in result.regions}


@pytest.mark.parametrize("case", ["none", "F904_q20"])
@pytest.mark.parametrize("kind", ["bam", "cram"])
def test_parts_gathered_are_the_single_count(big: Path, tmp_path: Path, case: str, kind: str) -> None:
    words, filters = FILTER_CASES[case]
    data = big if kind == "bam" else write_cram(big, tmp_path / "parts.cram", reference=None)
    request = CountRequest.of(data, CountOptions(filters=filters, min_shard_reads=2000))
    planned, counted = _in_parts(request, 3)
    # One large reference (chr1, most of the reads) is cut into several shards.
    assert sum(1 for shard in planned.shards if shard.regions == (0,)) > 2
    gathered = _gathered(planned, counted, filters)
    single = count_bam_sync(request)
    assert gathered == {row.region: row.count for row in single.regions}
    assert gathered == oracle(data, [*header_names(data), "*"], words)
    assert sum(gathered.values()) == samtools_count(data, *words)


def test_every_shard_exactly_once(big: Path) -> None:
    request = CountRequest.of(big, CountOptions(min_shard_reads=2000))
    planned, counted = _in_parts(request, 2)
    with pytest.raises(PartsIncomplete, match="were not counted"):
        gather_counts(planned, counted[1:], filters=Filters(), jobs=1, threads=1, seconds=0.0)
    with pytest.raises(PartsIncomplete, match="counted twice"):
        gather_counts(planned, [*counted, counted[0]], filters=Filters(), jobs=1, threads=1, seconds=0.0)
    with pytest.raises(PartsIncomplete, match="each once"):
        count_part_sync(request, planned, [0, 0])


def test_parts_that_disagree_with_the_index_are_not_a_count(big: Path) -> None:
    request = CountRequest.of(big, CountOptions(min_shard_reads=2000))
    planned, counted = _in_parts(request, 2)
    wrong = [
        part._replace(reached=tuple((n or 0) + 1 for n in part.reached)) if part.shard == 0 else part
        for part in counted
    ]
    assert gather_counts(planned, wrong, filters=Filters(), jobs=1, threads=1, seconds=0.0) is None


def test_a_part_of_another_file_is_an_error(big: Path, tmp_path: Path) -> None:
    request = CountRequest.of(big, CountOptions(min_shard_reads=2000))
    planned = plan_count_sync(request)
    assert planned is not None
    other = tricky_bam(tmp_path, reads=100, seed=9, name="other.bam")
    with pytest.raises(IndexMismatch, match="not the one its count was planned with"):
        count_part_sync(CountRequest.of(other, CountOptions()), replace(planned, references=(("chrX", 1),)), [0])
