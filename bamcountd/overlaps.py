"""Reads per interval in one pass: the reader at the end of a sweep's ``samtools view -u`` pipe.

``python -m bamcountd.overlaps INTERVALS`` reads the uncompressed BAM that samtools writes for
the stretches holding a shard's intervals (``INTERVALS``: bamstream.write_intervals_file, read
once samtools' first bytes arrive), and writes each interval's count, in the file's order, and
the records it read (bamstream.write_counts); nothing, and exit status 0, for an empty stdin.  It runs in its own process, so a count's readers use every core.
Nothing is a Python step per record: the records' ``block_size`` chains are walked a BGZF
block each, all blocks of a buffer in step (see _offsets), and the fields, read ends and counts
are taken a buffer at a time with numpy.

A read covers ``[pos, stop)`` with htslib's ``bam_endpos`` (the reference-consuming CIGAR
operations, and at least one base: a placed unmapped read or one without CIGAR covers one), and
overlaps ``[s, e)`` when ``stop > s`` and ``pos < e``, as samtools' region iterator decides.  So
an interval's count is A(e) - B(s): the reads that start before ``e`` minus those that stop at or
before ``s`` (all of which start before ``e`` too).  Both are sums over batches of records, each
a binary search of the batch's sorted positions or stops for the intervals whose ends (starts)
fall inside the batch's span; the intervals past it take the whole batch, once, through a
running sum.  Memory follows the intervals and one buffer, not the reads.
"""

from __future__ import annotations

import gc
import io
import os
import struct
import sys
from collections.abc import Sequence
from typing import NamedTuple

# One reader per sweep already keeps a core busy: numpy's BLAS threads (which it starts as it is
# imported, one per core) would only cost the start.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import numpy.typing as npt

from bamcountd.bamstream import Inflated, read_intervals_file, take_header, write_counts
from bamcountd.errors import SamtoolsBadOutput

_Ints = npt.NDArray[np.int64]
_Buffer = bytes | memoryview
_SIZE = struct.Struct("<I")
#: CIGAR operations that consume the reference (htslib's bam_cigar_type & 2): M, D, N, =, X.
_REFERENCE_OPS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 7) | (1 << 8)
_UNMAPPED = 0x4
_CORE = 32  # a record's fixed fields after block_size
#: Pipe reads this big (a few MB) give a hundred or so blocks to walk at once (see _offsets).
_READ_SIZE = 8 << 20
_CHECK_EVERY = 32  # steps of _walk_blocks between looks at whether every chain is done


class _Reference:
    """One reference's intervals, sorted by end and by start, and the sums A and B so far."""

    __slots__ = ("before_end", "by_end", "by_start", "carry_end", "carry_ended", "ended", "ends", "last", "starts")

    def __init__(self, starts: _Ints, ends: _Ints) -> None:
        self.by_end = np.argsort(ends, kind="stable")
        self.by_start = np.argsort(starts, kind="stable")
        self.ends = ends[self.by_end]
        self.starts = starts[self.by_start]
        count = len(starts)
        self.before_end = np.zeros(count, np.int64)  # A(e), by end
        self.ended = np.zeros(count, np.int64)  # B(s), by start
        # Whole batches, added from a position on (a running sum, taken at the end).
        self.carry_end = np.zeros(count + 1, np.int64)
        self.carry_ended = np.zeros(count + 1, np.int64)
        self.last = -1  # the last record's position, to check the order

    def add(self, positions: _Ints, stops: _Ints) -> None:
        """Take the next batch of this reference's records (positions in order, and stops)."""
        taken = len(positions)
        ends = self.ends
        low = int(np.searchsorted(ends, positions[0], "right"))  # ends at or before the batch: none start before
        high = int(np.searchsorted(ends, positions[-1], "right"))  # ends past it: all do
        if high > low:
            self.before_end[low:high] += np.searchsorted(positions, ends[low:high], "left")
        self.carry_end[high] += taken
        stops = np.sort(stops)
        starts = self.starts
        low = int(np.searchsorted(starts, stops[0], "left"))  # starts before every stop: none stopped
        high = int(np.searchsorted(starts, stops[-1], "left"))  # starts at or past every stop: all did
        if high > low:
            self.ended[low:high] += np.searchsorted(stops, starts[low:high], "right")
        self.carry_ended[high] += taken

    def counts(self) -> _Ints:
        """Every interval's count, in the order given."""
        counts = np.zeros(len(self.ends), np.int64)
        counts[self.by_end] = self.before_end + np.cumsum(self.carry_end)[:-1]
        counts[self.by_start] -= self.ended + np.cumsum(self.carry_ended)[:-1]
        return counts


class OverlapCounts(NamedTuple):
    """Each interval's reads, in the order given; the records read."""

    counts: _Ints
    records: int


