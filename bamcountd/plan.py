"""Regions and shards: what to count, and how to cut the work into samtools commands.

A *region* is what the user gets a count for: a whole reference, a range of one, or ``*``
(the unplaced unmapped reads).  A *shard* is one samtools command.  Shards are summed back
into their regions, so the output never shows how the work was cut.

Exactness rules for cutting one region into pieces ``[a_k, b_k]``: every piece counts the reads
overlapping it, as samtools does, and each piece after the first also gets a *correction*
shard, ``samtools view -c -e 'pos < a_k' REF:a_k-a_k``, that is subtracted.  A read that
overlaps piece k but starts before ``a_k`` covers position ``a_k``; those are exactly the reads
the correction counts (with the same filters), so each read is counted once: in the piece where
it starts, or in the first piece if it starts before the region.  The pieces themselves run
without ``-e``, whose per-record evaluation costs about a fifth more CPU; the corrections read
only the reads over one position.
"""

from __future__ import annotations

import math
import operator
import os
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, filterfalse, islice, repeat
from pathlib import Path
from typing import NamedTuple, cast, overload

from bamcountd.errors import AmbiguousRegion, BadRegionsFile, BamNotFound, UnknownRegion
from bamcountd.options import DEFAULT_MIN_SHARD_READS
from bamcountd.samtools import Header, IndexStat

UNPLACED = "*"
#: htslib's region ``.``: every record of the file, in file order, unplaced reads included.
WHOLE_FILE = "."

_DIGITS = re.compile(r"\A[0-9]+\Z")
_RANGE = re.compile(r"\A([0-9][0-9,]*)?(?:(-)([0-9][0-9,]*)?)?\Z")


class Region(NamedTuple):
    """One row of the output (a named tuple: a BED file makes hundreds of thousands)."""

    label: str
    reference: str | None  # None for ``*`` and for ``.``
    start: int | None = None  # 1-based, inclusive
    end: int | None = None  # 1-based, inclusive; None runs to the end of the reference
    name: str | None = None  # a BED line's 4th column: the row's name in the output

    @property
    def whole(self) -> bool:
        return self.start is None and self.end is None

    @property
    def everything(self) -> bool:
        """``.``: the whole file, read in file order rather than by region queries."""
        return self.reference is None and self.label == WHOLE_FILE

    def samtools_arg(self, start: int | None = None, end: int | None = None) -> str:
        """The region as samtools must see it: names in braces so ':' is never misread."""
        if self.reference is None:
            return UNPLACED
        start = self.start if start is None else start
        end = self.end if end is None else end
        if start is None and end is None:
            return _quoted(self.reference)
        return f"{_quoted(self.reference, ranged=True)}:{start or 1}-{'' if end is None else end}"


#: A BED row's label, 1-based as samtools' regions (``%`` formats it faster than ``str.format``),
#: of :meth:`RegionTable.label_columns`.
BED_LABEL = "%s:%d-%d"


class RegionTable(Sequence[Region]):
    """A BED file's regions held as columns: a :class:`Region` (and its label) is made only
    when one is asked for, so 200,000 rows cost no object each while they are planned and
    counted.  It compares equal to any sequence of the same regions."""

    __slots__ = ("ends", "names", "references", "starts")

    def __init__(
        self, references: list[str], starts: list[int], ends: list[int], names: list[str | None] | None
    ) -> None:
        self.references = references
        self.starts = starts  # 0-based, as the BED's (a Region's are 1-based)
        self.ends = ends
        self.names = names  # None: the file has no 4th column

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> Region: ...

    @overload
    def __getitem__(self, index: slice) -> list[Region]: ...

    def __getitem__(self, index: int | slice) -> Region | list[Region]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        reference, start, end = self.references[index], self.starts[index] + 1, self.ends[index]
        name = None if self.names is None else self.names[index]
        return Region(BED_LABEL % (reference, start, end), reference, start, end, name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]

    def labels(self) -> list[str]:
        """Every region's label, as :meth:`__getitem__` makes it, at once."""
        return list(map(BED_LABEL.__mod__, zip(*self.label_columns(), strict=True)))

    def label_columns(self) -> tuple[list[str], Iterable[int], list[int]]:
        """What :data:`BED_LABEL` spells each row's label with: references, 1-based starts, ends."""
        return self.references, map((1).__add__, self.starts), self.ends


