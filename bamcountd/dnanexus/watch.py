"""``bamcountd dx-watch``: count every closed BAM that appears in a DNAnexus project folder, once.

Each poll lists the folder's closed ``*.bam`` and ``*.cram`` files (every result page), pairs
each with its index (``.bai``/``.csi``; a CRAM's ``.crai``), and for a BAM not yet handled either launches the applet (output into the results
folder) or, with ``--local``, counts it on this machine (:mod:`.local`) and uploads the result
files.

Exactly once, across restarts and across runners: the ledger (:mod:`.state`) records what
this runner did; properties on the BAM (``bamcountd_job``, ``bamcountd_result``,
``bamcountd_failed``) record it on the platform, and are read before launching; and every
launch carries a nonce derived from the BAM, the applet and the attempt number, so a launch
repeated after a crash (or by a second runner) gets the platform's first job back instead of
a new one.  Launched jobs are followed to ``done``/``failed``; a job that failed for a
reason a retry can fix is relaunched up to ``max_attempts`` times, then marked failed.

This module is the policy: it reaches DNAnexus only through the
:class:`~bamcountd.dnanexus.platform.Platform` it is given (the tests give it an in-memory
one), and never imports dxpy: the platform module is imported for its type only, and by
:func:`run` when the runner starts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from bamcountd.count import CountRequest
from bamcountd.dnanexus import local
from bamcountd.dnanexus.applet import applet_inputs
from bamcountd.dnanexus.model import Json, SourceBam, Stats
from bamcountd.errors import BadOption, BamcountdError, DxAccessDenied, DxAuthFailed, DxUnavailable, one_line
from bamcountd.ledger import Entry, Ledger
from bamcountd.metrics import MetricsServer, WatchMetrics
from bamcountd.notify import Notifier
from bamcountd.options import BY_NAME, CountOptions

if TYPE_CHECKING:
    from bamcountd.dnanexus.platform import Platform

log = structlog.get_logger("bamcountd.dnanexus.watch")

#: dx-watch's ledger in its state folder (the name 0.1.0 used).
LEDGER_FILE = "dx-watch.sqlite"
PROPERTY_JOB = "bamcountd_job"
PROPERTY_RESULT = "bamcountd_result"
PROPERTY_FAILED = "bamcountd_failed"
PROPERTY_SOURCE = "bamcountd_source"
PROPERTY_ATTEMPT = "bamcountd_attempt"
PROPERTY_SOURCE_NAME = "bamcountd_source_name"
#: Failure reasons that a new job cannot fix: the input is at fault.
PERMANENT_REASONS = frozenset({"AppError", "InputError"})
#: What a poll may fail with and the next poll may not: the platform or the network
#: (DxUnavailable, after dxpy's own retries), a transient samtools failure in --local mode.
_TRANSIENT: tuple[type[BaseException], ...] = (OSError, BamcountdError)


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    project: str
    folder: str
    results_folder: str
    state: Path
    recurse: bool = False
    applet: str | None = None  # None: count locally
    count: CountOptions = field(default_factory=CountOptions)  # the applet's inputs, or the local count's
    poll: float = 60.0
    max_attempts: int = 3
    api_retries: int = 4  # dxpy's own retries per API call (it waits 1, 2, 4, … s between them)
    page_size: int = 100
    retry_delay: float = 30.0  # --local: seconds before a failed count is tried again, doubled each time

    def __post_init__(self) -> None:
        """:raises BadOption: a setting that cannot work (named as its flag)"""
        if self.poll <= 0:
            raise BadOption(f"--poll must be positive, not {self.poll}")
        for option, value in (("--folder", self.folder), ("--results-folder", self.results_folder)):
            if not value.startswith("/"):
                raise BadOption(f"{option} {value!r}: a DNAnexus folder path starts with '/'")
        if not self.project.startswith(("project-", "container-")):
            raise BadOption(f"--project {self.project!r}: expected a project ID (project-…)")
        if self.applet is not None and not self.applet.startswith("applet-"):
            raise BadOption(f"--applet {self.applet!r}: expected an applet ID (applet-…)")
        if self.count.index is not None:
            raise BadOption(f"--index {BY_NAME['index'].per_input}")
        if self.applet is not None:
            applet_inputs(self.count)  # refuses what the applet has no input for

    @property
    def applet_input(self) -> Json:
        """The count options as the applet's inputs."""
        return applet_inputs(self.count)

    def local_request(self, bam: Path, index: Path | None) -> CountRequest:
        """A local count of a downloaded BAM and its index (its own cache in the state folder)."""
        cache = self.count.index_cache if self.count.index_cache is not None else self.state / "index-cache"
        return CountRequest.of(bam, replace(self.count, index=index, index_cache=cache))


