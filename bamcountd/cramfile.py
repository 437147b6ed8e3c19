"""How many records a local CRAM 3 file says each reference holds, from its container headers.

Every CRAM container starts with a header that names its reference (or -1: unplaced reads; -2:
several references) and its number of records, protected by a CRC32.  Walking the headers
(seeking over the data between them) reads a few hundred bytes per container, and tells the
records per reference that the encoder wrote: what a BAI's per-reference totals are to a BAM,
and not taken from the index.  The references of a multi-reference container are found in the
CRAI (one entry per reference of each slice); their records are known only together, so such
references form components whose sum is what can be checked.  Every container the CRAI points
at must be a container of this file: a CRAI of another file fails here.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from bamcountd.errors import CorruptBam, IndexMismatch

UNPLACED_ID = -1
#: The container that ends every CRAM 3 file (its length, reference -1, "EOF", no blocks).
EOF_CONTAINER = bytes.fromhex("0f000000ffffffff0fe0454f4600000000010005bdd94f0001000606010001000100ee63014b")
#: The container that ends a CRAM 2.1 file (no CRC32 yet).
EOF_CONTAINER_2 = bytes.fromhex("0b000000ffffffff0fe0454f460000000001000001000606010001000100")
_MULTI_ID = -2
_FILE_DEFINITION = 26  # "CRAM", major, minor, a 20-byte file id
_HEADER_READ = 4096  # a container header is far smaller, landmarks included
_LONG_HEADER_READ = 1 << 20


@dataclass(frozen=True)
class CramTotals:
    """Records per reference id (header order; -1 for the unplaced) where one reference holds
    them, and for each component of references that share multi-reference containers, its
    references and their records together."""

    single: dict[int, int]
    components: tuple[tuple[frozenset[int], int], ...]
    #: Where the SAM header's container ends, and each container with records, in file order:
    #: its first byte, the byte after it, the references it holds (by the CRAI for several).
    header_end: int = 0
    containers: tuple[Container, ...] = ()
    #: The references (-1 for the unplaced) whose records fill a run of containers of their own,
    #: by its bytes ``[first, end)``: see :func:`_own_runs`.
    own_runs: dict[int, tuple[int, int]] = field(default_factory=dict)

    def component_of(self, ref_id: int) -> frozenset[int] | None:
        return next((refs for refs, _ in self.components if ref_id in refs), None)

    def run(self, refs: frozenset[int]) -> ContainerRun | None:
        """See :func:`container_run`."""
        return container_run(self.containers, refs)


#: A container with records: its first byte, the byte after it, the references it holds.
Container = tuple[int, int, frozenset[int]]


class ContainerRun(NamedTuple):
    """The bytes ``[first, end)`` of a run of containers, and the references it holds records
    of besides those it was found for (the unplaced as -1)."""

    first: int
    end: int
    others: frozenset[int]


def container_run(containers: Sequence[Container], refs: frozenset[int]) -> ContainerRun | None:
    """The ``containers`` (in file order) from the first that holds records of ``refs`` to the
    last that does; None when none does, or when they are out of order."""
    held = [(first, end) for first, end, inner in containers if inner & refs]
    if not held or held[-1][1] <= held[0][0]:
        return None
    first, end = held[0][0], held[-1][1]
    others = frozenset(ref for start, _, inner in containers if first <= start < end for ref in inner - refs)
    return ContainerRun(first, end, others)


def _itf8(data: bytes, at: int) -> tuple[int, int]:
    first = data[at]
    if first < 0x80:
        value, size = first, 1
    elif first < 0xC0:
        value, size = ((first & 0x3F) << 8) | data[at + 1], 2
    elif first < 0xE0:
        value, size = ((first & 0x1F) << 16) | (data[at + 1] << 8) | data[at + 2], 3
    elif first < 0xF0:
        value, size = ((first & 0x0F) << 24) | (data[at + 1] << 16) | (data[at + 2] << 8) | data[at + 3], 4
    else:
        value = ((first & 0x0F) << 28) | (data[at + 1] << 20) | (data[at + 2] << 12) | (data[at + 3] << 4)
        value, size = value | (data[at + 4] & 0x0F), 5
    if value >= 1 << 31:
        value -= 1 << 32
    return value, at + size


def _skip_ltf8(data: bytes, at: int) -> int:
    first = data[at]
    ones = 0
    while ones < 8 and first & (0x80 >> ones):
        ones += 1
    return at + ones + 1


class _Header(NamedTuple):
    ref_id: int
    start: int  # the smallest position of its records (1-based; 0 if one has none)
    records: int
    size: int  # bytes of the header
    length: int  # bytes of the data


def _container(data: bytes, name: str, offset: int) -> _Header:
    """The header of the container at ``offset``."""
    try:
        (length,) = struct.unpack_from("<i", data, 0)
        ref_id, at = _itf8(data, 4)
        start, at = _itf8(data, at)
        _, at = _itf8(data, at)  # span
        records, at = _itf8(data, at)
        at = _skip_ltf8(data, at)  # record counter
        at = _skip_ltf8(data, at)  # bases
        _, at = _itf8(data, at)  # blocks
        landmarks, at = _itf8(data, at)
        for _ in range(landmarks):
            _, at = _itf8(data, at)
        (crc,) = struct.unpack_from("<I", data, at)
    except (IndexError, struct.error):
        raise CorruptBam(f"{name}: the CRAM container at byte {offset} is cut short") from None
    if zlib.crc32(data[:at]) != crc or length < 0:
        raise CorruptBam(f"{name}: the CRAM container header at byte {offset} fails its CRC32 check")
    return _Header(ref_id, start, records, at + 4, length)


def crai_rows(crai: Path) -> list[tuple[int, int, int, int]]:
    """(reference id, alignment start, span, container offset) of each entry of a CRAI
    (gzip-compressed text), in file order.  A count asks several times (its totals, the
    references samtools may misread): the file is parsed once while it stays the same.

    :raises IndexMismatch: not a CRAI
    """
    try:
        found = crai.stat()
        return list(_parsed_crai(crai, found.st_ino, found.st_size, found.st_mtime_ns))
    except OSError:
        raise IndexMismatch(f"{crai}: not a CRAI index (gzip-compressed text, six columns a line)") from None


@lru_cache(maxsize=2)
def _parsed_crai(crai: Path, *_identity: int) -> tuple[tuple[int, int, int, int], ...]:
    try:
        text = gzip.decompress(crai.read_bytes()).decode("ascii")
        rows = [line.split("\t") for line in text.splitlines() if line]
        return tuple((int(row[0]), int(row[1]), int(row[2]), int(row[3])) for row in rows)
    except (OSError, EOFError, ValueError, IndexError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError):
        raise IndexMismatch(f"{crai}: not a CRAI index (gzip-compressed text, six columns a line)") from None


def crai_entries(crai: Path) -> list[tuple[int, int]]:
    """(reference id, container offset) of each entry of a CRAI.

    :raises IndexMismatch: not a CRAI
    """
    return [(ref_id, offset) for ref_id, _, _, offset in crai_rows(crai)]


def crai_containers(crai: Path, *, data_end: int) -> list[Container]:
    """The data containers by the CRAI alone (for a CRAM whose container headers were not
    read: at a URL), in file order: each ends where the next one the CRAI names starts, the last
    at ``data_end`` (where the EOF container starts); the first starts where the header ends.

    :raises IndexMismatch: not a CRAI
    """
    inside: dict[int, set[int]] = {}
    for ref_id, _, _, offset in crai_rows(crai):
        inside.setdefault(offset, set()).add(ref_id)
    offsets = sorted(inside)
    ends = [*offsets[1:], data_end]
    return [(offset, end, frozenset(inside[offset])) for offset, end in zip(offsets, ends, strict=True)]


def ending_container(head: bytes, tail: bytes) -> bytes | None:
    """The EOF container a CRAM ends with, from its first and last bytes: a CRAM 3's, or a CRAM
    2.1's; None for any other file (a CRAM 2.0 has none) or one cut short."""
    for version, container in ((b"\x03", EOF_CONTAINER), (b"\x02\x01", EOF_CONTAINER_2)):
        if head[:4] == b"CRAM" and head[4 : 4 + len(version)] == version and tail.endswith(container):
            return container
    return None


