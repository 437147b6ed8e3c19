"""bamcountd: exact, parallel read counts of BAM files per region, with samtools."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    __version__: str
    from bamcountd.count import CountRequest, CountResult, RegionCount, count_bam, count_bam_sync
    from bamcountd.errors import BamcountdError, InputError
    from bamcountd.options import Filters


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bamcountd")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata costs more than a count's own start-up
        globals()[name] = _version()
        return globals()[name]
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bamcountd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
