"""The watch-folder daemon: detection, settling, scheduling, counting, results, stopping.

One event loop runs four kinds of task:

* the event watcher and the periodic full rescan feed paths into ``_observed``;
* the scheduler loop (every ``TICK`` seconds) records what it observed in the ledger, moves
  files that have settled to ``queued``, starts up to ``max_files`` counts (oldest first),
  and reports (systemd status and watchdog, metrics, the /healthz heartbeat);
* one worker per BAM being counted, all sharing one capacity limiter for samtools processes;
* the signal handler: SIGHUP reloads the settings that can change safely and rescans,
  SIGTERM/SIGINT stop.

Stopping: no new work; running counts get ``drain_seconds`` to finish, then are cancelled
(which kills their samtools processes, see :func:`bamcountd.samtools.run`) and put back to
``queued`` in the ledger, which is then closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import stat
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from bamcountd import __version__, plan, samtools
from bamcountd.count import CountRequest, count_bam
from bamcountd.errors import (
    BadOption,
    BamcountdError,
    ConfigError,
    CorruptBam,
    IndexMismatch,
    InputError,
    SamtoolsNotFound,
    leaf_exceptions,
)
from bamcountd.inputs import Verdict, cached_index_path
from bamcountd.service import results as results_files
from bamcountd.service.config import EXTRA_FORMATS, ServiceConfig
from bamcountd.service.ledger import Entry, Identity, Ledger
from bamcountd.service.metrics import Metrics, MetricsServer
from bamcountd.service.notify import Notifier
from bamcountd.service.watch import WatchRoot, events, locate, scan

log = structlog.get_logger("bamcountd.service")

TICK = 0.2
#: Errors that are the same on every try for the same bytes: no retry until the file changes.
PERMANENT = (InputError, CorruptBam, IndexMismatch)
#: Errors that no BAM can fix: the daemon stops (exit 2 for a bad option, 1 without samtools).
FATAL = (BadOption, SamtoolsNotFound)
#: The error file's ``kind`` for an unexpected exception in one BAM's count (a bug, not the data).
INTERNAL = "InternalError"


@dataclass
class _Running:
    entry: Entry
    scope: anyio.CancelScope


#: Settings a reload cannot change: the daemon's folders and its listening socket.
_RESTART_KEYS = ("watch", "results", "state", "metrics_addr")


def watch_roots(config: ServiceConfig) -> tuple[WatchRoot, ...]:
    real = [Path(os.path.realpath(folder)) for folder in config.watch]
    several = len(real) > 1
    return tuple(WatchRoot(path=folder, prefix=folder.name if several else "") for folder in real)


class Daemon:
    def __init__(
        self,
        config: ServiceConfig,
        ledger: Ledger,
        *,
        notifier: Notifier,
        metrics: Metrics,
        reload: Callable[[], ServiceConfig] | None = None,
    ) -> None:
        self.config = config
        self._reload = reload
        self.ledger = ledger
        self.notifier = notifier
        self.metrics = metrics
        self.roots = watch_roots(config)
        self.results = Path(os.path.realpath(config.results))
        self.limiter = anyio.CapacityLimiter(config.count.jobs)
        self._observed: set[Path] = set()
        self._running: dict[Path, _Running] = {}
        self._stop = anyio.Event()
        self._rescan_now = anyio.Event()
        self._watch_stop = anyio.Event()
        self._drain = True

    # --- life cycle ----------------------------------------------------------------------

    async def run(self) -> None:
        log.info(
            "starting",
            version=__version__,
            watch=[str(root.path) for root in self.roots],
            results=str(self.results),
            ledger=str(self.ledger.path),
            max_files=self.config.max_files,
            jobs=self.config.count.jobs,
        )
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._handle_signals, signals)
                async with anyio.create_task_group() as workers:
                    async with anyio.create_task_group() as service:
                        service.start_soon(self._watch_events)
                        # One step of the watcher task registers its inotify watches; the first
                        # scan then catches everything that came before them.
                        await anyio.sleep(0)
                        await self._rescan()
                        service.start_soon(self._rescan_loop)
                        service.start_soon(self._scheduler_loop, workers)
                        self.notifier.ready(self._status())
                        log.info("ready", **self.ledger.counts())
                        await self._stop.wait()
                        self.notifier.stopping("stopping: draining running counts")
                        # The watcher thread notices this within a step; a cancel alone waits
                        # for its next timeout.
                        self._watch_stop.set()
                        service.cancel_scope.cancel()
                    await self._drain_workers()
                    workers.cancel_scope.cancel()
                outer.cancel_scope.cancel()
        log.info("stopped", **self.ledger.counts())

    def stop(self, *, drain: bool = True) -> None:
        self._drain = self._drain and drain
        self._stop.set()

    async def _handle_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("rescan_requested", signal="SIGHUP")
                self._reload_config()
                self._rescan_now.set()
            else:
                name = signal.Signals(signum).name
                # A second stop signal skips the drain.
                log.info("stop_requested", signal=name, drain=not self._stop.is_set())
                self.stop(drain=not self._stop.is_set())
                if not self._drain:
                    for running in self._running.values():
                        running.scope.cancel()

    def _reload_config(self) -> None:
        """Re-read flags, environment and file; apply what can change while running.

        The folders (watch, results, state) and the metrics address need a restart; a bad new
        configuration is logged and the running one kept (the daemon must not die of a typo).
        """
        if self._reload is None:
            return
        try:
            new = self._reload()
        except ConfigError as error:
            log.error("reload_failed", error=str(error), action="keeping the running configuration")
            return
        old = self.config
        fixed = [key for key in _RESTART_KEYS if getattr(new, key) != getattr(old, key)]
        if fixed:
            log.warning("reload_needs_restart", keys=fixed, action="keeping their running values")
        count = new.count if new.state == old.state else replace(new.count, index_cache=old.count.index_cache)
        kept = {key: getattr(old, key) for key in _RESTART_KEYS}
        new = replace(new, count=count, **kept)
        changed = [f.name for f in fields(new) if f.name != "count" and getattr(new, f.name) != getattr(old, f.name)]
        changed += [
            f"count.{spec.name}" for spec in fields(count) if getattr(old.count, spec.name) != getattr(count, spec.name)
        ]
        self.config = new
        self.limiter.total_tokens = new.count.jobs
        log.info("config_reloaded", changed=changed)

    async def _drain_workers(self) -> None:
        if self._running and self._drain and self.config.drain_seconds > 0:
            log.info("draining", running=len(self._running), seconds=self.config.drain_seconds)
            with anyio.move_on_after(self.config.drain_seconds):
                while self._running and self._drain:
                    await anyio.sleep(0.05)
        if self._running:
            log.info("cancelling", running=len(self._running))

    # --- detection -----------------------------------------------------------------------

    async def _watch_events(self) -> None:
        """Feed file events to the scheduler; if the watcher fails, rescans carry on alone
        until it is restarted (watchfiles fails, for one, on a name that is not UTF-8)."""
        delay = 1.0
        while not self._stop.is_set():
            stop = self._watch_stop = anyio.Event()
            try:
                async for batch in events(self.roots, stop):
                    self._observed.update(batch)
                    delay = 1.0
            except Exception as error:  # the watcher's own errors have no common base class
                log.warning(
                    "watcher_failed",
                    error=str(error),
                    kind=type(error).__name__,
                    action=f"relying on rescans, restarting the watcher in {delay:g} s",
                )
                self._rescan_now.set()
            finally:
                stop.set()
            await anyio.sleep(delay)
            delay = min(delay * 2, max(self.config.rescan_interval, 1.0))

    async def _rescan_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.config.rescan_interval):
                await self._rescan_now.wait()
            self._rescan_now = anyio.Event()
            await self._rescan()

    async def _rescan(self) -> None:
        found: set[Path] = set()
        for root in self.roots:
            found.update(await anyio.to_thread.run_sync(partial(_scan_list, root.path)))
        self._observed.update(found)
        # Files that vanished without an event (or while the daemon was down).
        for entry in self.ledger.entries():
            if entry.path not in found and entry.path not in self._running and not _exists(entry.path):
                self._forget(entry.path, entry.state)
        log.debug("rescanned", files=len(found))

    def _forget(self, path: Path, state: str) -> None:
        self.ledger.forget(path)
        if state != "done":
            log.info("dropped", file=os.fsdecode(path), reason="the file is gone", state=state)

    def _take_observed(self) -> None:
        observed, self._observed = self._observed, set()
        for path in observed:
            root = locate(self.roots, path)
            if root is None:
                continue
            identity = _identity(path)
            running = self._running.get(path)
            if running is not None:
                if identity != running.entry.identity:
                    log.info("changed_during_count", file=os.fsdecode(path), gone=identity is None)
                    running.scope.cancel()  # the worker re-reads the file's identity
                continue
            if identity is None:
                entry = self.ledger.get(path)
                if entry is not None:
                    self._forget(path, entry.state)
            elif self.ledger.observe(path, root.path, identity):
                log.debug("seen", file=os.fsdecode(path), size=identity.size)

    # --- scheduling ----------------------------------------------------------------------

    async def _scheduler_loop(self, workers: TaskGroup) -> None:
        while True:
            self._take_observed()
            self._settle()
            self._dispatch(workers)
            self._report()
            await anyio.sleep(TICK)

    def _settle(self) -> None:
        for entry in self.ledger.settled(seen_before=time.time() - self.config.settle):
            identity = _identity(entry.path)
            if identity is None:
                self._forget(entry.path, entry.state)
            elif identity != entry.identity:
                self.ledger.observe(entry.path, entry.root, identity)  # still being written
            elif self.ledger.queue(entry.path, identity):
                log.info("queued", file=os.fsdecode(entry.path), size=identity.size)

    def _dispatch(self, workers: TaskGroup) -> None:
        free = self.config.max_files - len(self._running)
        if free <= 0 or self._stop.is_set():
            return
        for entry in self.ledger.waiting(now=time.time(), limit=free):
            identity = _identity(entry.path)
            if identity is None:
                self._forget(entry.path, entry.state)
            elif identity != entry.identity:
                self.ledger.observe(entry.path, entry.root, identity)
            elif self.ledger.start(entry.path, identity):
                running = _Running(entry, anyio.CancelScope())
                self._running[entry.path] = running
                workers.start_soon(self._count, running)

    def _report(self) -> None:
        counts = self.ledger.counts()
        self.metrics.set_states(counts)
        self.metrics.beat()
        self.notifier.status(self._status(counts))
        self.notifier.watchdog()

    def _status(self, counts: Mapping[str, int] | None = None) -> str:
        counts = self.ledger.counts() if counts is None else counts
        return (
            f"{counts['queued'] + counts['failed']} queued, {counts['running']} running, {counts['done']} done, "
            f"{counts['quarantined']} quarantined, {counts['seen']} settling"
        )

    # --- counting ------------------------------------------------------------------------

    async def _count(self, running: _Running) -> None:
        entry = running.entry
        path, identity = entry.path, entry.identity
        root = locate(self.roots, path) or next(r for r in self.roots if r.path == entry.root)
        base = results_files.result_base(self.results, root, path)
        with structlog.contextvars.bound_contextvars(file=os.fsdecode(path)):
            try:
                if await self._adopt(entry, base):
                    return
                log.info("counting", attempt=entry.attempts + 1, size=identity.size)
                started = time.monotonic()
                try:
                    with running.scope:
                        result = await count_bam(CountRequest.of(path, self.config.count), limiter=self.limiter)
                except FATAL:
                    self.ledger.requeue(path, identity)
                    raise
                except BamcountdError as error:
                    if not self._changed(entry):
                        await self._failed(
                            entry, base, str(error), type(error).__name__, permanent=isinstance(error, PERMANENT)
                        )
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
                self._running.pop(path, None)

    async def _adopt(self, entry: Entry, base: Path) -> bool:
        """Mark the file done without counting it if its result is already in place: what a
        crash between the result's rename and the ``done`` commit leaves (see ledger.py).
        True if nothing is left to do (adopted, or the file changed meanwhile)."""
        target = base.with_name(base.name + results_files.COUNTS_SUFFIX)
        reason = await self._not_adoptable(entry, target)
        if reason is not None:
            if reason != "no result":
                log.info("result_not_adopted", result=os.fsdecode(target), reason=reason, action="counting it again")
            return False
        if self._changed(entry):
            return True
        self.ledger.finish(entry.path, entry.identity)
        log.info("result_adopted", result=os.fsdecode(target), reason="this file's result is already in place")
        own = self.config.state / "index"
        for csi in (False, True):
            with contextlib.suppress(OSError):
                self._drop_built_index(cached_index_path(entry.path, own, csi=csi))
        return True

    async def _not_adoptable(self, entry: Entry, target: Path) -> str | None:
        """Why the result file at ``target`` is not this file's result under the current
        settings, or None if it is: same BAM (path, device, inode, size, mtime), same read
        filters, same regions, a well-formed count, and the extra formats in place."""
        try:
            document = json.loads(await anyio.Path(target).read_bytes())
        except FileNotFoundError:
            return "no result"
        except (OSError, ValueError) as error:
            return f"unreadable result ({error})"
        try:
            source = document["source"]
            wanted = results_files.source_document(entry.path, entry.identity)
            for key in ("path", "device", "inode", "size", "mtime_ns"):
                if source[key] != wanted[key]:
                    return f"the result is of another file (source {key} differs)"
            request = CountRequest.of(entry.path, self.config.count)
            if document["filters"] != request.filters.as_dict():
                return "the result was counted with other filters"
            counts = [region["count"] for region in document["regions"]]
            labels = [region["region"] for region in document["regions"]]
            if not all(type(n) is int and n >= 0 for n in counts) or document["total"] != sum(counts):
                return "the result's counts are malformed"
        except (KeyError, TypeError) as error:
            return f"the result is malformed ({type(error).__name__}: {error})"
        for suffix in (EXTRA_FORMATS[fmt] for fmt in self.config.formats):
            extra = target.with_name(target.name[: -len(results_files.COUNTS_SUFFIX)] + suffix)
            try:
                if os.lstat(extra).st_mtime_ns < entry.identity.mtime_ns:
                    return f"{extra.name} is older than the file"
            except OSError:
                return f"{extra.name} is missing"
        # The regions the current settings give for this BAM (every reference and '*' by default).
        try:
            executable = samtools.find(request.samtools)
            async with self.limiter:
                header = await samtools.read_header(executable, entry.path)
            regions = plan.resolve_regions(header, request.regions, request.regions_file)
        except (BamcountdError, OSError) as error:
            return f"cannot resolve the regions ({error})"
        if [region.label for region in regions] != labels:
            return "the result was counted over other regions"
        return None

    def _drop_built_index(self, index: Path, *, proof_of: tuple[Path, str] | None = None) -> None:
        """An index the daemon built into its own folder is no use once the BAM is done, nor is
        the proof that its queries reach every record (each BAM is counted once)."""
        own = self.config.state / "index"
        if self.config.count.index_cache != own:
            return
        if proof_of is not None:
            with contextlib.suppress(OSError):  # its name comes from both files' identities
                Verdict.of(proof_of[0], index, own, proof_of[1]).path.unlink(missing_ok=True)
        if index.parent == own:
            index.unlink(missing_ok=True)

    def _changed(self, entry: Entry) -> bool:
        """After a count: if the file changed or went meanwhile, record that; its result is void."""
        identity = _identity(entry.path)
        if identity == entry.identity:
            return False
        if identity is None:
            self._forget(entry.path, "running")
        else:
            log.info("changed_during_count", action="counted again once it settles")
            self.ledger.observe(entry.path, entry.root, identity)
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


def prune_indexes(config: ServiceConfig, ledger: Ledger) -> int:
    """Remove indexes the daemon built (in ``STATE/index``, its own folder) that no BAM still to
    be counted can use: those of counted, replaced or deleted BAMs, and crash leftovers.  An
    ``index_cache`` set elsewhere may be shared, so it is left alone."""
    cache = config.state / "index"
    if config.count.index_cache != cache or not cache.is_dir():
        return 0
    keep: set[Path] = set()
    for entry in ledger.entries():
        if entry.state != "done" and _identity(entry.path) == entry.identity:
            keep.update(cached_index_path(entry.path, cache, csi=csi) for csi in (False, True))
    removed = 0
    for path in cache.iterdir():
        if path not in keep and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _identity(path: Path) -> Identity | None:
    """The file's identity, or None if it is gone or no longer a regular file."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return Identity.of(info) if stat.S_ISREG(info.st_mode) else None


