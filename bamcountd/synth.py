"""Synthetic BAMs for the demo, the tests and the benchmarks.

SAM text is written straight into ``samtools view -b`` (or ``samtools sort``) and the result
indexed with ``samtools index`` (:func:`bamcountd.samtools.write_bam_sync`, :func:`~bamcountd.samtools.index_sync`):
the files are made by the same samtools that counts them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bamcountd.samtools import index_sync, write_bam_sync

#: Flags drawn for random reads: plain, reverse, paired, secondary, supplementary, duplicate,
#: QC-fail and placed-unmapped, weighted roughly like a real library.
FLAG_MIX: tuple[tuple[int, int], ...] = (
    (0, 20),
    (16, 20),
    (99, 12),
    (147, 12),
    (83, 8),
    (163, 8),
    (256, 4),
    (2048, 3),
    (1024, 6),
    (512, 2),
    (1040, 2),
    (73, 2),
    (133, 1),
)

_BASES = bytes((b"ACGT"[i % 4]) for i in range(256))
_QUALS = bytes(33 + (i % 41) for i in range(256))


@dataclass(frozen=True)
class Reference:
    name: str
    length: int


#: Human-like lengths (GRCh38 primary assembly, chr1..chr22, X, Y, M), for realistic shapes.
HUMAN: tuple[Reference, ...] = tuple(
    Reference(name, length)
    for name, length in (
        ("chr1", 248_956_422),
        ("chr2", 242_193_529),
        ("chr3", 198_295_559),
        ("chr4", 190_214_555),
        ("chr5", 181_538_259),
        ("chr6", 170_805_979),
        ("chr7", 159_345_973),
        ("chr8", 145_138_636),
        ("chr9", 138_394_717),
        ("chr10", 133_797_422),
        ("chr11", 135_086_622),
        ("chr12", 133_275_309),
        ("chr13", 114_364_328),
        ("chr14", 107_043_718),
        ("chr15", 101_991_189),
        ("chr16", 90_338_345),
        ("chr17", 83_257_441),
        ("chr18", 80_373_285),
        ("chr19", 58_617_616),
        ("chr20", 64_444_167),
        ("chr21", 46_709_983),
        ("chr22", 50_818_468),
        ("chrX", 156_040_895),
        ("chrY", 57_227_415),
        ("chrM", 16_569),
    )
)


def sam_header(references: Sequence[Reference], *, sort_order: str = "coordinate") -> str:
    lines = [f"@HD\tVN:1.6\tSO:{sort_order}"]
    lines += [f"@SQ\tSN:{ref.name}\tLN:{ref.length}" for ref in references]
    return "\n".join(lines) + "\n"


def write_bam(
    path: Path,
    references: Sequence[Reference],
    records: Iterable[str],
    *,
    sort: bool = True,
    index: bool = True,
    sort_order: str = "coordinate",
    samtools: str = "samtools",
    threads: int = 1,
) -> Path:
    """Write SAM records (lines without newline) as a BAM; sort and index it unless told not to."""
    path = Path(path)
    header = sam_header(references, sort_order=sort_order).splitlines()
    write_bam_sync(samtools, itertools.chain(header, records), path, sort=sort, threads=threads)
    if index:
        index_sync(samtools, path)
    return path


def random_records(
    references: Sequence[Reference],
    reads: int,
    *,
    unplaced: int = 0,
    read_length: int = 150,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> Iterator[str]:
    """Coordinate-sorted random reads (``reads`` in all, spread by length or ``weights``), then
    ``unplaced`` unmapped reads with no position."""
    rng = random.Random(seed)
    share = list(weights) if weights is not None else [float(ref.length) for ref in references]
    total_share = sum(share) or 1.0
    flags, flag_weights = zip(*FLAG_MIX, strict=True)
    serial = 0
    for ref, part in zip(references, share, strict=True):
        n = round(reads * part / total_share)
        span = max(ref.length - read_length, 1)
        positions = sorted(rng.randrange(1, span + 1) for _ in range(n))
        chosen = rng.choices(flags, flag_weights, k=n)
        for position, flag in zip(positions, chosen, strict=True):
            serial += 1
            seq, qual = _random_bases(rng, read_length)
            if flag & 0x4:
                yield f"q{serial}\t{flag}\t{ref.name}\t{position}\t0\t*\t=\t{position}\t0\t{seq}\t{qual}"
            else:
                mapq = rng.randrange(0, 61)
                yield f"q{serial}\t{flag}\t{ref.name}\t{position}\t{mapq}\t{read_length}M\t*\t0\t0\t{seq}\t{qual}"
    for _ in range(unplaced):
        serial += 1
        seq, qual = _random_bases(rng, read_length)
        yield f"u{serial}\t4\t*\t0\t0\t*\t*\t0\t0\t{seq}\t{qual}"


def _random_bases(rng: random.Random, length: int) -> tuple[str, str]:
    noise = rng.randbytes(2 * length)
    return noise[:length].translate(_BASES).decode(), noise[length:].translate(_QUALS).decode()


def demo_bam(folder: Path, *, samtools: str = "samtools") -> Path:
    """A small BAM with the shapes that trip up naive counters: ':' and '*' in contig names,
    an empty reference, placed unmapped reads and unplaced reads."""
    shape = "chr1=200000 chr2=120000 chrM=16569 HLA-A*01:01:01:01=3503 chr1:weird=5000 chrUn_empty=4000/empty"
    return _small_bam(folder / "demo.bam", shape, 5_000, unplaced=250, seed=7, sort=False, samtools=samtools)


def tricky_bam(
    folder: Path, *, reads: int = 3000, unplaced: int = 200, seed: int = 1, name: str = "tricky.bam"
) -> Path:
    """Several references, an empty one, ':' and '*' in names, every flag kind, unplaced reads;
    sorted and indexed."""
    shape = "chr1=300000 chr2=150000 chrEmpty=10000/empty HLA-A*01:01:01:01=3503 chr1:weird=8000 chrM=16569"
    return _small_bam(folder / name, shape, reads, unplaced=unplaced, seed=seed, sort=True, samtools="samtools")


def _small_bam(
    path: Path,
    shape: str,
    reads: int,
    *,
    unplaced: int,
    seed: int,
    sort: bool,
    samtools: str,
) -> Path:
    """100-base random reads spread over the references by length; ``shape`` is ``NAME=LENGTH``
    words (names may hold ':' and '*'), ``/empty`` after one that gets no reads."""
    references: list[Reference] = []
    weights: list[float] = []
    for word in shape.split():
        name, _, size = word.rpartition("=")
        length, _, empty = size.partition("/")
        references.append(Reference(name, int(length)))
        weights.append(0 if empty else int(length))
    path.parent.mkdir(parents=True, exist_ok=True)
    records = random_records(references, reads, unplaced=unplaced, read_length=100, seed=seed, weights=weights)
    return write_bam(path, references, records, sort=sort, samtools=samtools)
