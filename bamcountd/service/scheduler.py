"""The watch-folder daemon's scheduler: detection, settling, dispatch, reporting, signals, stopping.

One event loop runs four kinds of task:

* the event watcher and the periodic full rescan feed paths into ``_observed``;
* the scheduler loop (every ``TICK`` seconds) records what it observed in the ledger, moves
  files that have settled to ``queued``, starts up to ``max_files`` counts (oldest first),
  and reports (systemd status and watchdog, metrics, the /healthz heartbeat);
* one worker per BAM being counted (:mod:`bamcountd.service.worker`), all sharing one
  capacity limiter for samtools processes;
* the signal handler: SIGHUP reloads the settings that can change safely and rescans,
  SIGTERM/SIGINT stop.

Stopping: no new work; running counts get ``drain_seconds`` to finish, then are cancelled
(which kills their samtools processes, see :func:`bamcountd.samtools.run`) and put back to
``queued`` in the ledger, which is then closed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from bamcountd import __version__, indexcache, samtools
from bamcountd.errors import BamcountdError, ConfigError, leaf_exceptions
from bamcountd.ledger import Ledger
from bamcountd.metrics import DaemonMetrics, MetricsServer
from bamcountd.notify import Notifier
from bamcountd.service import results as results_files
from bamcountd.service.config import ServiceConfig
from bamcountd.service.watch import WatchRoot, events, locate, scan
from bamcountd.service.worker import Running, Worker, current_identity, forget

log = structlog.get_logger("bamcountd.service")

#: The daemon's ledger in the state folder (the name 0.1.0 used).
LEDGER_FILE = "ledger.sqlite3"
TICK = 0.2

#: Settings a reload cannot change: the daemon's folders and its listening socket.
_RESTART_KEYS = ("watch", "results", "state", "metrics_addr")


def watch_roots(config: ServiceConfig) -> tuple[WatchRoot, ...]:
    real = [Path(os.path.realpath(folder)) for folder in config.watch]
    several = len(real) > 1
    return tuple(WatchRoot(path=folder, prefix=folder.name if several else "") for folder in real)


class Scheduler:
    def __init__(
        self,
        config: ServiceConfig,
        ledger: Ledger,
        *,
        notifier: Notifier,
        metrics: DaemonMetrics,
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
        self._running: dict[Path, Running] = {}
        self.worker = Worker(
            config=config,
            ledger=ledger,
            metrics=metrics,
            limiter=self.limiter,
            roots=self.roots,
            results=self.results,
            in_progress=self._running,
        )
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
        self.worker.config = new
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
        forget(self.ledger, path, state)

    def _take_observed(self) -> None:
        observed, self._observed = self._observed, set()
        for path in observed:
            root = locate(self.roots, path)
            if root is None:
                continue
            identity = current_identity(path)
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
            elif self.ledger.observe(path, root.path, identity, sort_key=identity.stat.mtime_ns):
                log.debug("seen", file=os.fsdecode(path), size=identity.stat.size)

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
            identity = current_identity(entry.path)
            if identity is None:
                self._forget(entry.path, entry.state)
            elif identity != entry.identity:
                self.ledger.observe(
                    entry.path, entry.root, identity, sort_key=identity.stat.mtime_ns
                )  # still being written
            elif self.ledger.queue(entry.path, identity):
                log.info("queued", file=os.fsdecode(entry.path), size=identity.stat.size)

    def _dispatch(self, workers: TaskGroup) -> None:
        free = self.config.max_files - len(self._running)
        if free <= 0 or self._stop.is_set():
            return
        for entry in self.ledger.waiting(now=time.time(), limit=free):
            identity = current_identity(entry.path)
            if identity is None:
                self._forget(entry.path, entry.state)
            elif identity != entry.identity:
                self.ledger.observe(entry.path, entry.root, identity, sort_key=identity.stat.mtime_ns)
            elif self.ledger.start(entry.path, identity):
                running = Running(entry, anyio.CancelScope())
                self._running[entry.path] = running
                workers.start_soon(self.worker.count, running)

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


def prune_indexes(config: ServiceConfig, ledger: Ledger) -> int:
    """Remove indexes the daemon built (in ``STATE/index``, its own folder) that no BAM still to
    be counted can use: those of counted, replaced or deleted BAMs, and crash leftovers.  An
    ``index_cache`` set elsewhere may be shared, so it is left alone."""
    cache = config.state / "index"
    pending = (
        entry.path
        for entry in ledger.entries()
        if entry.state != "done" and current_identity(entry.path) == entry.identity
    )
    return indexcache.prune(config.count.index_cache, cache, pending)


def _scan_list(root: Path) -> list[Path]:
    return list(scan(root))


def _exists(path: Path) -> bool:
    return current_identity(path) is not None


async def serve(
    config: ServiceConfig,
    *,
    reload: Callable[[], ServiceConfig] | None = None,
    started: Callable[[Scheduler], None] | None = None,
) -> None:
    """Open the ledger (refusing a second daemon), run until stopped, close everything.

    ``reload`` loads the configuration again (on SIGHUP); ``started`` gets the daemon before it
    runs (tests stop it with :meth:`Scheduler.stop`)."""
    # Fail now, not at the first BAM, if there is no usable samtools (exit status 1).
    await samtools.locate(config.count.samtools)
    notifier = Notifier()
    metrics = DaemonMetrics()
    async with AsyncExitStack() as stack:
        ledger = Ledger.open(config.state / LEDGER_FILE, lock=True)
        stack.callback(ledger.close)
        ledger.recover()  # counts a crash or a stop interrupted start again
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
        daemon = Scheduler(config, ledger, notifier=notifier, metrics=metrics, reload=reload)
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
