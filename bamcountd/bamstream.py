"""Records per reference in an uncompressed BAM stream (``samtools view -u``), in any order.

samtools has no counter for that: ``idxstats -`` reads a stream only if it is sorted by
position ("file is not position sorted"), and unsorted, queryname-sorted or oddly written
files are exactly what needs a pass over the whole file.  samtools decodes and filters;
this only walks the records' ``block_size`` chain and reads each one's reference id.
"""

from __future__ import annotations

import functools
import gc
import os
import struct
import sys
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import starmap
from typing import Any, BinaryIO, NamedTuple

from bamcountd.errors import SamtoolsBadOutput

_BLOCK_HEADER = struct.Struct("<4sIBBHBBHH")  # magic, MTIME, XFL, OS, XLEN=6, SI1, SI2, SLEN=2, BSIZE
_RECORD_HEAD = struct.Struct("<iii")  # block_size, refID, pos
#: Read-ahead for the pipe from samtools (open it with this buffer size).
READ_BUFFER = 1 << 20


class StreamCounts:
    """Records per reference id (-1: unplaced), and the header's reference names."""

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.per_reference: list[int] = []  # index: reference id + 1
        # Records that name a reference but have no position (SAM's POS 0): no region query
        # returns them, though an index counts them under their reference.
        self.positionless: dict[bytes, int] = {}

    def by_name(self) -> dict[bytes, int]:
        """Counts by reference name, ``*`` for the unplaced records; names without records left out."""
        found = {b"*": self.per_reference[0]} if self.per_reference and self.per_reference[0] else {}
        found.update((name, n) for name, n in zip(self.names, self.per_reference[1:], strict=True) if n)
        return found


def count_records(stream: BinaryIO, what: str) -> StreamCounts:
    """Read BGZF-compressed BAM from ``stream`` to its end and count its records per reference.

    :raises SamtoolsBadOutput: the stream is not a whole BAM
    """
    counts = StreamCounts()
    data = _Inflated(stream, what)
    header = data.take(8)
    if header[:4] != b"BAM\x01":
        raise SamtoolsBadOutput(f"{what}: samtools wrote something other than BAM")
    data.take(int.from_bytes(header[4:8], "little"))
    references = int.from_bytes(data.take(4), "little")
    for _ in range(references):
        name_length = int.from_bytes(data.take(4), "little")
        counts.names.append(data.take(name_length + 4)[: name_length - 1])
    tally = [0] * (references + 1)
    positionless = [0] * (references + 1)
    for buffer, start, end in data.chunks():
        position = _walk(buffer, start, end, tally, positionless, what)
        data.keep(buffer, position, end)
    if data.pending:
        raise SamtoolsBadOutput(f"{what}: samtools' output ends inside a record")
    counts.per_reference = tally
    counts.positionless = {name: n for name, n in zip(counts.names, positionless[1:], strict=True) if n}
    return counts


def _walk(buffer: bytes, position: int, end: int, tally: list[int], positionless: list[int], what: str) -> int:
    """Count the whole records in ``buffer[position:end]``; return where the first partial one starts."""
    unpack = _RECORD_HEAD.unpack_from
    references = len(tally) - 1
    while position + 12 <= end:
        size, reference, start = unpack(buffer, position)
        following = position + 4 + size
        if following > end:
            break
        if not -1 <= reference < references:
            raise SamtoolsBadOutput(f"{what}: a record names reference id {reference} of {references}")
        tally[reference + 1] += 1
        if start < 0 <= reference:
            positionless[reference + 1] += 1
        position = following
    return position