def region_columns(
    regions: Sequence[Region],
) -> tuple[Sequence[str | None], Sequence[int | None], Sequence[int | None]]:
    """The regions' references, starts (0-based, as a BED's) and ends, as columns (a
    :class:`RegionTable` has them)."""
    if isinstance(regions, RegionTable):
        return regions.references, regions.starts, regions.ends
    starts = [None if start is None else start - 1 for start in map(_START, regions)]
    return list(map(_REFERENCE, regions)), starts, list(map(_END, regions))


def reference_arg(name: str) -> str:
    """A whole reference as samtools must see it (see Region.samtools_arg)."""
    return _quoted(name)


def _quoted(name: str, *, ranged: bool = False) -> str:
    """htslib's spelling of a reference: ``{name}``, which it never misreads, where it can.

    A name with ``}`` still works in braces on its own (``{{w}}`` is ``{w}``) but not with a
    range, and bare only if it also has a ``:`` (``x}:y``) and does not end like a range.
    """
    if "}" not in name:
        return "{" + name + "}"
    if ranged:
        raise UnknownRegion(
            f"reference {name!r} contains '}}', so samtools cannot address a range of it; count it whole"
        )
    if ":" not in name:
        return "{" + name + "}"
    if _RANGE.match(name.rpartition(":")[2]):
        raise UnknownRegion(f"reference {name!r} contains '}}' and ends like a range, which samtools cannot address")
    return name


def addressable_range(name: str) -> bool:
    """Whether samtools can address a range of this reference (not so for some names with ``}``)."""
    try:
        _quoted(name, ranged=True)
    except UnknownRegion:
        return False
    return True


#: The label of a reference named ``.``: a bare ``.`` is htslib's (and bamcountd's) whole file.
_DOT_LABEL = "{" + WHOLE_FILE + "}"


def default_regions(header: Header) -> list[Region]:
    """Every @SQ reference in header order, then ``*``: their sum is the whole file.  A reference
    named ``.`` is labelled ``{.}``: a bare ``.`` is htslib's (and bamcountd's) whole file."""
    rows = [Region(_DOT_LABEL if ref.name == WHOLE_FILE else ref.name, ref.name) for ref in header.references]
    return [*rows, Region(UNPLACED, None)]


def default_region(label: str) -> Region:
    """The region of :func:`default_regions` with this label (``*``, ``{.}`` or a reference's name);
    its :meth:`Region.samtools_arg` is the one quoting rule for handing it on to samtools or to
    another count (:func:`parse_region` reads it back as the same region)."""
    if label == UNPLACED:
        return Region(UNPLACED, None)
    return Region(label, WHOLE_FILE if label == _DOT_LABEL else label)


def parse_region(text: str, lengths: Mapping[str, int]) -> Region:
    """Parse samtools' ``NAME[:START[-END]]`` (or ``{NAME}[:...]``) against the header."""
    if text == UNPLACED:
        return Region(UNPLACED, None)
    if text == WHOLE_FILE:  # as in samtools, even when a reference is named "." ({.} is that one)
        return Region(WHOLE_FILE, None)
    if text.startswith("{"):
        return _braced(text, lengths)
    candidates: list[Region] = []
    if text in lengths:
        candidates.append(Region(text, text))
    name, colon, rest = text.rpartition(":")
    if colon and name in lengths and _RANGE.match(rest) and rest:
        candidates.append(_ranged(text, name, rest, lengths))
    if len(candidates) > 1:
        raise AmbiguousRegion(
            f"region {text!r} is ambiguous: it is a reference name and also {name!r} with a range; "
            f"write {{{text}}} for the reference or {{{name}}}:{rest} for the range"
        )
    if not candidates:
        raise UnknownRegion(f"region {text!r}: no reference of that name in the BAM header{_known(lengths)}")
    return candidates[0]


def _braced(text: str, lengths: Mapping[str, int]) -> Region:
    """``{NAME}`` or ``{NAME}:RANGE``, where NAME may hold ``}`` itself: every closing brace
    after a name of the header is tried, and the one reading that parses is taken (with
    references ``a`` and ``a}b``, ``{a}b}`` is ``a}b``, as samtools reads it)."""
    readings: list[Region] = []
    failure: UnknownRegion | None = None
    close = text.find("}")
    while close != -1:
        name, rest = text[1:close], text[close + 1 :]
        if name in lengths and not rest:
            readings.append(Region(text, name))
        elif name in lengths and rest.startswith(":"):
            try:
                readings.append(_ranged(text, name, rest[1:], lengths))
            except UnknownRegion as error:
                failure = failure or error
        elif name in lengths:
            failure = failure or UnknownRegion(f"region {text!r}: expected ':' after '}}'")
        close = text.find("}", close + 1)
    if len(readings) > 1:
        names = " and ".join(repr(region.reference) for region in readings)
        raise AmbiguousRegion(f"region {text!r} is ambiguous: it reads as a region of {names}")
    if readings:
        return readings[0]
    if failure is not None:
        raise failure
    raise UnknownRegion(f"region {text!r}: no reference of that name in the BAM header{_known(lengths)}")


