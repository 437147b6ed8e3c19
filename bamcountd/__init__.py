"""bamcountd: exact, parallel read counts of BAM files per region, with samtools."""

from __future__ import annotations

from bamcountd.count import CountRequest, CountResult, RegionCount, count_bam, count_bam_sync
from bamcountd.errors import BamcountdError, InputError
from bamcountd.samtools import Filters

__version__ = "0.1.0"

__all__ = [
    "BamcountdError",
    "CountRequest",
    "CountResult",
    "Filters",
    "InputError",
    "RegionCount",
    "__version__",
    "count_bam",
    "count_bam_sync",
]
