"""What dx-watch's parts and the platform module share: a file, a source BAM, a poll's tally."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True)
class DxFile:
    """A file as a search or a describe call sees it."""

    id: str
    project: str
    name: str
    folder: str
    size: int
    properties: Mapping[str, str]


@dataclass(frozen=True)
class SourceBam(DxFile):
    """A closed BAM to count, and its index in the same folder."""

    index: str | None  # file ID of its .bai/.csi in the same folder
    index_name: str = ""


@dataclass
class Stats:
    """What one poll did; also the Prometheus metrics' source."""

    seen: int = 0
    launched: int = 0
    counted: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
