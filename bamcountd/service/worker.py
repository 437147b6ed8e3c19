"""The daemon's per-file worker: count one BAM, write its result or error file, and decide
whether a failure is retried (with back-off) or the file quarantined.

One task runs :meth:`Worker.count` per BAM being counted (the scheduler starts it); all share
one capacity limiter for samtools processes.  A count that the scheduler cancels (the file
changed, or the daemon stops) puts the file back in the ledger.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from bamcountd import indexcache
from bamcountd.count import CountRequest, count_bam
from bamcountd.errors import FATAL, PERMANENT, BamcountdError, classify
from bamcountd.ledger import Entry, Ledger
from bamcountd.metrics import DaemonMetrics
from bamcountd.service import results as results_files
from bamcountd.service.config import ServiceConfig
from bamcountd.service.watch import Identity, WatchRoot, locate

log = structlog.get_logger("bamcountd.service")

#: A permanent error (bamcountd.errors.classify: the same on every try for the same bytes) is not
#: retried until the file changes; a fatal one (no BAM can fix it) stops the daemon (exit 2 for a
#: bad option, 1 without samtools).  The error file's ``kind`` for an unexpected exception in one BAM's count (a bug, not the data).
INTERNAL = "InternalError"


@dataclass
class Running:
    entry: Entry
    scope: anyio.CancelScope


def current_identity(path: Path) -> Identity | None:
    """The file's identity, or None if it is gone or no longer a regular file."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return Identity.of(info) if stat.S_ISREG(info.st_mode) else None


def forget(ledger: Ledger, path: Path, state: str) -> None:
    ledger.forget(path)
    if state != "done":
        log.info("dropped", file=os.fsdecode(path), reason="the file is gone", state=state)


@dataclass(kw_only=True)
class Worker:
    """What every count shares: the settings (the scheduler replaces ``config`` on a reload),
    the ledger, the metrics, the samtools limiter, and the counts in progress."""

    config: ServiceConfig
    ledger: Ledger
    metrics: DaemonMetrics
    limiter: anyio.CapacityLimiter
    roots: tuple[WatchRoot, ...]
    results: Path
    in_progress: dict[Path, Running]  # the scheduler's: a count removes itself when it ends

    async def count(self, running: Running) -> None:
        entry = running.entry
        path, identity = entry.path, Identity(entry.identity)
        root = locate(self.roots, path) or next(r for r in self.roots if r.path == entry.root)
        base = results_files.result_base(self.results, root, path)
        with structlog.contextvars.bound_contextvars(file=os.fsdecode(path)):
            try:
                if await results_files.adopt(
                    entry, base, self.config, self.ledger, self.limiter, changed=self._changed
                ):
                    return
                log.info("counting", attempt=entry.attempts + 1, size=identity.stat.size)
                started = time.monotonic()
                try:
                    with running.scope:
                        result = await count_bam(CountRequest.of(path, self.config.count), limiter=self.limiter)
                except BamcountdError as error:
                    if classify(error) == FATAL:
                        self.ledger.requeue(path, identity)
                        raise
                    if not self._changed(entry):
                        permanent = classify(error) == PERMANENT
                        await self._failed(entry, base, str(error), type(error).__name__, permanent=permanent)
                    return
                except Exception as error:  # a bug somewhere in the count: this BAM fails, the daemon goes on
                    reason = f"internal error: {type(error).__name__}: {error}"
                    log.error("count_crashed", error=reason, kind=type(error).__name__, exc_info=True)
                    if not self._changed(entry):
                        await self._failed(entry, base, reason, INTERNAL, permanent=False)
                    return
                if running.scope.cancelled_caught:
                    if not self._changed(entry):  # a second stop signal
                        self.ledger.requeue(path, identity)
                    return
                if self._changed(entry):
                    return
                document = results_files.counts_document(result, path, identity)
                try:
                    written = await anyio.to_thread.run_sync(
                        results_files.write_counts, base, self.results, result, document, self.config.formats
                    )
                except OSError as error:
                    self._write_failed(entry, base, error)
                    return
                # Only now, with the result durably in place, is the file done (see ledger.py).
                self.ledger.finish(path, identity)
                if result.index is not None:  # None: counted in one pass, without an index
                    self._drop_built_index(result.index, proof_of=(path, result.samtools_version))
                self.metrics.counted.inc()
                self.metrics.regions.inc(len(result.regions))
                self.metrics.duration.observe(time.monotonic() - started)
                log.info("done", result=os.fsdecode(written), total=result.total, regions=len(result.regions))
            except anyio.get_cancelled_exc_class():
                self.ledger.requeue(path, identity)
                log.info("requeued", reason="stopping")
                raise
            finally:
                self.in_progress.pop(path, None)

    def _drop_built_index(self, index: Path, *, proof_of: tuple[Path, str] | None = None) -> None:
        """An index the daemon built into its own folder is no use once the BAM is done, nor is
        the proof that its queries reach every record (each BAM is counted once)."""
        own = self.config.state / "index"
        indexcache.drop_built(index, self.config.count.index_cache, own, proof_of=proof_of)

    def _changed(self, entry: Entry) -> bool:
        """After a count: if the file changed or went meanwhile, record that; its result is void."""
        identity = current_identity(entry.path)
        if identity == entry.identity:
            return False
        if identity is None:
            forget(self.ledger, entry.path, "running")
        else:
            log.info("changed_during_count", action="counted again once it settles")
            self.ledger.observe(entry.path, entry.root, identity, sort_key=identity.stat.mtime_ns)
        return True

    async def _failed(self, entry: Entry, base: Path, reason: str, kind: str, *, permanent: bool) -> None:
        self.metrics.failures.labels(kind).inc()
        attempts = entry.attempts + 1
        if not permanent and attempts < self.config.retries:
            delay = self.config.retry_delay * 2 ** (attempts - 1)
            self.ledger.fail(entry.path, entry.identity, reason, retry_at=time.time() + delay)
            log.warning("count_failed", error=reason, kind=kind, attempts=attempts, retry_in=delay)
            return
        document = results_files.error_document(entry.path, entry.identity, reason=reason, attempts=attempts, kind=kind)
        try:
            written = await anyio.to_thread.run_sync(results_files.write_error, base, self.results, document)
        except OSError as write_error:
            self._write_failed(entry, base, write_error)
            return
        self.ledger.quarantine(entry.path, entry.identity, reason)
        log.error("quarantined", error=reason, kind=kind, attempts=attempts, permanent=permanent, result=str(written))

    def _write_failed(self, entry: Entry, base: Path, error: OSError) -> None:
        delay = max(self.config.retry_delay, 1.0)
        self.ledger.requeue(entry.path, entry.identity, not_before=time.time() + delay, error=str(error))
        log.error(
            "result_write_failed",
            result=os.fsdecode(base) + ".*",
            error=error.strerror or str(error),
            errno=error.errno,
            action=f"requeued, retry in {delay:g} s",
        )