def cram2_containers(cram: Path, crai: Path) -> list[Container] | None:
    """A local CRAM 2.1's data containers by its CRAI (:func:`crai_containers`; its container
    headers carry no CRC32, so :func:`read_totals` does not walk them), the last ending where
    its EOF container starts; None for any other file, or one that does not end in that
    container.

    :raises IndexMismatch: ``crai`` is not a CRAI
    """
    with open(cram, "rb") as handle:
        head = handle.read(_FILE_DEFINITION)
        size = handle.seek(0, 2)
        handle.seek(max(size - len(EOF_CONTAINER_2), 0))
        tail = handle.read()
    if size < _FILE_DEFINITION + len(EOF_CONTAINER_2) or ending_container(head, tail) != EOF_CONTAINER_2:
        return None
    return crai_containers(crai, data_end=size - len(EOF_CONTAINER_2))


class Unsafe(NamedTuple):
    """References (header numbers) that htslib before 1.18 may misread with its multi-region
    iterator: by nested CRAI entries, and by sharing a container."""

    nested: frozenset[int]
    shared: frozenset[int]

    @property
    def all(self) -> frozenset[int]:
        return self.nested | self.shared


def multi_region_unsafe(crai: Path) -> Unsafe:
    """The references that htslib before 1.18 may misread with its multi-region iterator
    (``view -M``): those with a CRAI entry whose span lies within an earlier entry's (a slice
    inside another: a long read that outreaches the slices after it), and those that share a
    container with another reference (small contigs in multi-reference containers).

    Such entries load as a nested list, or as several entries at one offset, and that
    iterator then takes wrong ends from them: it stops short of records or reads some twice,
    with exit status 0 (htslib fda1e03 and f4a3b99, in 1.18; samtools issue 1819).  Each
    entry is checked against every earlier one of its reference, not only those htslib would
    nest it in: a reference is never missed, at worst one more is read another way.

    :raises IndexMismatch: not a CRAI
    """
    reach: dict[int, int] = {}  # the furthest end of the entries so far, per reference
    at_offset: dict[int, set[int]] = {}
    nested: set[int] = set()
    for ref_id, start, span, offset in crai_rows(crai):
        if ref_id < 0:  # unplaced reads are never queried by position
            continue
        at_offset.setdefault(offset, set()).add(ref_id)
        end = start + span - 1
        if ref_id in reach and end <= reach[ref_id]:
            nested.add(ref_id)
        reach[ref_id] = max(end, reach.get(ref_id, end))
    shared = {ref_id for refs in at_offset.values() if len(refs) > 1 for ref_id in refs}
    return Unsafe(frozenset(nested), frozenset(shared))


