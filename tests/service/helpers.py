"""What the service tests drop into the watch folder, and what they check its results with
(the daemon harness is :mod:`tests.support.daemon`)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tests.support.bams import header_names, oracle, samtools_count
from tests.support.daemon import Folders


def drop_by_rename(source: Path, target: Path) -> Path:
    """Copy under a partial name, then rename into place (what a careful uploader does)."""
    partial = target.with_name(target.name + ".part")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


def drop_slowly(source: Path, target: Path, *, chunks: int = 6, pause: float = 0.25) -> Path:
    """Copy in chunks with pauses (a slow upload straight to the final name)."""
    data = source.read_bytes()
    step = max(1, len(data) // chunks + 1)
    with open(target, "wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start : start + step])
            out.flush()
            time.sleep(pause)
    return target


def result_path(folders: Folders, relative: str) -> Path:
    return folders.results / (relative[: -len(".bam")] + ".counts.json")


def results(folders: Folders) -> list[Path]:
    return sorted(path for path in folders.results.rglob("*") if path.is_file())


@functools.cache
def _oracle_cached(template: Path, size: int, mtime_ns: int) -> dict[str, int]:
    return oracle(template, [*header_names(template), "*"])


def expected_counts(template: Path) -> dict[str, int]:
    """samtools' own counts for the daemon's default regions (every reference, then '*') of an
    indexed template BAM."""
    stat = template.stat()
    return _oracle_cached(template, stat.st_size, stat.st_mtime_ns)


def assert_result_matches(result_file: Path, bam: Path, template: Path) -> dict[str, Any]:
    """The result of ``bam`` (a byte-for-byte copy of ``template``) has samtools' counts."""
    assert bam.read_bytes() == template.read_bytes(), f"{bam} is not a copy of {template}"
    document: dict[str, Any] = json.loads(result_file.read_text())
    expected = expected_counts(template)
    assert {r["region"]: r["count"] for r in document["regions"]} == expected
    assert document["total"] == samtools_count(template) == sum(expected.values())
    return document
