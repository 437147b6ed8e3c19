"""Pruning a folder of cached indexes (named by :func:`bamcountd.inputs.cached_index_path`).

Only a cache that is its owner's own folder is pruned: ``cache`` is the folder counts use,
``own`` the folder the caller owns; a cache set elsewhere may be shared, so it is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from bamcountd.inputs import Verdict, cached_index_path

#: (csi, cram) of every index kind the cache may hold: BAI, CSI, CRAI.
INDEX_KINDS = ((False, False), (True, False), (False, True))


def prune(cache: Path | None, own: Path, keep_for: Iterable[Path]) -> int:
    """Remove every file in ``own`` but the indexes of the BAMs in ``keep_for`` (read only if
    the cache is ``own`` and exists); the number removed."""
    if cache != own or not own.is_dir():
        return 0
    keep: set[Path] = set()
    for bam in keep_for:
        keep.update(cached_index_path(bam, own, csi=csi, cram=cram) for csi, cram in INDEX_KINDS)
    removed = 0
    for path in own.iterdir():
        if path not in keep and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def drop_built(index: Path, cache: Path | None, own: Path, *, proof_of: tuple[Path, str] | None = None) -> None:
    """Remove ``index`` if it is in ``own`` (and ``cache`` is ``own``), and the proof that its
    queries reach every record of ``proof_of`` (the BAM, the samtools version)."""
    if cache != own:
        return
    if proof_of is not None:
        with contextlib.suppress(OSError):  # its name comes from both files' identities
            Verdict.of(proof_of[0], index, own, proof_of[1]).path.unlink(missing_ok=True)
    if index.parent == own:
        index.unlink(missing_ok=True)