def count_overlaps(
    stream: io.BufferedIOBase, names: Sequence[bytes], rows: npt.NDArray[np.int64], what: str
) -> OverlapCounts:
    """Read BGZF-compressed, coordinate-sorted BAM from ``stream`` (``samtools view -u`` of
    stretches that hold these intervals) and count, per interval, the records that overlap it.

    ``rows``: one ``(reference, start, end)`` per interval, 0-based and half-open, the reference
    a number into ``names``.  Every record must be on one of those references, each reference's
    records together and in position order.

    :raises SamtoolsBadOutput: the stream is not a whole BAM, or holds a record it should not
    """
    data = Inflated(stream, what, read_size=_READ_SIZE)
    header_names = take_header(data, what)
    tids = {name: tid for tid, name in enumerate(header_names)}
    walker = _Walker(header_names, what)
    members: dict[int, _Ints] = {}
    for number, name in enumerate(names):
        if name not in tids:
            raise SamtoolsBadOutput(f"{what}: the stream's header has no reference {name!r}")
        chosen = np.flatnonzero(rows[:, 0] == number)
        members[tids[name]] = chosen
        walker.references[tids[name]] = _Reference(rows[chosen, 1], rows[chosen, 2])
    for buffer, starts in data.blocks():
        data.keep(buffer, walker.walk(buffer, starts), len(buffer))
    if data.pending:
        raise SamtoolsBadOutput(f"{what}: samtools' output ends inside a record")
    counts = np.zeros(len(rows), np.int64)
    for tid, chosen in members.items():
        counts[chosen] = walker.references[tid].counts()
    return OverlapCounts(counts, walker.records)


class _Walker:
    """The records of each buffer: their offsets by the ``block_size`` chain, then their fields
    and read ends as arrays, handed on a batch per reference."""

    def __init__(self, names: Sequence[bytes], what: str) -> None:
        self.references: dict[int, _Reference] = {}
        self.names = names
        self.what = what
        self.tid = -2  # no reference yet
        self.done: set[int] = set()
        self.records = 0

    def walk(self, buffer: _Buffer, starts: Sequence[int]) -> int:
        """Sweep the whole records in ``buffer``, whose BGZF blocks start at ``starts`` (its end
        last); return where the first partial record starts."""
        offsets, end = _offsets(buffer, starts)
        if len(offsets):
            self._records(buffer, offsets)
        return end

    def _records(self, buffer: _Buffer, offsets: _Ints) -> None:
        what, size = self.what, len(buffer)
        u8 = np.frombuffer(buffer, np.uint8)
        i32 = np.ndarray((size - 3,), "<i4", buffer, 0, (1,))  # an int at every byte
        u16 = np.ndarray((size - 1,), "<u2", buffer, 0, (1,))
        sizes = i32[offsets].astype(np.int64)
        bad = np.flatnonzero(sizes < _CORE)
        if len(bad):
            raise SamtoolsBadOutput(f"{what}: samtools wrote a record of {sizes[bad[0]]} bytes")
        name_lengths = u8[offsets + 12].astype(np.int64)
        operations = u16[offsets + 16].astype(np.int64)
        cigars = offsets + 36 + name_lengths
        short = np.flatnonzero(cigars + 4 * operations > offsets + 4 + sizes)
        if len(short):
            raise SamtoolsBadOutput(f"{what}: samtools wrote a record that ends early (inside its CIGAR)")
        tids = i32[offsets + 4].astype(np.int64)
        positions = i32[offsets + 8].astype(np.int64)
        flags = u16[offsets + 18]
        single = operations == 1  # most reads: one CIGAR operation, read straight
        if bool(single.all()):
            spans = _first_spans(i32, cigars)
        else:
            spans = np.zeros(len(cigars), np.int64)
            spans[single] = _first_spans(i32, cigars[single])
            several = operations > 1
            spans[several] = _spans(i32, cigars[several], operations[several])
        stops = positions + np.maximum(spans, 1)
        unmapped = (flags & _UNMAPPED) != 0
        stops[unmapped] = positions[unmapped] + 1
        self.records += len(offsets)
        cuts = np.flatnonzero(tids[1:] != tids[:-1]) + 1
        for first, last in zip([0, *cuts.tolist()], [*cuts.tolist(), len(tids)], strict=True):
            self._batch(int(tids[first]), positions[first:last], stops[first:last])

    def _batch(self, tid: int, positions: _Ints, stops: _Ints) -> None:
        if tid != self.tid:
            if tid not in self.references or tid in self.done:
                name = self.names[tid] if 0 <= tid < len(self.names) else tid
                raise SamtoolsBadOutput(
                    f"{self.what}: samtools returned a record on {name!r} at {int(positions[0]) + 1}, unasked"
                )
            self.done.add(self.tid)
            self.tid = tid
        reference = self.references[tid]
        if int(positions[0]) < reference.last or (len(positions) > 1 and bool((positions[1:] < positions[:-1]).any())):
            raise SamtoolsBadOutput(f"{self.what}: samtools returned records out of position order")
        reference.last = int(positions[-1])
        reference.add(positions, stops)


