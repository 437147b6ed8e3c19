"""Output formats, and atomic file writes (a reader never sees half a result)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bamcountd.count import CountResult, RegionCounts
from bamcountd.errors import CohortRowsDiffer
from bamcountd.plan import BED_LABEL

FORMATS = ("table", "tsv", "json", "seed")


def format_table(result: CountResult) -> str:
    rows = [(r.row, str(r.count)) for r in result.regions] + [("total", str(result.total))]
    name_width = max(len("region"), *(len(name) for name, _ in rows))
    count_width = max(len("count"), *(len(count) for _, count in rows))
    lines = [f"{'region':<{name_width}}  {'count':>{count_width}}"]
    lines += [f"{name:<{name_width}}  {count:>{count_width}}" for name, count in rows[:-1]]
    lines.append("-" * (name_width + 2 + count_width))
    lines.append(f"{rows[-1][0]:<{name_width}}  {rows[-1][1]:>{count_width}}")
    return "\n".join(lines) + "\n"


def format_tsv(result: CountResult) -> str:
    lines = _bed_tsv_rows(result.regions) if isinstance(result.regions, RegionCounts) else None
    if lines is None:
        lines = [f"{region if name is None else name}\t{count}" for region, count, name in result.regions]
    lines.append(f"total\t{result.total}")
    return "\n".join(lines) + "\n"


#: A TSV row of a BED interval without a name: its label, then its count.
_LABELLED_COUNT = BED_LABEL + "\t%d"


def _bed_tsv_rows(regions: RegionCounts) -> list[str] | None:
    """A plain BED's TSV rows from its columns, a format each (no RegionCount made); None for
    a BED whose rows are named only some of them."""
    table, counts = regions.table, regions.counts
    if table.names is None:
        return list(map(_LABELLED_COUNT.__mod__, zip(*table.label_columns(), counts, strict=True)))
    if None not in table.names:
        return list(map("%s\t%d".__mod__, zip(table.names, counts, strict=True)))
    return None


def json_text(document: object) -> str:
    """JSON that is valid UTF-8 for any reference name.  Names are the header's bytes; a byte
    that is not UTF-8 is written as the escape ``\\udcXX`` (Python's surrogateescape), which
    ``json.loads`` and then ``.encode("utf-8", "surrogateescape")`` turn back into that byte."""
    import json  # here: its decoder's regexes are 4-6 ms of a start that prints TSV

    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")


def format_json(result: CountResult) -> str:
    return json_text(result.as_dict())


def format_seed(result: CountResult) -> str:
    """The seed applet's count_file, byte for byte: no newline after the total."""
    lines = [f"Region {r.row}: {r.count}\n" for r in result.regions]
    return "".join(lines) + f"Total reads: {result.total}"


_FORMATTERS: dict[str, Callable[[CountResult], str]] = {
    "table": format_table,
    "tsv": format_tsv,
    "json": format_json,
    "seed": format_seed,
}


def render(result: CountResult, fmt: str) -> str:
    return _FORMATTERS[fmt](result)


# --- many BAMs: a matrix, a row per region and a column per sample ---------------------------

#: The formats of a many-BAM count (the seed applet's is one BAM's).
COHORT_FORMATS = ("table", "tsv", "json")


def sample_names(results: Sequence[CountResult]) -> list[str]:
    """Each result's column name (:attr:`CountResult.sample`), made unique in input order: a
    name seen before gets ``_2``, ``_3``, … (the first free one)."""
    names: list[str] = []
    taken = {result.sample for result in results}
    seen: set[str] = set()
    for result in results:
        name = result.sample
        if name in seen:
            k = 2
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
            taken.add(name)
        seen.add(name)
        names.append(name)
    return names


def check_same_rows(results: Sequence[CountResult]) -> None:
    """:raises CohortRowsDiffer: the BAMs' rows differ (their headers do), so no matrix holds them"""
    first = results[0]
    for result in results[1:]:
        if [r.region for r in result.regions] != [r.region for r in first.regions]:
            raise CohortRowsDiffer(
                f"{result.bam}: its rows differ from those of {first.bam} (their headers name other references); "
                "give the same -r/--regions-file for all, or ask for --format json"
            )


def _matrix(results: Sequence[CountResult]) -> list[list[str]]:
    rows = [["region", *sample_names(results)]]
    rows += [[r.row, *(str(result.regions[k].count) for result in results)] for k, r in enumerate(results[0].regions)]
    rows.append(["total", *(str(result.total) for result in results)])
    return rows


def render_cohort(results: Sequence[CountResult], fmt: str) -> str:
    """Many BAMs' counts: ``tsv`` a matrix (a header line ``region`` and the sample names, a row
    per region, then ``total``), ``table`` the same aligned, ``json`` a list of the per-BAM
    results, each with its ``sample``.

    :raises CohortRowsDiffer: a matrix of BAMs whose rows differ
    """
    if fmt == "json":
        documents = [
            {"sample": name, **result.as_dict()} for name, result in zip(sample_names(results), results, strict=True)
        ]
        return json_text(documents)
    check_same_rows(results)
    rows = _matrix(results)
    if fmt == "tsv":
        return "".join("\t".join(row) + "\n" for row in rows)
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(
            [f"{row[0]:<{widths[0]}}", *(f"{cell:>{w}}" for cell, w in zip(row[1:], widths[1:], strict=True))]
        )

    body = [line(row) for row in rows]
    return "\n".join([*body[:-1], "-" * len(body[0]), body[-1]]) + "\n"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path = Path(path)
    folder = path.parent
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
