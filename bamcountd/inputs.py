"""What the input is, and the checks on it that need no samtools: a local file or a URL
(:data:`Input`), its existence, readability, magic and (for a URL) EOF marker, and where the
index is (next to the BAM, given, or cached).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bamcountd.cramfile import EOF_CONTAINER
from bamcountd.errors import BadReference, BamNotFound, CorruptBam, RemoteUnsupported
from bamcountd.samtools import Header
from bamcountd.urls import Url, looks_like_url

#: A count's input: a local file, or an object's URL (which never becomes a Path).
Input = Path | Url

_BGZF_MAGIC = b"\x1f\x8b\x08\x04"
_CRAM_MAGIC = b"CRAM"
_CRAM_MAJORS = (2, 3)  # what samtools 1.10+ reads (3.1 included)
# The last bytes of a whole file: BGZF's empty block, and CRAM 3's EOF container (cramfile; a
# CRAM 2.1's differs, and is left to samtools quickcheck).
_BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def parse_input(value: str | Path | Url) -> Input:
    """A URL (``scheme://``) or a local path; a URL of a scheme samtools cannot read is refused,
    never taken for a file name.

    :raises RemoteUnsupported: a URL that samtools cannot read, or that names no object
    """
    if isinstance(value, Url | Path):
        return value
    if looks_like_url(value):
        try:
            return Url(value)
        except ValueError as error:
            raise RemoteUnsupported(str(error)) from None
    return Path(value)


class Checked(NamedTuple):
    """A readable input: its absolute path, and whether it is a CRAM (else a BAM)."""

    path: Path
    cram: bool


def check_bam_file(path: Path) -> Checked:
    """The absolute path of a readable BAM or CRAM, and which it is, or raise naming the file
    and cause."""
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
    return Checked(absolute, sniff(first_block, str(path)))


def sniff(first_block: bytes, name: str) -> bool:
    """True for a CRAM's first bytes, False for a BAM's; raise for anything else.

    :raises CorruptBam: empty, SAM text, or not an alignment file at all
    """
    if not first_block:
        raise CorruptBam(f"{name}: the file is empty")
    if first_block[:4] == _CRAM_MAGIC:
        if len(first_block) < 6 or first_block[4] not in _CRAM_MAJORS:
            raise CorruptBam(f"{name}: CRAM version {'.'.join(map(str, first_block[4:6]))} is not supported")
        return True
    if first_block[:4] != _BGZF_MAGIC or _first_block_payload(first_block)[:4] != b"BAM\x01":
        raise CorruptBam(f"{name}: not a BAM or CRAM file (no BGZF/BAM or CRAM magic); SAM is not supported")
    return False


def check_remote_bytes(url: Url, head: bytes, tail: bytes) -> bool:
    """True for a CRAM's, False for a BAM's first bytes; the last bytes must be the EOF marker
    of a whole file (as samtools quickcheck checks a local one).

    :raises CorruptBam: not a BAM or CRAM, or cut short
    """
    cram = sniff(head, str(url))
    if cram and head[4] == 3 and not tail.endswith(EOF_CONTAINER):
        raise CorruptBam(f"{url}: the CRAM has no EOF container at its end: it is truncated (or still being written)")
    if not cram and not tail.endswith(_BGZF_EOF):
        raise CorruptBam(f"{url}: the BAM has no BGZF EOF marker at its end: it is truncated (or still being written)")
    return cram


def remote_index_candidates(url: Url, *, cram: bool) -> list[Url]:
    """Where an index next to ``url`` may be, in samtools' order (``x.bam.bai``, ``x.bam.csi``,
    ``x.bai``, ``x.csi``; ``x.cram.crai``, ``x.crai``): with this URL's query string first (a
    token for the whole folder), then without."""
    suffixes = (".crai",) if cram else (".bai", ".csi")
    stem = ".cram" if cram else ".bam"
    queries = (True, False) if "?" in url.secret else (False,)
    found: list[Url] = []
    for keep in queries:
        found += [url.with_suffix_added(suffix, keep_query=keep) for suffix in suffixes]
        for suffix in suffixes:
            replaced = url.with_path_suffix_replaced(stem, suffix, keep_query=keep)
            if replaced is not None:
                found.append(replaced)
    return found


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


def find_index(bam: Path, given: Path | None = None, *, cram: bool = False) -> IndexLookup:
    """The user's index, or one next to the BAM (``.bai``, ``.csi``) or CRAM (``.crai``) as
    samtools would find it."""
    if given is not None:
        candidate = Path(os.path.abspath(given))
        if not candidate.is_file():
            raise BamNotFound(f"{given}: index file not found")
        return IndexLookup(candidate, _older(candidate, bam))
    stem = bam.with_suffix("")
    suffixes = (".crai",) if cram else (".bai", ".csi")
    candidates = [bam.with_name(bam.name + suffix) for suffix in suffixes]
    candidates += [stem.with_name(stem.name + suffix) for suffix in suffixes]
    for candidate in candidates:
        if candidate.is_file():
            return IndexLookup(candidate, _older(candidate, bam))
    return IndexLookup(None, False)


def check_reference(reference: Path, header: Header, bam: Path | Url) -> None:
    """The user's FASTA has an index (``.fai``, as htslib needs) naming every reference of the
    CRAM's header with its length.  Its bases are not hashed against the header's M5: no count
    decodes a base, so none is read.

    :raises BadReference: missing, unindexed, or another assembly's
    """
    fai = reference.with_name(reference.name + ".fai")
    try:
        text = fai.read_text("utf-8", "replace")
    except FileNotFoundError:
        raise BadReference(f"{reference}: the reference has no index {fai.name}; run `samtools faidx` on it") from None
    except OSError as error:
        raise BadReference(f"{fai}: cannot read the reference's index ({error.strerror})") from None
    lengths: dict[str, str] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("\t")
        lengths[name] = rest.partition("\t")[0]
    for ref in header.references:
        found = lengths.get(ref.name)
        if found != str(ref.length):
            has = "lacks it" if found is None else f"says {found}"
            raise BadReference(
                f"{bam}: the reference {reference} is not this CRAM's: its header has {ref.name} of length "
                f"{ref.length}, the reference {has}"
            )


def _older(index: Path, bam: Path) -> bool:
    return index.stat().st_mtime_ns < bam.stat().st_mtime_ns


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bamcountd" / "index"


def cached_index_path(
    bam: Path | Url, cache_dir: Path, *, csi: bool, cram: bool = False, identity: str | None = None
) -> Path:
    """A cache name tied to the BAM's identity, so a replaced BAM never reuses an old index: a
    file's device, inode, size and time; an object's URL without its query (no secret) and
    ``identity`` (its size, ETag and Last-Modified)."""
    import hashlib  # here, not at the top: loading it is 3-5 ms of every start, and few counts build an index

    if isinstance(bam, Url):
        assert identity is not None  # an object known by its size alone is indexed in its count's own folder
        identity = f"{bam.without_query}\0{identity}"
    else:
        identity = _identity_of(bam)
    digest = hashlib.sha256(os.fsencode(identity)).hexdigest()[:32]
    return cache_dir / f"{digest}.{'crai' if cram else 'csi' if csi else 'bai'}"


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

    @classmethod
    def of_object(cls, url: Url, key: str, index: Path, cache_dir: Path, samtools_version: str) -> Verdict:
        """The proof for an object (its URL without the query, its size, ETag and Last-Modified:
        ``key``) and the index it was counted through (by content: a URL's index is fetched
        anew by each count)."""
        import hashlib

        digest = hashlib.sha256(index.read_bytes()).hexdigest()
        identity = os.fsencode(f"{url.without_query}\0{key}\0{digest}\0{samtools_version}")
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