def _offsets(buffer: _Buffer, starts: Sequence[int]) -> tuple[_Ints, int]:
    """Where the whole records of ``buffer`` start, and where the first partial one does.

    htslib starts a new BGZF block rather than let a record cross one (bgzf_flush_try, for any
    record that fits in a block), so samtools' blocks usually start at a record: then the chains
    of all blocks are walked at once, a record of every block a step, and each must end exactly
    where its block does.  Where one does not (a record longer than a block, or a stream written
    otherwise), the buffer is walked one record after another from where the blocks were
    entered, which is always right.
    """
    end = len(buffer)
    head, at = _walk(buffer, 0, starts[0], end)  # the unfinished record before the first block
    if at == starts[0] and len(starts) > 1:
        found = _walk_blocks(buffer, np.array(starts, np.int64))
        if found is not None:
            return np.concatenate((np.array(head, np.int64), found)), end
    tail, at = _walk(buffer, at, end, end)
    return np.array(head + tail, np.int64), at


def _walk(buffer: _Buffer, at: int, stop: int, end: int) -> tuple[list[int], int]:
    """The records from ``at`` on, one after another, while they start before ``stop`` and end
    by ``end``; and where the walk stopped."""
    unpack, offsets = _SIZE.unpack_from, list[int]()
    add = offsets.append
    while at < stop and at + 4 <= end:
        following = at + 4 + unpack(buffer, at)[0]
        if following > end:
            break
        add(at)
        at = following
    return offsets, at


def _walk_blocks(buffer: _Buffer, bounds: _Ints) -> _Ints | None:
    """The records of every block (``bounds``: the blocks' starts, then the end), walked in
    step; None if some block's chain does not end where the block does.

    Every chain takes the same steps, checked only now and then: one that has reached its
    block's end walks on into the next block (the next chain's records again) or is held at the
    buffer's end, and what it finds there is dropped.
    """
    sizes = np.ndarray((len(buffer) - 3,), "<u4", buffer, 0, (1,))
    current, ends = bounds[:-1].copy(), bounds[1:]
    last, at = len(buffer) - 4, np.empty_like(current)
    columns = [current.copy()]
    while True:
        for _ in range(_CHECK_EVERY):
            np.minimum(current, last, out=at)  # (take's clip mode would copy the strided view)
            current += sizes[at]
            current += 4
            columns.append(current.copy())
        if bool((current >= ends).all()):
            break
    table = np.stack(columns, axis=1)  # a block's records in a row: the stream's order
    if not bool((table == ends[:, None]).any(axis=1).all()):
        return None
    found: _Ints = table[table < ends[:, None]]
    return found


def _first_spans(i32: npt.NDArray[np.int32], cigars: _Ints) -> _Ints:
    """The reference span of each record's first CIGAR operation."""
    ops = i32[cigars].astype(np.int64) & 0xFFFFFFFF
    spans: _Ints = (ops >> 4) * ((_REFERENCE_OPS >> (ops & 15)) & 1)
    return spans


def _spans(i32: npt.NDArray[np.int32], cigars: _Ints, operations: _Ints) -> _Ints:
    """Each record's reference span: the lengths of its reference-consuming CIGAR operations."""
    total = int(operations.sum())
    if not total:
        return np.zeros(len(cigars), np.int64)
    before = np.cumsum(operations) - operations
    within = np.arange(total, dtype=np.int64) - np.repeat(before, operations)
    ops = i32[np.repeat(cigars, operations) + 4 * within].astype(np.int64) & 0xFFFFFFFF
    lengths = (ops >> 4) * ((_REFERENCE_OPS >> (ops & 15)) & 1)
    running: _Ints = np.concatenate(([0], np.cumsum(lengths)))
    spans: _Ints = running[before + operations] - running[before]
    return spans


def main(argv: Sequence[str]) -> int:
    """``python -m bamcountd.overlaps INTERVALS``: see the module's docstring."""
    (path,) = argv
    gc.disable()  # a short-lived process whose arrays hold no cycles
    try:
        with open(sys.stdin.fileno(), "rb", closefd=False) as stdin:
            # A reader may start before its sweep is planned (samtools.start_reader): its
            # intervals are written before samtools starts, so they are read once samtools'
            # first bytes are here; none at all is a sweep that never came.
            if not stdin.peek(1):
                return 0
            with open(path, "rb") as handle:
                names, columns = read_intervals_file(handle.read())
            rows = np.stack([np.frombuffer(column, np.int64) for column in columns], axis=1)
            found = count_overlaps(stdin, names, rows, "the stream")
    except SamtoolsBadOutput as error:
        print(error, file=sys.stderr)
        return 1
    sys.stdout.buffer.write(write_counts(found.counts.astype("<i8").tobytes(), found.records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
