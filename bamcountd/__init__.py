"""bamcountd: exact, parallel read counts of BAM files per region, with samtools."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

# The public names load on first use, so that `bamcountd --help` and the sub-modules that do
# not count (the service's config, the results) do not pay for anyio and structlog.
_HOMES = {
    "BamcountdError": "bamcountd.errors",
    "InputError": "bamcountd.errors",
    "CountRequest": "bamcountd.count",
    "CountResult": "bamcountd.count",
    "RegionCount": "bamcountd.count",
    "count_bam": "bamcountd.count",
    "count_bam_sync": "bamcountd.count",
    "Filters": "bamcountd.options",
}

if TYPE_CHECKING:
    from bamcountd.count import CountRequest, CountResult, RegionCount, count_bam, count_bam_sync
    from bamcountd.errors import BamcountdError, InputError
    from bamcountd.options import Filters


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bamcountd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
