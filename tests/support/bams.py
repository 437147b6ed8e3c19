"""Test BAMs made with real samtools (or byte by byte), and the oracle every asserted count is
checked against.  The random BAMs themselves come from :mod:`bamcountd.synth`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bamcountd.options import Filters

SAMTOOLS = shutil.which("samtools") or "samtools"

#: The issue's filters: samtools' words for each, and bamcountd's.
FILTER_CASES = {
    "none": ((), Filters()),
    "F904_q20": (("-F", "0x904", "-q", "20"), Filters(exclude_flags=0x904, min_mapq=20)),
    "f2": (("-f", "2"), Filters(require_flags=2)),
    "G900": (("-G", "0x900"), Filters(exclude_all_flags=0x900)),
}


def samtools_count(
    bam: Path | str, *args: str, index: Path | None = None, reference: Path | None = None, cwd: Path | None = None
) -> int:
    """The oracle: ``samtools view -c [args] BAM`` (args may end with one region), checked; a
    CRAM is decoded whole, with ``reference`` when it needs one.  ``bam`` may be a URL (then
    run in ``cwd``, where htslib may leave the index it downloads)."""
    options = [a for a in args if a.startswith("-") or a.isdigit() or a.startswith("0x")]
    argv = [SAMTOOLS, "view", "-c", *args[: len(options)]]
    if reference is not None:
        argv += ["--reference", str(reference)]
    if index is not None and args[len(options) :]:  # -X needs a region; a whole-file count needs no index
        argv += ["-X", str(bam), str(index), *args[len(options) :]]
    else:
        argv += [str(bam), *args[len(options) :]]
    completed = subprocess.run(argv, capture_output=True, check=True, cwd=cwd)
    assert completed.stderr == b"", completed.stderr
    return int(completed.stdout)


def oracle(
    bam: Path, regions: Sequence[str], filters: Sequence[str] = (), *, reference: Path | None = None
) -> dict[str, int]:
    """samtools' own count for each region (names quoted with braces when needed)."""
    counts: dict[str, int] = {}
    for region in regions:
        if region == "*" and _no_records(bam):
            # samtools cannot seek to "*" in a file without records ("invalid region"); the
            # whole-file count is then samtools' answer for the unplaced reads.
            counts[region] = samtools_count(bam, *filters, reference=reference)
            continue
        arg = region if region == "*" or region.startswith("{") else "{" + region + "}"
        counts[region] = samtools_count(bam, *filters, arg, reference=reference)
    return counts


def write_fasta(path: Path, bam: Path, *, seed: int = 0) -> Path:
    """Random bases for every reference of ``bam``'s header, with its ``.fai``."""
    import random

    rng = random.Random(seed)
    lengths = dict(_header_lengths(bam))
    with open(path, "w") as out:
        for name, length in lengths.items():
            bases = rng.randbytes(length).translate(bytes.maketrans(bytes(range(256)), b"ACGT" * 64)).decode()
            out.write(f">{name}\n" + "".join(bases[i : i + 60] + "\n" for i in range(0, length, 60)))
    subprocess.run([SAMTOOLS, "faidx", str(path)], check=True)
    return path


def _header_lengths(bam: Path) -> list[tuple[str, int]]:
    text = subprocess.run([SAMTOOLS, "view", "-H", str(bam)], capture_output=True, check=True, text=True).stdout
    pairs = []
    for line in text.splitlines():
        if line.startswith("@SQ"):
            fields = dict(f.split(":", 1) for f in line.split("\t")[1:])
            pairs.append((fields["SN"], int(fields["LN"])))
    return pairs


def write_cram(
    bam: Path, cram: Path, *, reference: Path | None, index: bool = True, slice_reads: int | None = None
) -> Path:
    """``bam`` as a CRAM: compressed against ``reference``, or without one (``no_ref``), with
    ``slice_reads`` records a container (samtools' default: 10,000)."""
    how = ["--reference", str(reference)] if reference is not None else ["--output-fmt-option", "no_ref"]
    if slice_reads is not None:
        how += ["--output-fmt-option", f"seqs_per_slice={slice_reads}"]
    subprocess.run([SAMTOOLS, "view", "--no-PG", "-C", *how, "-o", str(cram), str(bam)], check=True)
    if index:
        subprocess.run([SAMTOOLS, "index", str(cram)], check=True)
    return cram


def _no_records(bam: Path) -> bool:
    stats = subprocess.run([SAMTOOLS, "idxstats", str(bam)], capture_output=True, check=True, text=True).stdout
    return all(line.split("\t")[2:] == ["0", "0"] for line in stats.splitlines())


