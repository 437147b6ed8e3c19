"""The watch-folder daemon's public entry: :func:`serve` (the CLI's ``bamcountd serve``).

The daemon is in three parts: :mod:`bamcountd.service.scheduler` (detection, settling,
dispatch, reporting, signals, life cycle), :mod:`bamcountd.service.worker` (one BAM's count
and its result or error file) and :mod:`bamcountd.service.results` (the result files, and
adopting one already in place).
"""

from __future__ import annotations

from bamcountd.service.scheduler import Scheduler, serve

__all__ = ["Scheduler", "serve"]