def _ranged(text: str, name: str, spec: str, lengths: Mapping[str, int]) -> Region:
    match = _RANGE.match(spec)
    if match is None or not spec:
        raise UnknownRegion(f"region {text!r}: cannot read the range {spec!r} (expected START-END)")
    first, dash, last = match.groups()
    start = int(first.replace(",", "")) if first else 1
    end = int(last.replace(",", "")) if last else None
    if not dash and first:
        end = None  # samtools: "chr:START" runs to the end of the reference
    return _checked_range(text, name, start, end, lengths[name])


def _checked_range(label: str, name: str, start: int, end: int | None, length: int) -> Region:
    if start < 1:
        raise UnknownRegion(f"region {label!r}: positions start at 1")
    if end is not None and end < start:
        raise UnknownRegion(f"region {label!r}: end is before start")
    if start > length:
        raise UnknownRegion(f"region {label!r}: starts past the end of {name} (length {length})")
    return Region(label, name, start, end)


def _known(lengths: Mapping[str, int]) -> str:
    names = list(lengths)
    shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    return f" (it has {len(names)}: {shown})" if names else " (it has no @SQ lines)"


def read_bed(path: Path, lengths: Mapping[str, int]) -> Sequence[Region]:
    """Regions from a BED file (0-based, half-open; plain or gzip/BGZF-compressed), labelled
    1-based like samtools regions, in the file's order (duplicates too).  Columns after the
    third are ignored but the 4th, the row's name.  ``#``, ``track`` and ``browser`` lines are
    headers unless they are an interval on a reference of the BAM (a contig may be called
    ``track``); blank lines are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BamNotFound(f"{path}: regions file not found") from None
    except OSError as error:
        raise BamNotFound(f"{path}: cannot read regions file ({error.strerror})") from None
    if data[:2] == b"\x1f\x8b":
        data = _gunzipped(path, data)
    binary = _BINARY.search(data) if data.translate(None, _TEXT_BYTES) else None
    if binary is not None:
        number = data.count(b"\n", 0, binary.start()) + 1
        raise BadRegionsFile(f"{path}:{number}: not a text BED file (binary data; compressed other than with gzip?)")
    text = os.fsdecode(data)
    fast = _fast_bed(text, lengths)
    if fast is not None:
        return fast
    regions: list[Region] = []
    append = regions.append
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        fields = _bed_fields(line)
        if not fields:
            continue
        first, second, third = fields[0], fields[1], fields[2]
        interval = second.isdigit() and third.isdigit() and second.isascii() and third.isascii()
        if _header(line, first, interval, lengths):
            continue
        if not interval:
            raise BadRegionsFile(f"{path}:{number}: expected 'chrom<TAB>start<TAB>end', got {line[:80]!r}")
        start0, end = int(second), int(third)
        length = lengths.get(first)
        if length is None:
            raise BadRegionsFile(f"{path}:{number}: reference {first!r} is not in the BAM header{_known(lengths)}")
        if end <= start0:
            raise BadRegionsFile(f"{path}:{number}: end {end} is not after start {start0}")
        if start0 >= length:
            raise BadRegionsFile(
                f"{path}:{number}: region {first}:{start0 + 1}-{end}: starts past the end of {first} (length {length})"
            )
        name = fields[3] if len(fields) > 3 and fields[3] else None
        append(Region(BED_LABEL % (first, start0 + 1, end), first, start0 + 1, end, name))
    if not regions:
        raise BadRegionsFile(f"{path}: no regions in the file")
    return regions


def _bed_fields(line: str) -> list[str]:
    """A BED line's fields (at least 3, padded with empty ones), or none for a blank line."""
    if "\t" not in line:
        fields = line.split()
    elif " " in line:
        fields = [field.strip() for field in line.split("\t")]
    else:
        fields = line.split("\t")
    if len(fields) < 3:
        if not fields or not fields[0]:
            return []
        fields += ["", ""]
    return fields


