"""Records per reference in an uncompressed BAM stream (``samtools view -u``), in any order.

samtools has no counter for that: ``idxstats -`` reads a stream only if it is sorted by
position ("file is not position sorted"), and unsorted, queryname-sorted or oddly written
files are exactly what needs a pass over the whole file.  samtools decodes and filters;
this only walks the records' ``block_size`` chain and reads each one's reference id.
"""

from __future__ import annotations

import heapq
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO, NamedTuple

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
    """The uncompressed bytes of a BGZF stream, a block at a time."""

    def __init__(self, stream: BinaryIO, what: str) -> None:
        self._stream = stream
        self._what = what
        self._blocks = self._inflate()
        self.pending = b""

    def take(self, size: int) -> bytes:
        while len(self.pending) < size:
            block = next(self._blocks, None)
            if block is None:
                raise SamtoolsBadOutput(f"{self._what}: samtools' output ends inside the BAM header")
            self.pending += block
        taken, self.pending = self.pending[:size], self.pending[size:]
        return taken

    def chunks(self) -> Iterator[tuple[bytes, int, int]]:
        """What is left, block by block, each joined to the unfinished record before it."""
        for block in self._blocks:
            buffer = self.pending + block if self.pending else block
            self.pending = b""
            yield buffer, 0, len(buffer)
        if self.pending:  # the header's last block may hold records too
            buffer, self.pending = self.pending, b""
            yield buffer, 0, len(buffer)

    def keep(self, buffer: bytes, start: int, end: int) -> None:
        self.pending = buffer[start:end]

    def _inflate(self) -> Iterator[bytes]:
        while True:
            head = self._read(_BLOCK_HEADER.size)
            if not head:
                return
            fields = _BLOCK_HEADER.unpack(head) if len(head) == _BLOCK_HEADER.size else None
            if fields is None or fields[0] != b"\x1f\x8b\x08\x04" or fields[4:8] != (6, 66, 67, 2):
                raise SamtoolsBadOutput(f"{self._what}: samtools' output is not BGZF")
            body = self._read(fields[8] + 1 - _BLOCK_HEADER.size)
            try:
                block = zlib.decompress(body[:-8], -15)
            except zlib.error as error:
                raise SamtoolsBadOutput(f"{self._what}: samtools' output has a bad block ({error})") from None
            if block:
                yield block

    def _read(self, size: int) -> bytes:
        taken = self._stream.read(size)  # a buffered reader: all of it, unless the stream ends
        if 0 < len(taken) < size:
            raise SamtoolsBadOutput(f"{self._what}: samtools' output ends inside a block")
        return taken


# --- reads per interval, in one pass ----------------------------------------------------------

_CORE = struct.Struct("<iiiB3xHH")  # block_size, refID, pos, l_read_name, (MAPQ, bin), n_cigar_op, FLAG
_OP = struct.Struct("<I")
#: CIGAR operations that consume the reference (htslib's bam_cigar_type & 2): M, D, N, =, X.
_REFERENCE_OPS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 7) | (1 << 8)
_UNMAPPED = 0x4
_NEVER = 1 << 62  # past every position


class _Sweep:
    """One reference's intervals and how far the records have got through them.

    A read covers ``[pos, end)`` with htslib's ``bam_endpos`` (the reference-consuming CIGAR
    operations, and at least one base: a placed unmapped read or one without CIGAR covers one),
    and overlaps ``[s, e)`` when ``end > s`` and ``pos < e``, as samtools' region iterator
    decides.  So an interval's count is A(e) - B(s): the reads that start before ``e`` minus
    those that end at or before ``s`` (all of which start before ``e`` too).  Records come in
    position order, so A(e) is known at the first record at or past ``e`` and B(s) at the first
    at or past ``s``; the ends still open are kept in a heap, which holds only the reads that
    cover the next interval start: memory follows the depth, not the reads.  A read that
    overlaps no interval adds one to every A and B still to come, so it is skipped.
    """

    def __init__(self, intervals: Sequence[tuple[int, int]]) -> None:
        count = len(intervals)
        self.by_end = sorted(range(count), key=lambda i: intervals[i][1])
        self.by_start = sorted(range(count), key=lambda i: intervals[i][0])
        self.ends = [intervals[i][1] for i in self.by_end]
        self.starts = [intervals[i][0] for i in self.by_start]
        self.merged = merged_intervals(intervals)
        self.before_end = [0] * count  # A(e), in by_end order
        self.ended_by_start = [0] * count  # B(s), in by_start order
        self.next_end = 0  # the next threshold of each kind, and the next merged interval
        self.next_start = 0
        self.next_merged = 0
        self.records = 0  # reads counted so far (all start before the current record)
        self.ended = 0  # of those, the reads known to end at or before the next start
        self.open: list[int] = []  # ends of the others (a heap)
        self.last = -1  # the last record's position, to check the order

    def finish(self) -> list[int]:
        """Every interval's count, in the order given (the stream has ended)."""
        ended, open_ends = self.ended, self.open
        for k in range(self.next_start, len(self.starts)):
            start = self.starts[k]
            while open_ends and open_ends[0] <= start:
                heapq.heappop(open_ends)
                ended += 1
            self.ended_by_start[k] = ended
        for k in range(self.next_end, len(self.ends)):
            self.before_end[k] = self.records
        counts = [0] * len(self.starts)
        for k, i in enumerate(self.by_end):
            counts[i] += self.before_end[k]
        for k, i in enumerate(self.by_start):
            counts[i] -= self.ended_by_start[k]
        return counts