class _Inflated:
    """The uncompressed bytes of a BGZF stream, as many blocks at a time as one read brings."""

    def __init__(self, stream: BinaryIO, what: str) -> None:
        self._stream = stream
        self._what = what
        self._blocks = self._inflate()
        self.pending = b""

    def take(self, size: int) -> bytes:
        while len(self.pending) < size:
            pieces = next(self._blocks, None)
            if pieces is None:
                raise SamtoolsBadOutput(f"{self._what}: samtools' output ends inside the BAM header")
            self.pending = b"".join([self.pending, *pieces])
        taken, self.pending = self.pending[:size], self.pending[size:]
        return taken

    def chunks(self) -> Iterator[tuple[bytes, int, int]]:
        """What is left, a read's blocks at a time, joined to the unfinished record before them."""
        for pieces in self._blocks:
            buffer = b"".join([self.pending, *pieces])
            self.pending = b""
            yield buffer, 0, len(buffer)
        if self.pending:  # the header's last block may hold records too
            buffer, self.pending = self.pending, b""
            yield buffer, 0, len(buffer)

    def keep(self, buffer: bytes, start: int, end: int) -> None:
        self.pending = buffer[start:end]

    def _inflate(self) -> Iterator[list[bytes | memoryview]]:
        """Each read's whole blocks, uncompressed.  ``samtools view -u`` writes level 0: a block
        is then one stored deflate block, whose bytes are taken as they are (no zlib call)."""
        what, header, unpack = self._what, _BLOCK_HEADER.size, _BLOCK_HEADER.unpack_from
        data = b""
        while True:
            more = self._stream.read(READ_BUFFER)
            if not more:
                if data:
                    raise SamtoolsBadOutput(f"{what}: samtools' output ends inside a block")
                return
            data = data + more if data else more
            view = memoryview(data)
            pieces: list[bytes | memoryview] = []
            at, end = 0, len(data)
            while at + header <= end:
                fields = unpack(data, at)
                if fields[0] != b"\x1f\x8b\x08\x04" or fields[4:8] != (6, 66, 67, 2) or fields[8] + 1 < header + 10:
                    raise SamtoolsBadOutput(f"{what}: samtools' output is not BGZF")
                following = at + fields[8] + 1
                if following > end:
                    break
                body = view[at + header : following - 8]
                size = int.from_bytes(view[following - 4 : following], "little")
                if body[0] == 1 and len(body) == size + 5 and int.from_bytes(body[1:3], "little") == size:
                    piece: bytes | memoryview = body[5:]
                else:
                    try:
                        piece = zlib.decompress(body, -15)
                    except zlib.error as error:
                        raise SamtoolsBadOutput(f"{what}: samtools' output has a bad block ({error})") from None
                if len(piece) != size:
                    raise SamtoolsBadOutput(f"{what}: samtools' output has a bad block (size {len(piece)}, not {size})")
                if size:
                    pieces.append(piece)
                at = following
            data = data[at:]
            if pieces:
                yield pieces


# --- reads per interval, in one pass ----------------------------------------------------------

_CORE = struct.Struct("<iiiB3xHH")  # block_size, refID, pos, l_read_name, (MAPQ, bin), n_cigar_op, FLAG
_OP = struct.Struct("<I")
#: CIGAR operations that consume the reference (htslib's bam_cigar_type & 2): M, D, N, =, X.
_REFERENCE_OPS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 7) | (1 << 8)
_UNMAPPED = 0x4
_Unpack = Callable[[bytes, int], tuple[Any, ...]]


