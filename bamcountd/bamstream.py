"""Records per reference in an uncompressed BAM stream (``samtools view -u``), in any order.

samtools has no counter for that: ``idxstats -`` reads a stream only if it is sorted by
position ("file is not position sorted"), and unsorted, queryname-sorted or oddly written
files are exactly what needs a pass over the whole file.  samtools decodes and filters;
this only walks the records' ``block_size`` chain and reads each one's reference id.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain, starmap

from bamcountd.errors import SamtoolsBadOutput

_BLOCK_HEADER = struct.Struct("<4sIBBHBBHH")  # magic, MTIME, XFL, OS, XLEN=6, SI1, SI2, SLEN=2, BSIZE
_RECORD_HEAD = struct.Struct("<iii")  # block_size, refID, pos
#: Read-ahead for the pipe from samtools (open it with this buffer size).
READ_BUFFER = 1 << 20
_MAX_BLOCK = 1 << 16  # a BGZF block's most bytes


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


def count_records(stream: io.BufferedIOBase, what: str) -> StreamCounts:
    """Read BGZF-compressed BAM from ``stream`` to its end and count its records per reference.

    :raises SamtoolsBadOutput: the stream is not a whole BAM
    """
    counts = StreamCounts()
    data = Inflated(stream, what)
    counts.names = take_header(data, what)
    references = len(counts.names)
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


def take_header(data: Inflated, what: str) -> list[bytes]:
    """Read a BAM stream's header; return its reference names.

    :raises SamtoolsBadOutput: the stream does not start with a BAM header
    """
    header = data.take(8)
    if header[:4] != b"BAM\x01":
        raise SamtoolsBadOutput(f"{what}: samtools wrote something other than BAM")
    data.take(int.from_bytes(header[4:8], "little"))
    names = []
    for _ in range(int.from_bytes(data.take(4), "little")):
        name_length = int.from_bytes(data.take(4), "little")
        names.append(data.take(name_length + 4)[: name_length - 1])
    return names


def _walk(
    buffer: bytes | memoryview, position: int, end: int, tally: list[int], positionless: list[int], what: str
) -> int:
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


class Inflated:
    """The uncompressed bytes of a BGZF stream, as many blocks at a time as one read brings.

    The stream is read into one buffer and the blocks' bytes copied into a second, both kept
    for the whole stream: a buffer that :meth:`blocks` or :meth:`chunks` hands out is good
    until the next one is asked for (:meth:`keep` copies what must outlive it).
    """

    def __init__(self, stream: io.BufferedIOBase, what: str, *, read_size: int = READ_BUFFER) -> None:
        self._stream = stream
        self._what = what
        self._read_size = read_size
        self._blocks = self._inflate()
        self._unread: list[bytes | memoryview] = []  # blocks of the last read that take() left whole
        self._joined = bytearray(read_size)
        self.pending = b""

    def take(self, size: int) -> bytes:
        while len(self.pending) < size:
            if not self._unread:
                pieces = next(self._blocks, None)
                if pieces is None:
                    raise SamtoolsBadOutput(f"{self._what}: samtools' output ends inside the BAM header")
                self._unread = pieces[::-1]
            self.pending = b"".join([self.pending, self._unread.pop()])
        taken, self.pending = self.pending[:size], self.pending[size:]
        return taken

    def chunks(self) -> Iterator[tuple[memoryview, int, int]]:
        """What is left, a read's blocks at a time, joined to the unfinished record before them."""
        for buffer, _ in self.blocks():
            yield buffer, 0, len(buffer)

    def blocks(self) -> Iterator[tuple[memoryview, list[int]]]:
        """As :meth:`chunks`, with where each block starts in the buffer, and its end last."""
        unread, self._unread = self._unread[::-1], []
        for pieces in chain([unread] if unread else [], self._blocks):
            starts = list(accumulate(map(len, pieces), initial=len(self.pending)))
            buffer, self.pending = self._join([self.pending, *pieces], starts[-1]), b""
            yield buffer, starts
        if self.pending:  # the header's last block may hold records too
            buffer, self.pending = self._join([self.pending], len(self.pending)), b""
            yield buffer, [len(buffer)]

    def keep(self, buffer: bytes | memoryview, start: int, end: int) -> None:
        self.pending = bytes(buffer[start:end])

    def _join(self, pieces: Iterable[bytes | memoryview], size: int) -> memoryview:
        if len(self._joined) < size:  # a record longer than a read: a bigger buffer from now on
            self._joined = bytearray(size)
        joined, at = self._joined, 0
        for piece in pieces:
            joined[at : at + len(piece)] = piece
            at += len(piece)
        return memoryview(joined)[:size]

    def _inflate(self) -> Iterator[list[bytes | memoryview]]:
        """Each read's whole blocks, uncompressed, good until the next read.  ``samtools view
        -u`` writes level 0: a block is then one stored deflate block, whose bytes are taken as
        they are (no zlib call)."""
        what, header, unpack = self._what, _BLOCK_HEADER.size, _BLOCK_HEADER.unpack_from
        data = bytearray(self._read_size + _MAX_BLOCK)
        view = memoryview(data)
        kept = 0  # an unfinished block's bytes, at the start of ``data``
        while True:
            got = self._stream.readinto(view[kept : kept + self._read_size])
            if not got:
                if kept:
                    raise SamtoolsBadOutput(f"{what}: samtools' output ends inside a block")
                return
            pieces: list[bytes | memoryview] = []
            at, end = 0, kept + got
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
            if pieces:
                yield pieces
            kept = end - at
            data[:kept] = data[at:end]


