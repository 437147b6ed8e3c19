"""The interval sweep's reader (``python -m bamcountd.overlaps``) run as a real process on the
uncompressed BAM it is given: counts equal to samtools', and damaged streams refused in words."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bamcountd.bamstream import read_counts, write_intervals_file
from bamcountd.synth import Reference, write_bam
from tests.support.bams import bam_records, samtools_count, write_raw_bam

REFERENCES = (Reference("chrA", 50_000), Reference("chrB", 20_000))
ROWS = [(0, 0, 1), (0, 999, 2_000), (0, 1_500, 1_501), (0, 40_000, 50_000), (0, 49_990, 50_200), (0, 999, 2_000)]


@pytest.fixture(scope="module")
def bam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("overlaps")
    cigars = ("50M", "10S30M", "20M3000N20M", "15M4D15M", "12S", "5H20M5I5M")
    lines = []
    for serial in range(3_000):
        name = REFERENCES[serial % 2].name
        position = 1 + (serial * 37) % 49_000 if name == "chrA" else 1 + (serial * 11) % 19_000
        flag, cigar = (4, "*") if serial % 97 == 0 else (0 if serial % 3 else 16, cigars[serial % len(cigars)])
        query = sum(int(n) for n, op in _ops(cigar) if op in "MIS=X") or 10
        lines.append(f"r{serial}\t{flag}\t{name}\t{position}\t30\t{cigar}\t*\t0\t0\t{'A' * query}\t*")
    return write_bam(folder / "reads.bam", REFERENCES, lines)


def _ops(cigar: str) -> list[tuple[str, str]]:
    import re

    return re.findall(r"([0-9]+)([MIDNSHP=X])", cigar)


def _sweep(
    stream: bytes, folder: Path, names: list[str], rows: list[tuple[int, int, int]]
) -> subprocess.CompletedProcess[bytes]:
    intervals = folder / "sweep.intervals"
    numbers, starts, ends = (list(column) for column in zip(*rows, strict=True))
    intervals.write_bytes(write_intervals_file(names, numbers, starts, ends))
    return subprocess.run(
        [sys.executable, "-m", "bamcountd.overlaps", str(intervals)], input=stream, capture_output=True, check=False
    )


def _chr_a(bam: Path) -> tuple[bytes, list[bytes]]:
    """The BAM's header and its records on chrA (as ``view -u`` of chrA would give them)."""
    header, records = bam_records(bam)
    return header, [record for record in records if struct.unpack_from("<i", record, 4)[0] == 0]


def test_counts_equal_samtools(bam: Path, tmp_path: Path) -> None:
    header, records = _chr_a(bam)
    stream = write_raw_bam(tmp_path / "a.bam", header, records).read_bytes()
    done = _sweep(stream, tmp_path, ["chrA"], ROWS)
    assert done.returncode == 0, done.stderr
    assert read_counts(done.stdout, len(ROWS)) == (
        [samtools_count(bam, f"chrA:{s + 1}-{e}") for _, s, e in ROWS],
        len(records),
    )


def _damaged(records: list[bytes], number: int, offset: int, value: bytes) -> list[bytes]:
    record = bytearray(records[number])
    record[offset : offset + len(value)] = value
    return [*records[:number], bytes(record), *records[number + 1 :]]


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("cut", "ends inside a record"),
        ("size", "a record of 12 bytes"),
        ("cigar", "ends early"),
        ("order", "out of position order"),
        ("unasked", "samtools returned a record on b'chrB' at"),
    ],
)
def test_a_damaged_stream_is_refused(bam: Path, tmp_path: Path, damage: str, words: str) -> None:
    header, records = _chr_a(bam)
    if damage == "size":
        records = _damaged(records, 40, 0, struct.pack("<i", 12))
    elif damage == "cigar":
        records = _damaged(records, 40, 16, struct.pack("<H", 60_000))
    elif damage == "order":
        records = [*records[:40], records[41], records[40], *records[42:]]
    elif damage == "unasked":
        records = _damaged(records, len(records) - 1, 4, struct.pack("<i", 1))
    data = header + b"".join(records)
    if damage == "cut":
        data = data[:-7]
    stream = write_raw_bam(tmp_path / "damaged.bam", data, []).read_bytes()
    done = _sweep(stream, tmp_path, ["chrA"], ROWS)
    assert done.returncode == 1
    assert done.stdout == b""
    assert words in done.stderr.decode()


def _block_buffers(stream: bytes) -> list[tuple[bytes, list[int]]]:
    import io

    from bamcountd.bamstream import Inflated, take_header

    data = Inflated(io.BytesIO(stream), "the stream", read_size=1 << 20)
    take_header(data, "the stream")
    buffers = []
    for buffer, starts in data.blocks():
        buffers.append((bytes(buffer), starts))
        data.keep(buffer, len(buffer), len(buffer))
    return buffers


def test_blocks_are_walked_at_once_where_samtools_wrote_them(bam: Path, tmp_path: Path) -> None:
    """samtools starts a block at a record, so the walk in step is the one taken, and it finds
    what a walk one record after another does; blocks cut anywhere make it step aside."""
    import numpy as np

    from bamcountd.overlaps import _walk, _walk_blocks

    viewed = subprocess.run(["samtools", "view", "-u", str(bam)], capture_output=True, check=True).stdout
    header, records = bam_records(bam)
    cut_anywhere = write_raw_bam(tmp_path / "cut.bam", header, records).read_bytes()
    for stream, aligned in ((viewed, True), (cut_anywhere, False)):
        walked = 0
        for buffer, starts in _block_buffers(stream):
            one_by_one, _ = _walk(buffer, starts[0], len(buffer), len(buffer))
            in_step = _walk_blocks(buffer, np.array(starts, np.int64))
            if aligned:
                assert in_step is not None and in_step.tolist() == one_by_one
                walked += len(one_by_one)
            elif len(starts) > 2:
                assert in_step is None
        assert walked == (len(records) if aligned else 0)


def test_a_reader_started_ahead_reads_its_intervals_once_samtools_writes(bam: Path, tmp_path: Path) -> None:
    """Started before its intervals file exists (samtools.readers_ahead), a reader reads it only
    once the stream's first bytes come; with no stream at all it ends quietly."""
    header, records = _chr_a(bam)
    stream = write_raw_bam(tmp_path / "a.bam", header, records).read_bytes()
    intervals = tmp_path / "later.intervals"
    argv = [sys.executable, "-m", "bamcountd.overlaps", str(intervals)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        time.sleep(1)  # about when it waits for its stdin, started
        numbers, starts, ends = (list(column) for column in zip(*ROWS, strict=True))
        intervals.write_bytes(write_intervals_file(["chrA"], numbers, starts, ends))
        out, err = reader.communicate(stream)
    assert reader.returncode == 0, err
    assert read_counts(out, len(ROWS)) == ([samtools_count(bam, f"chrA:{s + 1}-{e}") for _, s, e in ROWS], len(records))
    unused = subprocess.run(
        [*argv[:-1], str(tmp_path / "never.intervals")], input=b"", capture_output=True, check=False
    )
    assert (unused.returncode, unused.stdout, unused.stderr) == (0, b"", b"")
