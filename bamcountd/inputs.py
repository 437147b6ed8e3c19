"""Checks on the input files that need no samtools: existence, readability, BAM magic, and
where the index is (next to the BAM, given, or cached).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bamcountd.errors import BamNotFound, CorruptBam

_BGZF_MAGIC = b"\x1f\x8b\x08\x04"


def check_bam_file(path: Path) -> Path:
    """Return the absolute path of a readable BAM, or raise naming the file and cause."""
    absolute = Path(os.path.abspath(path))
    if "##idx##" in str(absolute):
        raise BamNotFound(f"{path}: the path contains '##idx##', which htslib reads as an index marker")
    try:
        with open(absolute, "rb") as handle:
            first_block = handle.read(65536)
    except FileNotFoundError:
        raise BamNotFound(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BamNotFound(f"{path}: is a directory, not a BAM file") from None
    except PermissionError:
        raise BamNotFound(f"{path}: permission denied") from None
    except OSError as error:
        raise BamNotFound(f"{path}: cannot read ({error.strerror})") from None
    if not first_block:
        raise CorruptBam(f"{path}: the file is empty")
    if first_block[:4] != _BGZF_MAGIC or _first_block_payload(first_block)[:4] != b"BAM\x01":
        raise CorruptBam(f"{path}: not a BAM file (no BGZF/BAM magic); SAM and CRAM are not supported")
    return absolute


def _first_block_payload(data: bytes) -> bytes:
    if len(data) < 18:
        return b""
    block_size = struct.unpack_from("<H", data, 16)[0] + 1
    try:
        return zlib.decompressobj(-15).decompress(data[18:block_size], 8)
    except zlib.error:
        return b""


@dataclass(frozen=True)
class IndexLookup:
    """Where an index is, and whether it can be trusted to describe the BAM."""

    path: Path | None
    stale: bool  # older than the BAM


def find_index(bam: Path, given: Path | None = None) -> IndexLookup:
    """The user's index, or one next to the BAM as samtools would find it."""
    if given is not None:
        candidate = Path(os.path.abspath(given))
        if not candidate.is_file():
            raise BamNotFound(f"{given}: index file not found")
        return IndexLookup(candidate, _older(candidate, bam))
    stem = bam.with_suffix("")
    for candidate in (
        bam.with_name(bam.name + ".bai"),
        bam.with_name(bam.name + ".csi"),
        stem.with_name(stem.name + ".bai"),
        stem.with_name(stem.name + ".csi"),
    ):
        if candidate.is_file():
            return IndexLookup(candidate, _older(candidate, bam))
    return IndexLookup(None, False)


def _older(index: Path, bam: Path) -> bool:
    return index.stat().st_mtime_ns < bam.stat().st_mtime_ns


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bamcountd" / "index"


def cached_index_path(bam: Path, cache_dir: Path, *, csi: bool) -> Path:
    """A cache name tied to the BAM's identity, so a replaced BAM never reuses an old index."""
    import hashlib  # here, not at the top: loading it is 3-5 ms of every start, and few counts build an index

    stat = bam.stat()
    identity = f"{bam}\0{stat.st_dev}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(os.fsencode(identity)).hexdigest()[:32]
    return cache_dir / f"{digest}.{'csi' if csi else 'bai'}"


def _identity_of(path: Path) -> str:
    stat = path.stat()
    return f"{path}\0{stat.st_dev}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}"


class Verdict(NamedTuple):
    """The proof that region queries through ``index`` reach every record of ``bam``.

    Reach is a property of the pair (and of htslib), not of the filters: once one count has
    set every reference's records against the index, later filtered counts of the same pair
    need not count the records they leave out.  The file holds the pair's identity, so a
    changed BAM or index (or another samtools) never finds a proof that is not its own.
    """

    path: Path
    identity: bytes

    @classmethod
    def of(cls, bam: Path, index: Path, cache_dir: Path, samtools_version: str) -> Verdict:
        identity = os.fsencode(f"{_identity_of(bam)}\0{_identity_of(index)}\0{samtools_version}")
        return cls(cache_dir / f"{zlib.crc32(identity):08x}.reach", identity)

    def holds(self) -> bool:
        try:
            return self.path.read_bytes() == self.identity
        except OSError:
            return False

    def record(self) -> bool:
        """Leave the proof behind; False if the cache cannot be written (it is then redone)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            partial.write_bytes(self.identity)
            os.replace(partial, self.path)
        except OSError:
            return False
        return True