def _header(line: str, first: str, interval: bool, lengths: Mapping[str, int]) -> bool:
    """A ``#``, ``track`` or ``browser`` line, unless it is an interval on a reference of the BAM."""
    return (line.startswith("#") or first in ("track", "browser")) and not (interval and first in lengths)


def _fast_bed(text: str, lengths: Mapping[str, int]) -> RegionTable | None:
    """The regions of a BED file whose lines after its header lines are all tab-separated with
    the same number of columns, no spaces, every interval valid, without a Python step per
    line; None for any other file, which the line-by-line reader then reads (and names the
    line at fault)."""
    body = text if text.endswith("\n") or not text else text + "\n"
    header = 0
    while header < len(body):
        cut = body.index("\n", header)
        line = body[header:cut].removesuffix("\r")
        fields = _bed_fields(line)
        if fields:
            interval = fields[1].isdigit() and fields[2].isdigit() and fields[1].isascii() and fields[2].isascii()
            if not _header(line, fields[0], interval, lengths):
                break
        header = cut + 1
    rows = body[header:]
    if not rows or "\r" in rows or " " in rows:
        return None  # no rows, CRLF or spaces: line by line
    width = rows.count("\t", 0, rows.index("\n")) + 1  # the first row's
    if width < 3:
        return None
    # A newline before each row, and a tab before each newline: a newline then only ever opens
    # a field, and the rows of ``width`` fields are the lines exactly when every row's first
    # field opens with one (blank lines and lines of other widths shift some off).
    fields = ("\n" + rows[:-1]).replace("\n", "\t\n").split("\t")
    del fields[0]  # before the first tab
    lines = rows.count("\n")
    firsts = fields[0::width]
    if len(fields) != width * lines or "".join(firsts).count("\n") != lines:
        return None
    known = {"\n" + name: name for name in lengths}
    references = list(map(known.get, firsts))
    first, last = fields[1::width], fields[2::width]
    if None in references:
        return None
    try:
        starts = list(map(int, first))
        ends = list(map(int, last))
    except ValueError:
        return None
    # int() also takes signs, "_" and other digits than ASCII's: the columns joined must hold
    # ASCII digits alone (an empty field failed int() already), checked as bytes in one step.
    joined = "".join(first) + "".join(last)
    if not (joined.isascii() and joined.encode().isdigit()):
        return None
    if not all(map(operator.lt, starts, ends)) or not all(
        map(operator.lt, starts, map(lengths.__getitem__, cast(list[str], references)))
    ):
        return None
    named = [name or None for name in fields[3::width]] if width > 3 else None
    return RegionTable(cast(list[str], references), starts, ends, named)


# Control bytes other than tab and carriage return: no BED line has them.
_BINARY = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Every byte but those (what deleting them leaves is the binary ones: faster than the search).
_TEXT_BYTES = bytes(byte for byte in range(256) if not _BINARY.match(bytes((byte,))))


def _gunzipped(path: Path, data: bytes) -> bytes:
    import gzip
    import zlib

    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise BadRegionsFile(f"{path}: cannot decompress the gzip file ({error})") from None


def resolve_regions(header: Header, texts: Sequence[str], bed: Path | None) -> Sequence[Region]:
    """The user's regions in the order given, or every reference plus ``*``."""
    if not texts and bed is None:
        return default_regions(header)
    lengths = {ref.name: ref.length for ref in header.references}
    if not texts and bed is not None:
        return read_bed(bed, lengths)
    regions = [parse_region(text, lengths) for text in texts]
    if bed is not None:
        regions += read_bed(bed, lengths)
    return regions


# --- shards -------------------------------------------------------------------------------


#: How a shard's samtools output becomes counts.
COUNT = "count"  # ``view -c``: one number for one region (times ``sign``)
ACCOUNT = "account"  # a filtered COUNT that also counts the records the filters leave out
#                      (``view -u -U`` into two readers), so that passed + failed can be set
#                      against the index: proof that the query reached every record
TALLY = "tally"  # records passing the filters and not, per reference (small references, filtered):
#                  together they must equal the index's counts
SUM = "sum"  # ``view -c`` over several whole references: must equal the index's sum for them,
#              and each reference then gets the index's own count (small references, unfiltered)
SWEEP = "sweep"  # many ranges at once: ``view -u [filters] -M`` of the stretches that hold them,
#                  each read credited to every range it overlaps (bamcountd.overlaps)