def read_totals(cram: Path, crai: Path, references: int) -> CramTotals | None:
    """The records per reference of ``cram`` (CRAM 3; None for CRAM 2, whose headers carry no
    CRC), checked against the containers its CRAI points at.

    :raises CorruptBam: a container header is cut short or fails its CRC32
    :raises IndexMismatch: the CRAI points at bytes that are no container of this file, lacks
        one of its containers, or files one under another reference
    """
    name = str(cram)
    entries = crai_entries(crai)
    single: dict[int, int] = {}
    multi: dict[int, int] = {}  # offset -> records of each multi-reference container
    starts: set[int] = set()
    spans: list[tuple[int, int, int]] = []  # each container with records: offset, end, reference id
    unpositioned: set[int] = set()  # references with a container that starts at position 0
    header_end = 0
    with open(cram, "rb") as handle:
        definition = handle.read(_FILE_DEFINITION)
        if len(definition) < _FILE_DEFINITION or definition[:4] != b"CRAM":
            raise CorruptBam(f"{name}: not a CRAM file")
        if definition[4] != 3:
            return None
        offset, first = _FILE_DEFINITION, True
        while True:
            handle.seek(offset)
            data = handle.read(_HEADER_READ)
            if not data:
                break
            try:
                ref_id, start, records, header, length = _container(data, name, offset)
            except CorruptBam:
                if len(data) < _HEADER_READ:
                    raise
                handle.seek(offset)  # a header with many landmarks (slices): read it whole
                ref_id, start, records, header, length = _container(handle.read(_LONG_HEADER_READ), name, offset)
            if first:
                header_end = offset + header + length
            elif records:  # the first container holds the SAM header
                starts.add(offset)
                spans.append((offset, offset + header + length, ref_id))
                if start < 1 and ref_id >= 0:
                    unpositioned.add(ref_id)
                if ref_id == _MULTI_ID:
                    multi[offset] = records
                elif ref_id >= UNPLACED_ID and ref_id < references:
                    single[ref_id] = single.get(ref_id, 0) + records
                else:
                    raise CorruptBam(f"{name}: the CRAM container at byte {offset} names reference {ref_id}")
            first = False
            offset += header + length
    components = _components(crai, entries, starts, multi, single)  # takes its references out of single
    inside: dict[int, set[int]] = {}  # the references the CRAI files under each container
    for ref_id, offset in entries:
        inside.setdefault(offset, set()).add(ref_id)
    _check_indexed(crai, inside, spans)
    containers = tuple(
        (offset, end, frozenset(inside.get(offset, ())) if ref_id == _MULTI_ID else frozenset((ref_id,)))
        for offset, end, ref_id in spans
    )
    own = _own_runs(spans, single, unpositioned)
    return CramTotals(single, components, header_end, containers, own)


