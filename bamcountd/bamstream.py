"""Records per reference in an uncompressed BAM stream (``samtools view -u``), in any order.

samtools has no counter for that: ``idxstats -`` reads a stream only if it is sorted by
position ("file is not position sorted"), and unsorted, queryname-sorted or oddly written
files are exactly what needs a pass over the whole file.  samtools decodes and filters;
this only walks the records' ``block_size`` chain and reads each one's reference id.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

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