@dataclass(frozen=True)
class Shard:
    """One samtools command and the regions its result feeds."""

    regions: tuple[int, ...]  # indices into the region list
    args: tuple[str, ...]  # samtools region arguments; none: the whole file
    expression: str | None = None  # ``view -e`` filter, for boundary corrections
    kind: str = COUNT
    sign: int = 1  # -1 for a boundary correction, whose count is subtracted
    weight: float = 0.0  # expected records, from the index
    stretches: tuple[tuple[str, int, int], ...] = ()  # a sweep's: (reference, start0, end) to read

    @property
    def bed(self) -> bool:
        """Whole references handed over as a BED file to the multi-region iterator (``-M -L``),
        which reads each stretch of the file once; ``{name}`` quoting does not apply there."""
        return self.kind in (TALLY, SUM)

    @property
    def cost(self) -> float:
        """The work it is expected to take, in records: a tally's weighed up (TALLY_COST)."""
        return self.weight * TALLY_COST if self.kind == TALLY else self.weight

    @property
    def label(self) -> str:
        shown = " ".join(self.args[:3]) or "(whole file)"
        return shown + (f" (+{len(self.args) - 3} more)" if len(self.args) > 3 else "")


#: A tally's time per record against a count's: ``view -u`` encodes each record for the readers
#: to decode (measured on CRAM and BAM, README).  Shards start, and subjobs are filled, by cost.
TALLY_COST = 1.5

#: From this many ranges on they are swept (see SWEEP), else counted one command each: where
#: benchmarks/bench_regions.py --parts switch finds the sweep as fast (README).
SWEEP_FROM = 16


@dataclass(frozen=True, kw_only=True)
class ShardPolicy:
    """How finely to cut: ``pieces`` shards per concurrent process, none smaller than ``min_reads``."""

    slots: int  # samtools processes that run at once
    pieces_per_slot: int = 3
    # Each sweep's reader pays numpy's import (about what samtools takes for a few hundred
    # thousand records): one sweep per process, of equal expected reads, started together.
    sweep_pieces_per_slot: int = 1
    min_reads: int = DEFAULT_MIN_SHARD_READS  # below this a split costs more in start-up than it saves
    split: bool = True  # cut large references into start-position shards (needs ``view -e``)
    group: bool = True  # count small references together instead of one process each
    filtered: bool = False  # filters make a group's per-reference counts need a tally
    account: bool = False  # whole references' shards are ACCOUNT shards (see there)
    small_reads: int = 20_000  # references with fewer expected records are grouped
    group_reads: int = 400_000  # at most this many expected records per group
    sweep_from: int = SWEEP_FROM
    #: Regions (by number) whose records the index does not tell alone: a group holding one is
    #: tallied per reference, never summed (a SUM shard takes the split from the index).
    tally: frozenset[int] = frozenset()


def region_weights(
    regions: Sequence[Region],
    stats: Mapping[str, IndexStat],
    lengths: Mapping[str, int],
    *,
    skip: Collection[int] = (),
) -> list[float]:
    """Expected records per region, from the index (uniform density within a reference); 0 for
    the regions in ``skip`` (the swept ones, which :func:`plan_shards` weighs by stretch)."""
    weights = [0.0] * len(regions)
    for index in _others(len(regions), skip):
        region = regions[index]
        if region.reference is None:
            weights[index] = float(stats[UNPLACED].unmapped) if UNPLACED in stats else 0.0
            continue
        stat = stats.get(region.reference)
        reads = float(stat.reads) if stat else 0.0
        length = max(lengths.get(region.reference, 1), 1)
        start = region.start or 1
        end = min(region.end or length, length)
        weights[index] = reads * max(end - start + 1, 1) / length
    return weights