def _check_indexed(crai: Path, inside: dict[int, set[int]], spans: Sequence[tuple[int, int, int]]) -> None:
    """Every container with records is in the CRAI (``inside``: the references it files under
    each container's offset), a single reference's under that reference: else the CRAI is
    another file's, or older than this one's data.

    :raises IndexMismatch: a container is missing from the CRAI, or filed under another reference
    """
    for offset, _, ref_id in spans:
        refs = inside.get(offset)
        if refs is None:
            raise IndexMismatch(f"{crai}: the index lacks the CRAM's container at byte {offset}")
        if ref_id != _MULTI_ID and refs != {ref_id}:
            listed = ", ".join(map(str, sorted(refs)))
            raise IndexMismatch(
                f"{crai}: the index files the CRAM's container at byte {offset} under reference number {listed}, "
                f"but it holds reference number {ref_id}'s records"
            )


def _own_runs(
    spans: Sequence[tuple[int, int, int]], single: dict[int, int], unpositioned: set[int]
) -> dict[int, tuple[int, int]]:
    """The references whose records fill consecutive containers of their own (in ``spans``,
    file order): read as that run, a stream of exactly their records, with no index.  Not a
    reference with a container that starts at position 0: it may hold a record with no
    position, which no region query returns, and the count must say so (count._Job._recover)."""
    seen: dict[int, list[int]] = {}  # reference: first span, last span, spans
    for number, (_, _, ref_id) in enumerate(spans):
        if ref_id in single:
            where = seen.setdefault(ref_id, [number, number, 0])
            where[1], where[2] = number, where[2] + 1
    return {
        ref_id: (spans[first][0], spans[last][1])
        for ref_id, (first, last, count) in seen.items()
        if count == last - first + 1 and ref_id not in unpositioned
    }


def _components(
    crai: Path, entries: list[tuple[int, int]], starts: set[int], multi: dict[int, int], single: dict[int, int]
) -> tuple[tuple[frozenset[int], int], ...]:
    inside: dict[int, set[int]] = {}
    for ref_id, offset in entries:
        if offset not in starts:
            raise IndexMismatch(f"{crai}: the index points at byte {offset}, where the CRAM has no container")
        if offset in multi:
            inside.setdefault(offset, set()).add(ref_id)
    if set(inside) != set(multi):
        raise IndexMismatch(f"{crai}: the index lacks containers of the CRAM that hold several references")
    # Union the references that share a container; a component's records are its containers'.
    parent: dict[int, int] = {}

    def root(ref_id: int) -> int:
        while parent.setdefault(ref_id, ref_id) != ref_id:
            parent[ref_id] = ref_id = parent[parent[ref_id]]  # halving the path: GRCh38 has thousands
        return ref_id

    for refs in inside.values():
        first, *rest = sorted(refs)
        root(first)  # a multi-reference container may hold one reference (or only unplaced reads)
        for other in rest:
            parent[root(other)] = root(first)
    members: dict[int, set[int]] = {}
    for ref_id in parent:
        members.setdefault(root(ref_id), set()).add(ref_id)
    records: dict[int, int] = {}  # of each component's multi-reference containers, by its root
    for offset, inner in inside.items():
        key = root(next(iter(inner)))
        records[key] = records.get(key, 0) + multi[offset]
    components = []
    for key, refs in members.items():
        total = records.get(key, 0) + sum(single.pop(ref_id, 0) for ref_id in refs)
        components.append((frozenset(refs), total))
    return tuple(sorted(components, key=lambda item: min(item[0])))