def _scan_list(root: Path) -> list[Path]:
    return list(scan(root))


def _exists(path: Path) -> bool:
    return _identity(path) is not None


async def serve(
    config: ServiceConfig,
    *,
    reload: Callable[[], ServiceConfig] | None = None,
    started: Callable[[Daemon], None] | None = None,
) -> None:
    """Open the ledger (refusing a second daemon), run until stopped, close everything.

    ``reload`` loads the configuration again (on SIGHUP); ``started`` gets the daemon before it
    runs (tests stop it with :meth:`Daemon.stop`)."""
    # Fail now, not at the first BAM, if there is no usable samtools (exit status 1).
    await samtools.locate(config.count.samtools)
    notifier = Notifier()
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        ledger = Ledger.open(config.state)
        stack.callback(ledger.close)
        stack.callback(notifier.close)
        swept = results_files.sweep_temporaries(config.results)
        if swept:
            log.info("swept_temporaries", files=swept)
        pruned = prune_indexes(config, ledger)
        if pruned:
            log.info("pruned_indexes", files=pruned)
        if config.metrics_addr is not None:
            host, port = config.metrics_addr
            try:
                server = MetricsServer(metrics, host, port, stale_after=max(10 * TICK, 5.0))
            except OSError as error:
                raise BamcountdError(f"--metrics-addr {host}:{port}: cannot listen ({error.strerror})") from None
            server.start()
            stack.callback(server.close)
            log.info("metrics_listening", address=f"{host}:{server.port}")
        daemon = Daemon(config, ledger, notifier=notifier, metrics=metrics, reload=reload)
        if started is not None:
            started(daemon)
        try:
            await daemon.run()
        except BaseExceptionGroup as group:  # task groups wrap what they raise
            raise _reportable(group, ledger.path) from None


def _reportable(group: BaseExceptionGroup[BaseException], ledger: Path) -> BaseException:
    """The error the CLI should report for a failed daemon: ours first, then a ledger failure."""
    leaves = leaf_exceptions(group)
    for leaf in leaves:
        if isinstance(leaf, BamcountdError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, sqlite3.Error):
            return BamcountdError(f"{ledger}: the ledger failed ({leaf})")
    return group