class Runner:
    def __init__(
        self,
        config: WatchConfig,
        ledger: Ledger,
        platform: Platform,
        *,
        metrics: WatchMetrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.notifier = Notifier() if notifier is None else notifier
        self.config = config
        self.ledger = ledger
        self.platform = platform
        self.metrics = metrics
        self._checked = False

    # --- checks --------------------------------------------------------------------------

    def check_access(self) -> None:
        """Fail fast with a clear message on a bad token, project or applet (exit status 2)."""
        self.platform.check_access(self.config.project, self.config.applet)
        self._checked = True

    # --- one poll --------------------------------------------------------------------------

    def poll_once(self) -> Stats:
        if not self._checked:
            self.check_access()
        stats = Stats()
        for entry in self.ledger.launched():
            self._follow(entry, stats)
        for bam in self.closed_bams():
            stats.seen += 1
            self._handle(bam, stats)
        log.info("polled", **vars(stats))
        if self.metrics is not None:
            self.metrics.record(vars(stats))
        return stats

    def closed_bams(self) -> list[SourceBam]:
        """Every closed BAM in the folder (all result pages), each paired with its index."""
        config = self.config
        where = (config.project, config.folder)
        found = self.platform.find_closed_files(
            *where, pattern=r"\.(bam|cram)$", regexp=True, recurse=config.recurse, page_size=config.page_size
        )
        indexes = {
            (hit.folder, hit.name): (hit.id, hit.name)
            for hit in self.platform.find_closed_files(
                *where, pattern=r"\.(bai|csi|crai)$", regexp=True, recurse=config.recurse, page_size=config.page_size
            )
        }
        bams: list[SourceBam] = []
        for hit in found:
            name, folder = hit.name, hit.folder
            index = next(
                (indexes[(folder, candidate)] for candidate in index_names(name) if (folder, candidate) in indexes),
                None,
            )
            index_id, index_name = index if index is not None else (None, "")
            bams.append(SourceBam(hit.id, hit.project, name, folder, hit.size, hit.properties, index_id, index_name))
        return bams

    def _handle(self, bam: SourceBam, stats: Stats) -> None:
        entry = self.ledger.get(bam.id)
        if entry is not None and entry.state in ("done", "quarantined", "running"):
            return  # launched jobs are followed by poll_once
        if entry is not None and entry.state == "failed" and entry.not_before > time.time():
            return  # a local count that failed waits out its back-off
        bound = log.bind(bam=bam.id, name=bam.name)
        # The platform's record wins: another runner (or this one before a crash) got there first.
        if PROPERTY_RESULT in bam.properties:
            self.ledger.record_done(bam.id, scope=bam.project, name=bam.name, result=bam.properties[PROPERTY_RESULT])
            bound.info("already_counted", result=bam.properties[PROPERTY_RESULT])
            return
        if PROPERTY_FAILED in bam.properties:
            self.ledger.record_failed(
                bam.id, scope=bam.project, name=bam.name, error=bam.properties[PROPERTY_FAILED], attempts=0
            )
            return
        if PROPERTY_JOB in bam.properties:
            job_id = bam.properties[PROPERTY_JOB]
            attempt = int(bam.properties.get(PROPERTY_ATTEMPT, "1"))
            self.ledger.record_launch(bam.id, scope=bam.project, name=bam.name, handle=job_id, attempt=attempt)
            bound.info("adopted_job", job=job_id)
            return
        if self.config.applet is None:
            self._count_locally(bam, stats)
        else:
            self._launch(bam, attempt=1, stats=stats)

    # --- applet mode -----------------------------------------------------------------------

    def _launch(self, bam: SourceBam, *, attempt: int, stats: Stats) -> str:
        assert self.config.applet is not None
        job_input: Json = {
            "mappings_bam": self.platform.dxlink(bam.id, bam.project),
            "input_mode": "stream",
            **self.config.applet_input,
        }
        if bam.index is not None:
            job_input["index_file"] = self.platform.dxlink(bam.index, bam.project)
        job_id = self.platform.run_applet(
            self.config.applet,
            job_input,
            project=self.config.project,
            folder=self.config.results_folder,
            name=f"bamcount {bam.name}",
            properties={PROPERTY_SOURCE: bam.id, PROPERTY_SOURCE_NAME: bam.name},
            # The platform returns the first job for a repeated nonce: no second launch after a
            # crash between this call and the records below, nor by a second runner.
            nonce=f"bamcountd-{bam.id}-{self.config.applet}-{attempt}",
        )
        self.platform.set_properties(bam.id, bam.project, {PROPERTY_JOB: job_id, PROPERTY_ATTEMPT: str(attempt)})
        self.ledger.record_launch(bam.id, scope=bam.project, name=bam.name, handle=job_id, attempt=attempt)
        stats.launched += 1
        log.info("launched", bam=bam.id, name=bam.name, job=job_id, attempt=attempt)
        return job_id

    def _follow(self, entry: Entry, stats: Stats) -> None:
        assert entry.handle is not None
        job = self.platform.describe_job(entry.handle)
        state = job.state
        bound = log.bind(bam=entry.id, name=entry.name, job=entry.handle)
        if state == "done":
            result_id = job.file_output("count_file")
            self.platform.set_properties(entry.id, entry.project, {PROPERTY_RESULT: result_id})
            self.ledger.record_done(entry.id, scope=entry.project, name=entry.name, result=result_id)
            stats.done += 1
            bound.info("job_done", result=result_id, total=job.output.get("total_reads"))
            return
        if state not in ("failed", "terminated"):
            return
        reason = job.failure_reason or state
        message = f"{reason}: {job.failure_message or 'no message'}"
        # A terminated job was stopped by a person: relaunching it would overrule them.
        retryable = state == "failed" and reason not in PERMANENT_REASONS
        if retryable and entry.attempts < self.config.max_attempts:
            bound.warning("job_failed_retrying", reason=message, attempt=entry.attempts)
            stats.retried += 1
            source = self._source_of(entry)
            self._launch(source, attempt=entry.attempts + 1, stats=stats)
            return
        self._fail(entry.id, entry.project, entry.name, message, attempts=entry.attempts, stats=stats)

    def _source_of(self, entry: Entry) -> SourceBam:
        """The BAM to launch again, as the folder lists it (with its index), else as described."""
        for bam in self.closed_bams():
            if bam.id == entry.id:
                return bam
        described = self.platform.describe_file(entry.id, entry.project)
        return SourceBam(entry.id, entry.project, described.name, described.folder, described.size, {}, None)

    def _fail(self, file_id: str, project: str, name: str, message: str, *, attempts: int, stats: Stats) -> None:
        self.platform.set_properties(file_id, project, {PROPERTY_FAILED: message[:1000]})
        self.ledger.record_failed(file_id, scope=project, name=name, error=message, attempts=attempts)
        stats.failed += 1
        log.error("bam_failed", bam=file_id, name=name, reason=message, attempts=attempts)

    # --- local mode ------------------------------------------------------------------------

    def _count_locally(self, bam: SourceBam, stats: Stats) -> None:
        bound = log.bind(bam=bam.id, name=bam.name)
        existing = self.platform.find_closed_file(
            self.config.project, self.config.results_folder, pattern="*_count.txt", properties={PROPERTY_SOURCE: bam.id}
        )
        if existing is not None:  # uploaded before a crash, not yet recorded on the BAM
            self._record_local_result(bam, existing)
            bound.info("already_counted", result=existing)
            return
        entry = self.ledger.get(bam.id)
        attempt = (entry.attempts if entry else 0) + 1
        outcome = local.count_and_upload(
            self.platform,
            bam,
            self.config.local_request,
            scratch=self.config.state / "scratch",
            project=self.config.project,
            folder=self.config.results_folder,
            properties={PROPERTY_SOURCE: bam.id, PROPERTY_SOURCE_NAME: bam.name},
        )
        if isinstance(outcome, local.CountFailed):
            if outcome.permanent or attempt >= self.config.max_attempts:
                self._fail(bam.id, bam.project, bam.name, outcome.message, attempts=attempt, stats=stats)
            else:
                # The daemon's back-off: the first retry after retry_delay, doubled each time.
                delay = self.config.retry_delay * 2 ** (attempt - 1)
                self.ledger.record_retry(
                    bam.id,
                    scope=bam.project,
                    name=bam.name,
                    error=outcome.message,
                    attempts=attempt,
                    retry_at=time.time() + delay,
                )
                bound.warning("count_failed_retrying", reason=outcome.message, attempt=attempt, retry_in=delay)
            return
        self._record_local_result(bam, outcome.result_id)
        stats.counted += 1
        bound.info("counted_locally", result=outcome.result_id, total=outcome.total)

    def _record_local_result(self, bam: SourceBam, result_id: str) -> None:
        self.platform.set_properties(bam.id, bam.project, {PROPERTY_RESULT: result_id})
        self.ledger.record_done(bam.id, scope=bam.project, name=bam.name, result=result_id)

    # --- the service loop ------------------------------------------------------------------

    def run(self, stop: threading.Event, *, once: bool = False) -> None:
        """Poll until ``stop`` is set; transient API failures are logged and retried next poll.

        systemd hears READY=1 after the first poll, successful or not (a platform outage is the
        runner's normal weather, not a start-up failure), and STOPPING=1 on the way out.
        """
        notifier = self.notifier
        first = True
        while not stop.is_set():
            status = f"watching {self.config.project}:{self.config.folder}"
            try:
                self.poll_once()
            except (DxAuthFailed, DxAccessDenied):
                raise
            except _TRANSIENT as error:  # the platform or the network; the next poll retries
                if once:
                    raise BamcountdError(f"poll failed: {_describe_error(error)}") from None
                log.warning("poll_failed", error=_describe_error(error), retry_in=self.config.poll)
                status = f"last poll failed: {_describe_error(error)}"
                if self.metrics is not None:
                    self.metrics.poll_errors.inc()
            if self.metrics is not None:
                self.metrics.beat()  # the loop is alive, whatever the platform's weather
            if first:
                notifier.ready(status)
            else:
                notifier.status(status)
            notifier.watchdog()
            first = False
            if once:
                return
            stop.wait(self.config.poll)
        notifier.stopping("stopping")


def _describe_error(error: BaseException) -> str:
    # A DxUnavailable's message is already its cause's one line.
    return str(error) if isinstance(error, DxUnavailable) else one_line(error)


def run(config: WatchConfig, *, once: bool = False, metrics_port: int | None = None) -> None:
    """Poll until SIGTERM/SIGINT (or once), with dxpy's configured credentials.

    :raises DxAuthFailed: the platform rejected the token
    :raises DxAccessDenied: the project or applet does not exist or is not accessible
    :raises BamcountdError: with ``once``, the poll failed
    """
    from bamcountd.dnanexus.platform import Platform  # dxpy: only when the runner starts
    from bamcountd.dnanexus.runtime import install_redaction, stop_on_signals

    install_redaction()
    with contextlib.ExitStack() as stack:
        ledger = Ledger.open(config.state / LEDGER_FILE, lock=False)  # runners may share a state folder
        stack.callback(ledger.close)
        notifier = Notifier()
        stack.callback(notifier.close)
        metrics = None
        if metrics_port is not None:
            metrics = WatchMetrics()
            try:  # /healthz: stalled after three polls without a beat
                server = MetricsServer(metrics, "127.0.0.1", metrics_port, stale_after=max(3 * config.poll, 30.0))
            except OSError as error:
                raise BamcountdError(f"--metrics-port {metrics_port}: cannot listen ({error.strerror})") from None
            server.start()
            stack.callback(server.close)
        stop = threading.Event()
        with stop_on_signals(stop):
            runner = Runner(
                config, ledger, Platform(api_retries=config.api_retries), metrics=metrics, notifier=notifier
            )
            runner.run(stop, once=once)


def index_names(name: str) -> tuple[str, ...]:
    """The names an index of the BAM or CRAM ``name`` may have next to it, in samtools' order."""
    if name.endswith(".cram"):
        return (f"{name}.crai", f"{name[: -len('.cram')]}.crai")
    stem = name[: -len(".bam")]
    return (f"{name}.bai", f"{name}.csi", f"{stem}.bai", f"{stem}.csi")  # as inputs.find_index looks