# --- a sweep's intervals ----------------------------------------------------------------------

_INTERVALS_MAGIC = b"bamcountd-intervals 2\n"
_COUNTS_MAGIC = b"bamcountd-counts 1\n"
_HEAD = struct.Struct("<qq")


def write_intervals_file(names: Sequence[str], references: list[int], starts: list[int], ends: list[int]) -> bytes:
    """A sweep's intervals for :mod:`bamcountd.overlaps`: the references' names (BED-safe, so
    with no tab or newline) on one line, how many intervals, then the columns of their
    reference numbers (into the names), starts and ends (0-based, half-open) as little-endian
    64-bit integers, in the order the counts come back."""
    columns = [_little(array("q", column)) for column in (references, starts, ends)]
    return b"".join([_INTERVALS_MAGIC, os.fsencode("\t".join(names)), b"\n", _HEAD.pack(len(starts), 0), *columns])


def read_intervals_file(data: bytes) -> tuple[list[bytes], list[array[int]]]:
    """The names and the three columns of :func:`write_intervals_file`.

    :raises SamtoolsBadOutput: the data is not such a file
    """
    if not data.startswith(_INTERVALS_MAGIC):
        raise SamtoolsBadOutput("the intervals file is not bamcountd's")
    line_end = data.index(b"\n", len(_INTERVALS_MAGIC))
    names = data[len(_INTERVALS_MAGIC) : line_end].split(b"\t")
    count, _ = _HEAD.unpack_from(data, line_end + 1)
    numbers = array("q")
    numbers.frombytes(data[line_end + 1 + _HEAD.size :])
    if len(numbers) != 3 * count:
        raise SamtoolsBadOutput("the intervals file is cut short")
    _little(numbers)
    return names, [numbers[k * count : (k + 1) * count] for k in range(3)]


def write_counts(counts: bytes, records: int) -> bytes:
    """A sweep's answer: how many intervals and records, then each interval's count
    (``counts``: little-endian 64-bit integers)."""
    return b"".join([_COUNTS_MAGIC, _HEAD.pack(len(counts) // 8, records), counts])


def read_counts(data: bytes, intervals: int) -> tuple[list[int], int] | None:
    """The counts and records of :func:`write_counts`; None unless it holds ``intervals`` counts."""
    if not data.startswith(_COUNTS_MAGIC) or len(data) != len(_COUNTS_MAGIC) + _HEAD.size + 8 * intervals:
        return None
    count, records = _HEAD.unpack_from(data, len(_COUNTS_MAGIC))
    if count != intervals:
        return None
    numbers = array("q")
    numbers.frombytes(data[len(_COUNTS_MAGIC) + _HEAD.size :])
    return _little(numbers).tolist(), records


def _little(numbers: array[int]) -> array[int]:
    if sys.byteorder != "little":
        numbers.byteswap()
    return numbers


def write_intervals(rows: Iterable[tuple[str, int, int]]) -> bytes:
    """``name<TAB>start<TAB>end`` lines: a BED file for samtools' ``-L``."""
    return os.fsencode("".join(starmap("{}\t{}\t{}\n".format, rows)))