class _Sweep:
    """One reference's intervals and how far the records have got through them.

    A read covers ``[pos, stop)`` with htslib's ``bam_endpos`` (the reference-consuming CIGAR
    operations, and at least one base: a placed unmapped read or one without CIGAR covers one),
    and overlaps ``[s, e)`` when ``stop > s`` and ``pos < e``, as samtools' region iterator
    decides.  So an interval's count is A(e) - B(s): the reads that start before ``e`` minus
    those that stop at or before ``s`` (all of which start before ``e`` too).  Records come in
    position order, a batch at a time (:meth:`add`): A(e) is known once a batch reaches ``e``
    (a binary search in the batch's positions), B(s) once it reaches ``s`` (one in the sorted
    stops still open).  A stop at or before the next interval start is counted at once, so the
    open stops are those of reads covering that start: memory follows the depth, not the reads.
    """

    __slots__ = (
        "before_end",
        "by_end",
        "by_start",
        "ended",
        "ended_by_start",
        "ends",
        "last",
        "next_end",
        "next_start",
        "next_union",
        "open",
        "records",
        "starts",
        "union",
    )

    def __init__(self, intervals: Sequence[tuple[int, int]]) -> None:
        count = len(intervals)
        self.by_end = sorted(range(count), key=lambda i: intervals[i][1])
        self.by_start = sorted(range(count), key=lambda i: intervals[i][0])
        self.ends = [intervals[i][1] for i in self.by_end]
        self.starts = [intervals[i][0] for i in self.by_start]
        self.before_end = [0] * count  # A(e), in by_end order
        self.ended_by_start = [0] * count  # B(s), in by_start order
        self.next_end = 0  # the first A (and B) not known yet
        self.next_start = 0
        self.records = 0  # reads so far
        self.ended = 0  # of those, the reads that stop at or before the next start
        self.open: list[int] = []  # the others' stops, sorted
        self.last = -1  # the last record's position, to check the order
        # The union of the intervals (touching ones joined) and the next one a read could
        # overlap: a read that overlaps none counts for every A(e) and B(s) to come alike (it
        # stops at or before every start still to come), so it is left out.
        self.union = _union(intervals)
        self.next_union = 0

    def add(self, positions: list[int], stops: list[int]) -> None:
        """Take the next batch of records (positions, in order, and stops)."""
        reached = positions[-1]
        ends, starts, records = self.ends, self.starts, self.records
        first, k = self.next_end, bisect_right(ends, reached, self.next_end)
        if k > first:
            before_end = self.before_end
            for j in range(first, k):
                before_end[j] = records + bisect_left(positions, ends[j])
            self.next_end = k
        self.records = records + len(positions)
        stops.sort()
        open_stops = self.open + stops if self.open else stops
        if self.open:
            open_stops.sort()  # two sorted runs: a merge
        first, k = self.next_start, bisect_right(starts, reached, self.next_start)
        ended = self.ended
        if k > first:
            ended_by_start = self.ended_by_start
            for j in range(first, k):
                ended_by_start[j] = ended + bisect_right(open_stops, starts[j])
            self.next_start = k
        cut = bisect_right(open_stops, starts[k]) if k < len(starts) else len(open_stops)
        self.ended = ended + cut
        self.open = open_stops[cut:]

    def finish(self) -> list[int]:
        """Every interval's count, in the order given (the stream has ended)."""
        for j in range(self.next_end, len(self.ends)):
            self.before_end[j] = self.records
        for j in range(self.next_start, len(self.starts)):
            self.ended_by_start[j] = self.ended + bisect_right(self.open, self.starts[j])
        counts = [0] * len(self.starts)
        for i, found in zip(self.by_end, self.before_end, strict=True):
            counts[i] = found
        for i, ended in zip(self.by_start, self.ended_by_start, strict=True):
            counts[i] -= ended
        return counts