def plan_shards(
    regions: Sequence[Region],
    weights: Sequence[float],
    lengths: Mapping[str, int],
    policy: ShardPolicy,
    *,
    index_empty: bool = False,
    densities: Mapping[str, float] | None = None,
    swept: Sequence[int] | None = None,
) -> list[Shard]:
    """Cut regions into shards of similar size, costliest first.

    ``index_empty``: the index holds no reads at all, so ``*`` cannot be looked up in it.
    ``densities``: expected records per base of each reference, for sweeps.
    ``swept``: :func:`swept_regions` of these, if known already.
    """
    densities = densities if densities is not None else {}
    swept = swept if swept is not None else swept_regions(regions, policy)
    rest = _others(len(regions), swept)
    total = sum(weights[i] for i in rest)
    target = max(total / max(policy.slots * policy.pieces_per_slot, 1), float(policy.min_reads))
    shards: list[Shard] = _sweeps(regions, swept, lengths, densities, policy) if swept else []
    small: list[int] = []
    uses = Counter(region_columns(regions)[0]) if rest else Counter[str | None]()  # (a BED's rows: all swept)
    for index in rest:
        region, weight = regions[index], weights[index]
        kind = ACCOUNT if policy.account and region.whole else COUNT
        if region.everything or (region.reference is None and index_empty):
            # ``.`` is the whole file in file order, which needs no index.  htslib cannot seek
            # to the unplaced reads of a file whose index holds no reads at all ("invalid
            # region"); the whole file is then the same set of reads.
            shards.append(Shard((index,), (), kind=kind, weight=weight))
            continue
        groupable = region.reference is not None and _bed_safe(region.reference) and uses[region.reference] == 1
        if policy.group and region.whole and groupable and weight < policy.small_reads:
            small.append(index)
        elif (
            policy.split
            and region.reference is not None
            and weight > 1.5 * target
            and addressable_range(region.reference)
        ):
            pieces = math.ceil(weight / target)
            shards += _split(index, region, weight, lengths[region.reference], pieces, kind=kind)
        else:
            shards.append(Shard((index,), (region.samtools_arg(),), kind=kind, weight=weight))
    shards += _groups(small, regions, weights, policy, limit=min(float(policy.group_reads), target))
    shards.sort(key=lambda shard: shard.cost, reverse=True)
    return shards