def merged_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of ``[start, end)`` intervals, sorted, touching ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


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
    """The per-record loop of :func:`count_overlaps`, with one reference's sweep in locals."""

    def __init__(self, sweeps: dict[int, _Sweep], names: Sequence[bytes], what: str) -> None:
        self.sweeps = sweeps
        self.names = names
        self.what = what
        self.tid = -2  # no reference yet
        self.done: set[int] = set()
        self.records = 0

    def _switch(self, tid: int, position: int) -> _Sweep:
        if tid not in self.sweeps or tid in self.done:
            name = self.names[tid] if 0 <= tid < len(self.names) else tid
            raise SamtoolsBadOutput(f"{self.what}: samtools returned a record on {name!r} at {position + 1}, unasked")
        self.done.add(self.tid)
        self.tid = tid
        return self.sweeps[tid]

    def walk(self, buffer: bytes, offset: int, end: int) -> int:
        """Sweep the whole records in ``buffer[offset:end]``; return where the first partial one starts."""
        unpack, unpack_op, heappush, heappop = _CORE.unpack_from, _OP.unpack_from, heapq.heappush, heapq.heappop
        tid = self.tid
        sweep = self.sweeps.get(tid) or _Sweep(())
        ends, starts, merged = sweep.ends, sweep.starts, sweep.merged
        before_end, ended_by_start, open_ends = sweep.before_end, sweep.ended_by_start, sweep.open
        ia, ib, im, n, ended, last = (
            sweep.next_end,
            sweep.next_start,
            sweep.next_merged,
            sweep.records,
            sweep.ended,
            sweep.last,
        )
        next_e = ends[ia] if ia < len(ends) else _NEVER
        next_s = starts[ib] if ib < len(starts) else _NEVER
        low, high = merged[im] if im < len(merged) else (_NEVER, _NEVER)
        records = 0
        while offset + 24 <= end:
            size, record_tid, pos, name_length, n_cigar, flag = unpack(buffer, offset)
            following = offset + 4 + size
            if following > end:
                break
            offset = following
            records += 1
            if record_tid != tid:
                sweep.next_end, sweep.next_start, sweep.next_merged = ia, ib, im
                sweep.records, sweep.ended, sweep.last = n, ended, last
                sweep = self._switch(record_tid, pos)
                tid = record_tid
                ends, starts, merged = sweep.ends, sweep.starts, sweep.merged
                before_end, ended_by_start, open_ends = sweep.before_end, sweep.ended_by_start, sweep.open
                ia = ib = im = n = ended = 0
                last = -1
                next_e, next_s, (low, high) = ends[0], starts[0], merged[0]
            if pos < last:
                raise SamtoolsBadOutput(f"{self.what}: samtools returned records out of position order")
            last = pos
            while pos >= high:  # past the merged interval: on to the next
                im += 1
                low, high = merged[im] if im < len(merged) else (_NEVER, _NEVER)
            if flag & _UNMAPPED or not n_cigar:
                stop = pos + 1
            else:
                cigar = following - size + 32 + name_length
                if n_cigar == 1:
                    op = unpack_op(buffer, cigar)[0]
                    span = op >> 4 if _REFERENCE_OPS >> (op & 15) & 1 else 0
                else:
                    ops = struct.unpack_from(f"<{n_cigar}I", buffer, cigar)
                    span = sum(op >> 4 for op in ops if _REFERENCE_OPS >> (op & 15) & 1)
                stop = pos + (span or 1)
            if stop <= low:  # overlaps no interval
                continue
            while pos >= next_e:
                before_end[ia] = n
                ia += 1
                next_e = ends[ia] if ia < len(ends) else _NEVER
            n += 1
            while pos >= next_s:
                while open_ends and open_ends[0] <= next_s:
                    heappop(open_ends)
                    ended += 1
                ended_by_start[ib] = ended
                ib += 1
                next_s = starts[ib] if ib < len(starts) else _NEVER
            if stop <= next_s:
                ended += 1
            else:
                heappush(open_ends, stop)
        sweep.next_end, sweep.next_start, sweep.next_merged = ia, ib, im
        sweep.records, sweep.ended, sweep.last = n, ended, last
        self.records += records
        return offset


def read_intervals(bed: bytes) -> list[tuple[bytes, int, int]]:
    """``name<TAB>start<TAB>end`` lines (0-based, half-open), as :func:`write_intervals` writes them."""
    rows: list[tuple[bytes, int, int]] = []
    for line in bed.splitlines():
        name, start, end = line.rsplit(b"\t", 2)
        rows.append((name, int(start), int(end)))
    return rows


def write_intervals(rows: Iterable[tuple[str, int, int]]) -> bytes:
    """``name<TAB>start<TAB>end`` lines (a BED file) for :func:`read_intervals` or samtools' ``-L``."""
    return os.fsencode("".join(f"{name}\t{start}\t{end}\n" for name, start, end in rows))


def sweep_main(argv: Sequence[str]) -> int:
    """``python -m bamcountd.bamstream INTERVALS``: a reader at the end of ``samtools view -u``'s
    pipe, in its own process (a count's readers then use every core, not one interpreter's).
    Prints each interval's count, a line each in the file's order, then ``records N``."""
    (path,) = argv
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
    served = {name: iter(counts) for name, counts in found.counts.items()}
    out = b"".join(b"%d\n" % next(served[name]) for name, _, _ in rows)
    sys.stdout.buffer.write(out + b"records %d\n" % found.records)
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main(sys.argv[1:]))