def _union(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of ``[start, end)`` intervals, sorted, touching ones joined; then a sentinel."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [*merged, (_NEVER, _NEVER)]


_NEVER = 1 << 62  # past every position


class OverlapCounts(NamedTuple):
    """Per reference name, each interval's reads (in the order given); the records read."""

    counts: dict[bytes, list[int]]
    records: int


def count_overlaps(stream: BinaryIO, intervals: Mapping[bytes, Sequence[tuple[int, int]]], what: str) -> OverlapCounts:
    """Read BGZF-compressed, coordinate-sorted BAM from ``stream`` (``samtools view -u`` of
    stretches that hold these intervals) and count, per interval, the records that overlap it.

    ``intervals``: ``[start, end)`` (0-based) per reference name.  Every record must be on one
    of those references, each reference's records together and in position order.

    :raises SamtoolsBadOutput: the stream is not a whole BAM, or holds a record it should not
    """
    data = _Inflated(stream, what)
    header = data.take(8)
    if header[:4] != b"BAM\x01":
        raise SamtoolsBadOutput(f"{what}: samtools wrote something other than BAM")
    data.take(int.from_bytes(header[4:8], "little"))
    names: list[bytes] = []
    for _ in range(int.from_bytes(data.take(4), "little")):
        name_length = int.from_bytes(data.take(4), "little")
        names.append(data.take(name_length + 4)[: name_length - 1])
    tids = {name: tid for tid, name in enumerate(names)}
    sweeps: dict[int, _Sweep] = {}
    for name, spans in intervals.items():
        if name not in tids:
            raise SamtoolsBadOutput(f"{what}: the stream's header has no reference {name!r}")
        sweeps[tids[name]] = _Sweep(spans)
    walker = _Walker(sweeps, names, what)
    for buffer, start, end in data.chunks():
        data.keep(buffer, walker.walk(buffer, start, end), end)
    if data.pending:
        raise SamtoolsBadOutput(f"{what}: samtools' output ends inside a record")
    return OverlapCounts({names[tid]: sweep.finish() for tid, sweep in sweeps.items()}, walker.records)


class _Walker:
    """The per-record loop of :func:`count_overlaps`: each record's position and stop, a batch
    per reference and buffer, handed to that reference's sweep."""

    def __init__(self, sweeps: dict[int, _Sweep], names: Sequence[bytes], what: str) -> None:
        self.sweeps = sweeps
        self.names = names
        self.what = what
        self.tid = -2  # no reference yet
        self.done: set[int] = set()
        self.records = 0
        self.guess = 1 << 40  # the read name length of the last record (none yet: no guess)
        self.unpack_guess: _Unpack = _CORE.unpack_from

    def _switch(self, tid: int, position: int) -> _Sweep:
        if tid not in self.sweeps or tid in self.done:
            name = self.names[tid] if 0 <= tid < len(self.names) else tid
            raise SamtoolsBadOutput(f"{self.what}: samtools returned a record on {name!r} at {position + 1}, unasked")
        self.done.add(self.tid)
        self.tid = tid
        return self.sweeps[tid]

    @staticmethod
    def _hand(sweep: _Sweep, positions: list[int], stops: list[int], union: int, last: int) -> None:
        sweep.next_union = union
        if positions:
            sweep.add(positions, stops)
        sweep.last = last

    def walk(self, buffer: bytes, offset: int, end: int) -> int:
        """Sweep the whole records in ``buffer[offset:end]``; return where the first partial one starts."""
        # The hot loop: locals only, literal constants (4: unmapped; 0x18D: _REFERENCE_OPS), and
        # one unpack per record where the read name has the last one's length, which takes the
        # first CIGAR operation too (most reads have one).
        unpack, unpack_op, unpack_ops = _CORE.unpack_from, _OP.unpack_from, struct.unpack_from
        guess, unpack_guess, reach = self.guess, self.unpack_guess, 40 + self.guess
        tid, records = self.tid, 0
        sweep = self.sweeps.get(tid)
        union, u, last = (sweep.union, sweep.next_union, sweep.last) if sweep is not None else ([(0, 0)], 0, -1)
        low, high = union[u]
        positions: list[int] = []
        stops: list[int] = []
        position, stop = positions.append, stops.append
        while True:
            if offset + reach <= end:
                size, record_tid, pos, name_length, n_cigar, flag, op = unpack_guess(buffer, offset)
            elif offset + 24 <= end:
                size, record_tid, pos, name_length, n_cigar, flag = unpack(buffer, offset)
                op = -1
            else:
                break
            following = offset + 4 + size
            if not offset + 36 <= following <= end:
                if following > end:
                    break
                raise SamtoolsBadOutput(f"{self.what}: samtools wrote a record of {size} bytes")
            if record_tid != tid:
                if sweep is not None:
                    self._hand(sweep, positions, stops, u, last)
                sweep = self._switch(record_tid, pos)
                tid, union, u, last = record_tid, sweep.union, 0, -1
                low, high = union[0]
                positions, stops = [], []
                position, stop = positions.append, stops.append
            if pos < last:
                raise SamtoolsBadOutput(f"{self.what}: samtools returned records out of position order")
            last = pos
            if flag & 4 or not n_cigar:
                reached = pos + 1
            elif n_cigar == 1:
                if name_length != guess:
                    guess, reach = name_length, 40 + name_length
                    unpack_guess = _guessed(name_length)
                    op = unpack_op(buffer, offset + 36 + name_length)[0]
                elif op < 0:
                    op = unpack_op(buffer, offset + 36 + name_length)[0]
                reached = pos + ((op >> 4) or 1) if 0x18D >> (op & 15) & 1 else pos + 1
            else:
                ops = unpack_ops(f"<{n_cigar}I", buffer, offset + 36 + name_length)
                reached = pos + (sum(op >> 4 for op in ops if 0x18D >> (op & 15) & 1) or 1)
            offset = following
            records += 1
            while pos >= high:
                u += 1
                low, high = union[u]
            if reached > low:
                position(pos)
                stop(reached)
        if sweep is not None:
            self._hand(sweep, positions, stops, u, last)
        self.guess, self.unpack_guess = guess, unpack_guess
        self.records += records
        return offset


@functools.cache
def _guessed(name_length: int) -> _Unpack:
    """An unpack of the core fields and the first CIGAR operation, for a read name this long."""
    return struct.Struct(f"<iiiB3xHH{16 + name_length}xI").unpack_from


def read_intervals(bed: bytes) -> list[tuple[bytes, int, int]]:
    """``name<TAB>start<TAB>end`` lines (0-based, half-open), as :func:`write_intervals` writes them."""
    rows: list[tuple[bytes, int, int]] = []
    for line in bed.splitlines():
        name, start, end = line.rsplit(b"\t", 2)
        rows.append((name, int(start), int(end)))
    return rows


def write_intervals(rows: Iterable[tuple[str, int, int]]) -> bytes:
    """``name<TAB>start<TAB>end`` lines (a BED file) for :func:`read_intervals` or samtools' ``-L``."""
    return os.fsencode("".join(starmap("{}\t{}\t{}\n".format, rows)))


def sweep_main(argv: Sequence[str]) -> int:
    """``python -m bamcountd.bamstream INTERVALS``: a reader at the end of ``samtools view -u``'s
    pipe, in its own process (a count's readers then use every core, not one interpreter's).
    Prints each interval's count, a line each in the file's order, then ``records N``."""
    (path,) = argv
    gc.disable()  # a short-lived process whose lists and tuples hold no cycles
    with open(path, "rb") as handle:
        rows = read_intervals(handle.read())
    per_reference: dict[bytes, list[tuple[int, int]]] = {}
    for name, start, end in rows:
        per_reference.setdefault(name, []).append((start, end))
    try:
        found = count_overlaps(sys.stdin.buffer, per_reference, "the stream")
    except SamtoolsBadOutput as error:
        print(error, file=sys.stderr)
        return 1
    except struct.error as error:  # a CIGAR that runs past its record
        print(f"the stream: samtools wrote a record that ends early ({error})", file=sys.stderr)
        return 1
    served = {name: iter(counts) for name, counts in found.counts.items()}
    out = b"".join(b"%d\n" % next(served[name]) for name, _, _ in rows)
    sys.stdout.buffer.write(out + b"records %d\n" % found.records)
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main(sys.argv[1:]))