def _split(index: int, region: Region, weight: float, length: int, pieces: int, *, kind: str) -> list[Shard]:
    start = region.start or 1
    end = region.end  # None: to the end of the reference, reads past its length included
    span = (min(end, length) if end is not None else length) - start + 1
    pieces = max(1, min(pieces, span))
    bounds = [start + (span * k) // pieces for k in range(pieces)]
    shards: list[Shard] = []
    for k, low in enumerate(bounds):
        high = bounds[k + 1] - 1 if k + 1 < pieces else end
        shards.append(Shard((index,), (region.samtools_arg(low, high),), kind=kind, weight=weight / pieces))
        if k:
            boundary = region.samtools_arg(low, low)
            shards.append(Shard((index,), (boundary,), expression=f"pos < {low}", kind=kind, sign=-1, weight=0.0))
    return shards


def bed_end(length: int) -> int:
    """The BED end for a whole reference in a group.  samtools places reads past a reference's
    length too, so the end runs one 16 kbp index window beyond the window that holds LN; it
    stays near LN because a far end costs samtools a walk over every bin up to it."""
    return ((length >> 14) + 2) << 14


# SAM's rule for reference names, less what a BED reader would skip or split on.
_SAM_NAME = re.compile(r"\A[0-9A-Za-z!$%&+./:;?@^_|~-][0-9A-Za-z!#$%&*+./:;=?@^_|~-]*\Z")


def _bed_safe(name: str) -> bool:
    # htslib's BED reader takes "." for no reference at all (it returned the unplaced reads).
    return bool(_SAM_NAME.match(name)) and not name.startswith(("track", "browser")) and name != WHOLE_FILE


def _groups(
    small: Iterable[int], regions: Sequence[Region], weights: Sequence[float], policy: ShardPolicy, *, limit: float
) -> list[Shard]:
    """Small references in groups of up to ``limit`` expected records, in header order.  Those
    to tally (policy.tally) fill groups apart from the others, which cost a count, not a tally;
    a CRAM header may alternate between the two thousands of times (GRCh38's alts, decoys and
    HLA contigs), and a group closed at each change would make a process of every few.  A group
    to tally also closes before it would reach over more than a quarter of ``limit`` of other
    regions' records: read as its run of containers (count._Job._containers_of), it would read
    theirs too."""
    groups: list[Shard] = []
    members: dict[bool, list[int]] = {False: [], True: []}
    loads = {False: 0.0, True: 0.0}
    before = list(accumulate(weights, initial=0.0)) if policy.tally else []  # records before each region

    def close(tallied: bool) -> None:
        held, load = members[tallied], loads[tallied]
        if len(held) == 1:
            index = held[0]
            single = ACCOUNT if policy.account else COUNT
            groups.append(Shard((index,), (regions[index].samtools_arg(),), kind=single, weight=load))
        elif held:
            names = tuple(regions[i].reference or "" for i in held)
            kind = TALLY if policy.filtered or tallied else SUM
            groups.append(Shard(tuple(held), names, kind=kind, weight=load))
        members[tallied], loads[tallied] = [], 0.0

    for index in small:
        tallied = index in policy.tally
        held = members[tallied]
        if held and (
            loads[tallied] + weights[index] > limit
            or (tallied and before[index] - before[held[-1] + 1] > limit / 4)  # others' records between
        ):
            close(tallied)
        members[tallied].append(index)
        loads[tallied] += weights[index]
    close(False)
    close(True)
    return groups


# --- sweeps ---------------------------------------------------------------------------------

#: Two stretches of a sweep closer than this many expected reads are read as one: each
#: stretch costs samtools a seek and the first block again, about a block's worth of reads
#: (benchmarks/bench_regions.py --parts switch; README).
SWEEP_GAP_READS = 300
#: At most this many stretches (region arguments) per sweep command.
SWEEP_STRETCHES = 512


def swept_regions(regions: Sequence[Region], policy: ShardPolicy) -> list[int]:
    """The regions that sweeps count, in order: ranges with an end, once there are
    ``sweep_from`` of them (below that, one ``view -c`` each is as fast); none with
    ``--no-split``.  A sweep hands its stretches to samtools as a BED file (its multi-region
    iterator reads no ``{name}``), so a range on a reference that a BED cannot name is counted
    on its own."""
    if not (policy.split and policy.group):
        return []
    references, starts, ends = region_columns(regions)
    safe = {name for name in set(references) if name is not None and _bed_safe(name)}
    if isinstance(regions, RegionTable) and len(safe) == len(set(references)):
        ranges = list(range(len(regions)))  # a BED's rows: every one a range, on a name a BED holds
    else:
        nones = repeat(None)
        bounded = map(operator.and_, map(operator.is_not, starts, nones), map(operator.is_not, ends, nones))
        ranges = list(compress(range(len(regions)), map(operator.and_, map(safe.__contains__, references), bounded)))
    return ranges if len(ranges) >= policy.sweep_from else []


def whole_regions(regions: Sequence[Region]) -> list[int]:
    """The numbers of the regions that are whole references (or ``*``, or the whole file)."""
    if isinstance(regions, RegionTable):
        return []  # a BED's rows are ranges
    nones = repeat(None)
    _, starts, ends = region_columns(regions)
    unbounded = map(operator.and_, map(operator.is_, starts, nones), map(operator.is_, ends, nones))
    return list(compress(range(len(regions)), unbounded))


def _others(count: int, taken: Collection[int]) -> Iterable[int]:
    """The indices below ``count`` that are not in ``taken``, in order."""
    if not taken:
        return range(count)
    if len(taken) >= count:  # (indices below ``count``, each once: all of them)
        return []
    members = taken if isinstance(taken, set | frozenset) else set(taken)
    return list(filterfalse(members.__contains__, range(count)))


_REFERENCE, _START, _END = operator.itemgetter(1), operator.itemgetter(2), operator.itemgetter(3)


def densities(stats: Mapping[str, IndexStat], lengths: Mapping[str, int]) -> dict[str, float]:
    """Expected records per base of each reference, from the index."""
    return {name: (stats[name].reads if name in stats else 0) / max(length, 1) for name, length in lengths.items()}


class _Stretch(NamedTuple):
    """Ranges of one reference read as one stretch: ``order[first:last]`` (by start), ``[low, high)``."""

    name: str
    low: int  # 0-based
    high: int
    first: int
    last: int


def _stretches(
    regions: Sequence[Region], swept: Sequence[int], lengths: Mapping[str, int], densities: Mapping[str, float]
) -> tuple[list[int], list[int], list[int], list[_Stretch]]:
    """The swept ranges in reference (header) order and by start, their 0-based starts and ends
    in that order, and the stretches that hold them: ranges joined while the gap between them
    is worth fewer than SWEEP_GAP_READS expected reads."""
    header = {name: k for k, name in enumerate(lengths)}
    columns = region_columns(regions)
    # Swept regions are ranges on named references: no None among their columns.
    references, all_starts, all_ends = cast(tuple[Sequence[str], Sequence[int], Sequence[int]], columns)
    ranks = list(map(header.get, references, repeat(len(header))))
    if len(swept) == len(ranks) and _in_order(ranks, all_starts):
        # Every region, in order already (a sorted BED): what the sorts would give.
        order, starts, ends, in_order = list(swept), list(all_starts), list(all_ends), ranks
    else:
        order = sorted(swept, key=all_starts.__getitem__)
        order.sort(key=ranks.__getitem__)  # stable: by reference, then start
        starts = list(map(all_starts.__getitem__, order))
        ends = list(map(all_ends.__getitem__, order))
        in_order = list(map(ranks.__getitem__, order))
    stretches: list[_Stretch] = []
    first = 0
    while first < len(order):
        name = references[order[first]] or ""
        last = bisect_right(in_order, in_order[first], first)  # this reference's ranges end
        density = densities.get(name, 0.0)
        gap = SWEEP_GAP_READS / density if density > 0 else float("inf")
        # The highest end so far at each range (it holds across stretches: a stretch starts
        # past every end before it); a stretch ends where the next start is more than a gap on.
        base = first
        high = list(accumulate(ends[base:last], max))
        gaps = map(operator.sub, starts[base + 1 : last], high)
        for cut in [*compress(range(base + 1, last), map(operator.gt, gaps, repeat(gap))), last]:
            stretches.append(_Stretch(name, starts[first], high[cut - 1 - base], first, cut))
            first = cut
    return order, starts, ends, stretches


def _in_order(ranks: list[int], starts: Sequence[int]) -> bool:
    """Whether the rows are by reference rank, then start: a start below the one before it
    only where the rank goes up, and no rank below the one before it."""
    after = islice(ranks, 1, None)
    if not all(map(operator.le, ranks, after)):
        return False
    rising = map(operator.le, starts, islice(starts, 1, None))
    return all(map(operator.or_, rising, map(operator.lt, ranks, islice(ranks, 1, None))))


def _sweeps(
    regions: Sequence[Region],
    swept: Sequence[int],
    lengths: Mapping[str, int],
    densities: Mapping[str, float],
    policy: ShardPolicy,
) -> list[Shard]:
    """Sweep shards: per reference in header order, the ranges by start, joined into stretches
    (see _stretches), the stretches put into shards of similar expected reads.  A shard credits
    each read only to its own ranges, so a read that reaches into two shards' stretches is
    counted once for each range it overlaps, whichever shard holds the range."""
    order, starts, ends, stretches = _stretches(regions, swept, lengths, densities)
    weight = [densities.get(stretch.name, 0.0) * (stretch.high - stretch.low) for stretch in stretches]
    total = sum(weight)
    # Shards of equal expected reads, none below min_reads: each ends where the running sum
    # reaches its share, cutting a stretch between its ranges, and the last takes what is
    # left (a greedy fill left a sliver over, one more reader's start for a few reads).
    pieces = max(1, min(policy.slots * policy.sweep_pieces_per_slot, int(total // max(policy.min_reads, 1))))
    target = total / pieces
    shards: list[Shard] = []
    members: list[int] = []  # positions in ``order``: always one run, from the last shard's end on
    args: list[tuple[str, int, int]] = []
    load = assigned = 0.0  # this shard's expected reads; those of the shards before it
    passed = 0  # shares filled

    def close() -> None:
        nonlocal members, args, load, assigned
        if members:
            shown = tuple(_stretch(*stretch) for stretch in args)
            chosen = tuple(order[members[0] : members[-1] + 1])
            shards.append(Shard(chosen, shown, kind=SWEEP, weight=load, stretches=tuple(args)))
        assigned += load
        members, args, load = [], [], 0.0

    def full(extra: float) -> bool:
        """Whether ``extra`` more reads take this shard past its share (the last has no end)."""
        return passed < pieces - 1 and assigned + load + extra > target * (passed + 1)

    for stretch, heavy in zip(stretches, weight, strict=True):
        if members and len(args) >= SWEEP_STRETCHES:
            close()
        if not full(heavy):
            members += range(stretch.first, stretch.last)
            args.append((stretch.name, stretch.low, stretch.high))
            load += heavy
            continue
        # The stretch is cut between its ranges where the share is reached: each piece's
        # stretch then starts at its first range, and the pieces' stretches may overlap.
        density = densities.get(stretch.name, 0.0)
        low = high = -1
        for k in range(stretch.first, stretch.last):
            start, end = starts[k], ends[k]
            if low >= 0 and full(density * (max(end, high) - low)):
                args.append((stretch.name, low, high))
                load += density * (high - low)
                close()
                passed += 1
                low = -1
            if low < 0:
                low, high = start, end
            elif end > high:
                high = end
            members.append(k)
        args.append((stretch.name, low, high))
        load += density * (high - low)
    close()
    return shards


def _stretch(name: str, start0: int, end: int) -> str:
    return f"{_quoted(name, ranged=True)}:{start0 + 1}-{end}"
