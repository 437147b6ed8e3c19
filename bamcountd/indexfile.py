"""What bamcountd reads from a BAI or CSI index itself: whether it carries per-reference
statistics (htslib's pseudo-bin) and the count of unplaced reads (the optional ``n_no_coor``
at its end), which ``samtools idxstats`` prints as zeros when absent.

bamtools writes indexes without statistics; their region queries work, but nothing in them can
check a count.  Only asked when idxstats's numbers do not fit the data.
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
    shape = _shape(index)
    return shape is not None and shape[0] and not shape[1]


def lacks_unplaced_count(index: Path) -> bool:
    """True if the index ends without ``n_no_coor``, so its count of unplaced reads is unknown."""
    shape = _shape(index)
    return shape is not None and not shape[2]


def _shape(index: Path) -> tuple[bool, bool, bool] | None:
    """(lists bins, has statistics, records n_no_coor), or None if it cannot be read."""
    try:
        data = index.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if data[:4] == b"BAI\x01":
            return _bai_shape(data)
        if data[:4] == b"CSI\x01":
            return _csi_shape(data)
    except (OSError, EOFError, zlib.error, struct.error, IndexError):
        return None
    return None


def _bai_shape(data: bytes) -> tuple[bool, bool, bool]:
    (n_ref,) = struct.unpack_from("<i", data, 4)
    offset = 8
    binned = statistics = False
    for _ in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", data, offset)
        offset += 4
        for _ in range(n_bin):
            bin_id, n_chunk = struct.unpack_from("<Ii", data, offset)
            statistics = statistics or bin_id == _BAI_PSEUDO_BIN
            binned = True
            offset += 8 + 16 * n_chunk
        (n_intv,) = struct.unpack_from("<i", data, offset)
        offset += 4 + 8 * n_intv
    return binned, statistics, len(data) >= offset + 8


def _csi_shape(data: bytes) -> tuple[bool, bool, bool]:
    _, depth, l_aux = struct.unpack_from("<iii", data, 4)
    pseudo_bin = ((1 << (3 * (depth + 1))) - 1) // 7 + 1
    offset = 16 + l_aux
    (n_ref,) = struct.unpack_from("<i", data, offset)
    offset += 4
    binned = statistics = False
    for _ in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", data, offset)
        offset += 4
        for _ in range(n_bin):
            bin_id, _, n_chunk = struct.unpack_from("<IQi", data, offset)
            statistics = statistics or bin_id == pseudo_bin
            binned = True
            offset += 16 + 16 * n_chunk
    return binned, statistics, len(data) >= offset + 8