def header_names(bam: Path) -> list[str]:
    text = subprocess.run([SAMTOOLS, "view", "-H", str(bam)], capture_output=True, check=True, text=True).stdout
    return [
        field[3:]
        for line in text.splitlines()
        if line.startswith("@SQ")
        for field in line.split("\t")
        if field.startswith("SN:")
    ]


def bgzf_blocks(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every BGZF block, the empty EOF block last."""
    blocks: list[tuple[int, int]] = []
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset + 16 : offset + 18], "little") + 1
        blocks.append((offset, size))
        offset += size
    return blocks


# --- BAMs written byte by byte, for records no SAM text can express -----------------------------

_BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def bam_records(bam: Path) -> tuple[bytes, list[bytes]]:
    """A BAM's uncompressed header and its records (each with its block_size)."""
    import gzip

    raw = gzip.decompress(bam.read_bytes())
    offset = 8 + int.from_bytes(raw[4:8], "little")
    references = int.from_bytes(raw[offset : offset + 4], "little")
    offset += 4
    for _ in range(references):
        offset += 4 + int.from_bytes(raw[offset : offset + 4], "little") + 4
    header, records = raw[:offset], []
    while offset < len(raw):
        size = 4 + int.from_bytes(raw[offset : offset + 4], "little")
        records.append(raw[offset : offset + size])
        offset += size
    return header, records


def bam_record(name: str, *, flag: int, tid: int, pos: int, bin_: int, seq: str = "ACGT") -> bytes:
    """One BAM record without CIGAR (``pos`` 0-based: -1 is SAM's POS 0)."""
    import struct

    codes = {"A": 1, "C": 2, "G": 4, "T": 8}
    packed = bytes((codes[seq[i]] << 4) | (codes[seq[i + 1]] if i + 1 < len(seq) else 0) for i in range(0, len(seq), 2))
    read_name = name.encode() + b"\0"
    body = struct.pack("<iiBBHHHiiii", tid, pos, len(read_name), 0, bin_, 0, flag, len(seq), -1, -1, 0)
    body += read_name + packed + b"\xff" * len(seq)
    return struct.pack("<i", len(body)) + body


def write_raw_bam(path: Path, header: bytes, records: Sequence[bytes]) -> Path:
    """BGZF-compress a header and records as they are (samtools would normalise some)."""
    import struct
    import zlib

    data = header + b"".join(records)
    blocks = []
    for start in range(0, len(data), 65280):
        chunk = data[start : start + 65280]
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = compressor.compress(chunk) + compressor.flush()
        blocks.append(struct.pack("<4BI2BH2BHH", 31, 139, 8, 4, 0, 0, 255, 6, 66, 67, 2, len(body) + 25))
        blocks.append(body + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
    path.write_bytes(b"".join(blocks) + _BGZF_EOF)
    return path


def samtools_index(bam: Path, out: Path | None = None) -> Path:
    """An index built by samtools itself (the oracle's own, for files with quirky indexes)."""
    out = out if out is not None else Path(str(bam) + ".bai")
    subprocess.run([SAMTOOLS, "index", str(bam), str(out)], check=True, capture_output=True)
    return out


PYSAM_SAMTOOLS = """#!{python}
# samtools as pysam builds it from samtools' own C code (1.22 or newer), run in-process, for
# the code paths that need a newer samtools than the distribution's (view --save-counts).  It
# counts as samtools does: it is no fake.  SAMTOOLS_ARGV_LOG, if set, gets each command line.
import os, shutil, sys, tempfile
import pysam
from pysam.libcutils import _pysam_dispatch
args = sys.argv[1:]
if os.environ.get("SAMTOOLS_ARGV_LOG"):
    with open(os.environ["SAMTOOLS_ARGV_LOG"], "a") as log:
        log.write(" ".join(args) + "\\n")
if args == ["--version-only"]:
    print(f"{{pysam.__samtools_version__}}+htslib-{{pysam.__samtools_version__}}")
    sys.exit(0)
with tempfile.NamedTemporaryFile() as out:  # pysam's own stdout capture is text
    code, err, _ = _pysam_dispatch("samtools", args[0], args[1:], catch_stdout=False, save_stdout=out.name)
    with open(out.name, "rb") as saved:
        shutil.copyfileobj(saved, sys.stdout.buffer)
sys.stdout.flush()
if err:
    sys.stderr.write(err if isinstance(err, str) else err.decode("utf-8", "replace"))
sys.exit(code)
"""


def pysam_samtools(folder: Path) -> Path:
    """An executable samtools of pysam's build (see PYSAM_SAMTOOLS)."""
    script = folder / "pysam-samtools"
    script.write_text(PYSAM_SAMTOOLS.format(python=sys.executable))
    script.chmod(0o755)
    return script
