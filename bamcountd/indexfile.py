"""What bamcountd reads from a BAI or CSI index itself: whether it carries per-reference
statistics (htslib's pseudo-bin), which ``samtools idxstats`` prints as zeros when absent.

bamtools writes indexes without them; their region queries work, but nothing in them can
check a count.  Only asked when idxstats reports no records at all.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

_BAI_PSEUDO_BIN = 37450


def lacks_statistics(index: Path) -> bool:
    """True if the index lists bins for some reference but no statistics for any.

    An index of a BAM without placed reads lists no bins at all, and is not such an index.
    Anything unreadable is left to samtools, which reads the index for every count.
    """
    try:
        data = index.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if data[:4] == b"BAI\x01":
            return _bai_lacks_statistics(data)
        if data[:4] == b"CSI\x01":
            return _csi_lacks_statistics(data)
    except (OSError, EOFError, zlib.error, struct.error, IndexError):
        return False
    return False


def _bai_lacks_statistics(data: bytes) -> bool:
    (n_ref,) = struct.unpack_from("<i", data, 4)
    offset = 8
    binned = False
    for _ in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", data, offset)
        offset += 4
        for _ in range(n_bin):
            bin_id, n_chunk = struct.unpack_from("<Ii", data, offset)
            if bin_id == _BAI_PSEUDO_BIN:
                return False
            binned = True
            offset += 8 + 16 * n_chunk
        (n_intv,) = struct.unpack_from("<i", data, offset)
        offset += 4 + 8 * n_intv
    return binned


def _csi_lacks_statistics(data: bytes) -> bool:
    _, depth, l_aux = struct.unpack_from("<iii", data, 4)
    pseudo_bin = ((1 << (3 * (depth + 1))) - 1) // 7 + 1
    offset = 16 + l_aux
    (n_ref,) = struct.unpack_from("<i", data, offset)
    offset += 4
    binned = False
    for _ in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", data, offset)
        offset += 4
        for _ in range(n_bin):
            bin_id, _, n_chunk = struct.unpack_from("<IQi", data, offset)
            if bin_id == pseudo_bin:
                return False
            binned = True
            offset += 16 + 16 * n_chunk
    return binned
