"""``bamcountd dx-watch``: count every closed BAM that appears in a DNAnexus project folder, once.

Each poll lists the folder's closed ``*.bam`` files (every result page), pairs each with its
index, and for a BAM not yet handled either launches the applet (output into the results
folder) or, with ``--local``, counts it on this machine and uploads the result files.

Exactly once, across restarts and across runners: the ledger (:mod:`.state`) records what
this runner did; properties on the BAM (``bamcountd_job``, ``bamcountd_result``,
``bamcountd_failed``) record it on the platform, and are read before launching; and every
launch carries a nonce derived from the BAM, the applet and the attempt number, so a launch
repeated after a crash (or by a second runner) gets the platform's first job back instead of
a new one.  Launched jobs are followed to ``done``/``failed``; a job that failed for a
reason a retry can fix is relaunched up to ``max_attempts`` times, then marked failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dxpy  # type: ignore[import-untyped]
import structlog
import urllib3

from bamcountd.count import CountRequest, CountResult, count_bam_sync
from bamcountd.dnanexus.state import DONE, FAILED, LAUNCHED, Entry, Ledger
from bamcountd.errors import (
    BadOption,
    BamcountdError,
    CorruptBam,
    DxAccessDenied,
    DxAuthFailed,
    IndexMismatch,
    InputError,
)
from bamcountd.options import OPTIONS, OR, CountOptions, value_of
from bamcountd.report import render, write_atomic

log = structlog.get_logger("bamcountd.dnanexus.watch")

PROPERTY_JOB = "bamcountd_job"
PROPERTY_RESULT = "bamcountd_result"
PROPERTY_FAILED = "bamcountd_failed"
PROPERTY_SOURCE = "bamcountd_source"
#: Failure reasons that a new job cannot fix: the input is at fault.
PERMANENT_REASONS = frozenset({"AppError", "InputError"})
#: What a poll may fail with and the next poll may not: API errors after dxpy's own retries,
#: a network that is down, a transient samtools failure in --local mode.
_TRANSIENT: tuple[type[BaseException], ...] = (
    dxpy.exceptions.DXError,
    urllib3.exceptions.HTTPError,
    OSError,
    BamcountdError,
)

Json = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    project: str
    folder: str
    results_folder: str
    state: Path
    recurse: bool = False
    applet: str | None = None  # None: count locally
    applet_input: Json = field(default_factory=dict)  # filters and jobs, as the applet's inputs
    local_request: Callable[[Path, Path | None], CountRequest] | None = None
    poll: float = 60.0
    max_attempts: int = 3
    api_retries: int = 4  # dxpy's own retries per API call (it waits 1, 2, 4, … s between them)
    page_size: int = 100


@dataclass(frozen=True)
class SourceBam:
    id: str
    project: str
    name: str
    folder: str
    size: int
    properties: Mapping[str, str]
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


class Runner:
    def __init__(self, config: WatchConfig, ledger: Ledger, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.metrics = metrics
        self._checked = False
        self._api = {"max_retries": config.api_retries}

    # --- checks --------------------------------------------------------------------------

    def check_access(self) -> None:
        """Fail fast with a clear message on a bad token, project or applet (exit status 2)."""
        try:
            dxpy.api.project_describe(self.config.project, {"fields": {"name": True}}, **self._api)
            if self.config.applet is not None:
                dxpy.DXApplet(self.config.applet).describe(**self._api)
        except dxpy.exceptions.InvalidAuthentication as error:
            raise DxAuthFailed(
                f"DNAnexus rejected the API token ({error.msg}): set DX_SECURITY_CONTEXT or run `dx login`"
            ) from None
        except (dxpy.exceptions.PermissionDenied, dxpy.exceptions.ResourceNotFound) as error:
            what = (
                self.config.project if self.config.applet is None else f"{self.config.project} or {self.config.applet}"
            )
            raise DxAccessDenied(f"{what}: {error.name}: {error.msg}") from None
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
            self.metrics.record(stats)
        return stats

    def closed_bams(self) -> list[SourceBam]:
        """Every closed BAM in the folder (all result pages), each paired with its index."""
        fields = {"name": True, "folder": True, "size": True, "properties": True, "state": True}
        common = {
            "classname": "file",
            "state": "closed",
            "project": self.config.project,
            "folder": self.config.folder,
            "recurse": self.config.recurse,
            "describe": {"fields": fields},
            "first_page_size": self.config.page_size,
            **self._api,
        }
        found = list(dxpy.find_data_objects(name="*.bam", name_mode="glob", **common))
        indexes = {
            (hit["describe"]["folder"], hit["describe"]["name"]): (hit["id"], hit["describe"]["name"])
            for hit in dxpy.find_data_objects(name=r"\.(bai|csi)$", name_mode="regexp", **common)
        }
        bams: list[SourceBam] = []
        for hit in found:
            describe = hit["describe"]
            name, folder = describe["name"], describe["folder"]
            index = next(
                (
                    indexes[(folder, candidate)]
                    for candidate in (f"{name}.bai", f"{name}.csi", f"{name[:-4]}.bai")
                    if (folder, candidate) in indexes
                ),
                None,
            )
            index_id, index_name = index if index is not None else (None, "")
            properties = describe.get("properties") or {}
            size = describe.get("size", 0)
            bams.append(SourceBam(hit["id"], hit["project"], name, folder, size, properties, index_id, index_name))
        return bams

    def _handle(self, bam: SourceBam, stats: Stats) -> None:
        entry = self.ledger.get(bam.id)
        if entry is not None and entry.status in (DONE, FAILED, LAUNCHED):
            return  # launched jobs are followed by poll_once; RETRY rows fall through
        bound = log.bind(bam=bam.id, name=bam.name)
        # The platform's record wins: another runner (or this one before a crash) got there first.
        if PROPERTY_RESULT in bam.properties:
            self.ledger.record_done(
                file_id=bam.id, project=bam.project, name=bam.name, result_id=bam.properties[PROPERTY_RESULT]
            )
            bound.info("already_counted", result=bam.properties[PROPERTY_RESULT])
            return
        if PROPERTY_FAILED in bam.properties:
            self.ledger.record_failed(
                file_id=bam.id, project=bam.project, name=bam.name, reason=bam.properties[PROPERTY_FAILED], attempts=0
            )
            return
        if PROPERTY_JOB in bam.properties:
            job_id = bam.properties[PROPERTY_JOB]
            attempt = int(bam.properties.get("bamcountd_attempt", "1"))
            self.ledger.record_launch(
                file_id=bam.id, project=bam.project, name=bam.name, job_id=job_id, attempt=attempt
            )
            bound.info("adopted_job", job=job_id)
            return
        if self.config.applet is None:
            self._count_locally(bam, stats)
        else:
            self._launch(bam, attempt=1, stats=stats)

    # --- applet mode -----------------------------------------------------------------------

    def _launch(self, bam: SourceBam, *, attempt: int, stats: Stats) -> str:
        assert self.config.applet is not None
        job_input: Json = {"mappings_bam": dxpy.dxlink(bam.id, bam.project), **self.config.applet_input}
        if bam.index is not None:
            job_input["index_file"] = dxpy.dxlink(bam.index, bam.project)
        job = dxpy.DXApplet(self.config.applet).run(
            job_input,
            project=self.config.project,
            folder=self.config.results_folder,
            name=f"bamcount {bam.name}",
            properties={PROPERTY_SOURCE: bam.id, "bamcountd_source_name": bam.name},
            # The platform returns the first job for a repeated nonce: no second launch after a
            # crash between this call and the records below, nor by a second runner.
            extra_args={"nonce": f"bamcountd-{bam.id}-{self.config.applet}-{attempt}"},
            **self._api,
        )
        job_id: str = job.get_id()
        dxpy.DXFile(bam.id, project=bam.project).set_properties(
            {PROPERTY_JOB: job_id, "bamcountd_attempt": str(attempt)}, **self._api
        )
        self.ledger.record_launch(file_id=bam.id, project=bam.project, name=bam.name, job_id=job_id, attempt=attempt)
        stats.launched += 1
        log.info("launched", bam=bam.id, name=bam.name, job=job_id, attempt=attempt)
        return job_id

    def _follow(self, entry: Entry, stats: Stats) -> None:
        assert entry.job_id is not None
        describe = dxpy.DXJob(entry.job_id).describe(
            fields={"state": True, "output": True, "failureReason": True, "failureMessage": True}, **self._api
        )
        state = describe["state"]
        bound = log.bind(bam=entry.file_id, name=entry.name, job=entry.job_id)
        if state == "done":
            output = describe.get("output") or {}
            link = output["count_file"]["$dnanexus_link"]
            result_id = link["id"] if isinstance(link, dict) else link
            self._set_bam_properties(entry, {PROPERTY_RESULT: result_id})
            self.ledger.record_done(file_id=entry.file_id, project=entry.project, name=entry.name, result_id=result_id)
            stats.done += 1
            bound.info("job_done", result=result_id, total=output.get("total_reads"))
            return
        if state not in ("failed", "terminated"):
            return
        reason = describe.get("failureReason") or state
        message = f"{reason}: {describe.get('failureMessage') or 'no message'}"
        # A terminated job was stopped by a person: relaunching it would overrule them.
        retryable = state == "failed" and reason not in PERMANENT_REASONS
        if retryable and entry.attempts < self.config.max_attempts:
            bound.warning("job_failed_retrying", reason=message, attempt=entry.attempts)
            stats.retried += 1
            source = self._source_of(entry)
            self._launch(source, attempt=entry.attempts + 1, stats=stats)
            return
        self._fail(entry, message, stats)

    def _source_of(self, entry: Entry) -> SourceBam:
        describe = dxpy.DXFile(entry.file_id, project=entry.project).describe(
            fields={"name": True, "folder": True, "size": True, "properties": True}, **self._api
        )
        for bam in self.closed_bams():
            if bam.id == entry.file_id:
                return bam
        return SourceBam(entry.file_id, entry.project, describe["name"], describe["folder"], describe["size"], {}, None)

    def _fail(self, entry: Entry, message: str, stats: Stats) -> None:
        self._set_bam_properties(entry, {PROPERTY_FAILED: message[:1000]})
        self.ledger.record_failed(
            file_id=entry.file_id, project=entry.project, name=entry.name, reason=message, attempts=entry.attempts
        )
        stats.failed += 1
        log.error("bam_failed", bam=entry.file_id, name=entry.name, reason=message, attempts=entry.attempts)

    def _set_bam_properties(self, entry: Entry, properties: Json) -> None:
        dxpy.DXFile(entry.file_id, project=entry.project).set_properties(properties, **self._api)

    # --- local mode ------------------------------------------------------------------------

    def _count_locally(self, bam: SourceBam, stats: Stats) -> None:
        assert self.config.local_request is not None
        bound = log.bind(bam=bam.id, name=bam.name)
        existing = self._existing_result(bam)
        if existing is not None:  # uploaded before a crash, not yet recorded on the BAM
            self._record_local_result(bam, existing)
            bound.info("already_counted", result=existing)
            return
        entry = self.ledger.get(bam.id)
        attempt = (entry.attempts if entry else 0) + 1
        scratch = self.config.state / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix="bam-") as folder:
            local_bam = Path(folder) / "input.bam"
            dxpy.download_dxfile(bam.id, str(local_bam), project=bam.project)
            local_index = None
            if bam.index is not None:
                # htslib tells .bai from .csi by the file name, so keep the source's suffix.
                local_index = Path(folder) / ("input.bam.csi" if bam.index_name.endswith(".csi") else "input.bam.bai")
                dxpy.download_dxfile(bam.index, str(local_index), project=bam.project)
                os.utime(local_index, ns=(time.time_ns(), local_bam.stat().st_mtime_ns + 1))
            try:
                result = count_bam_sync(self.config.local_request(local_bam, local_index))
            except (InputError, CorruptBam, IndexMismatch) as error:
                self._fail_local(bam, f"{type(error).__name__}: {_named(error, local_bam, bam.name)}", attempt, stats)
                return
            except BamcountdError as error:
                message = f"{type(error).__name__}: {_named(error, local_bam, bam.name)}"
                if attempt >= self.config.max_attempts:
                    self._fail_local(bam, message, attempt, stats)
                else:
                    self.ledger.record_retry(
                        file_id=bam.id, project=bam.project, name=bam.name, reason=message, attempts=attempt
                    )
                    bound.warning("count_failed_retrying", reason=message, attempt=attempt)
                return
            prefix = bam.name[:-4] if bam.name.endswith(".bam") else bam.name
            result = _renamed(result, bam.name)
            count_file = Path(folder) / f"{prefix}_count.txt"
            counts_json = Path(folder) / f"{prefix}.counts.json"
            write_atomic(count_file, render(result, "seed").encode())
            write_atomic(counts_json, render(result, "json").encode())
            uploaded = [
                dxpy.upload_local_file(
                    str(path),
                    project=self.config.project,
                    folder=self.config.results_folder,
                    parents=True,
                    properties={PROPERTY_SOURCE: bam.id, "bamcountd_source_name": bam.name},
                    wait_on_close=True,
                )
                for path in (counts_json, count_file)  # count_file last: its presence means "both there"
            ]
        self._record_local_result(bam, uploaded[-1].get_id())
        stats.counted += 1
        bound.info("counted_locally", result=uploaded[-1].get_id(), total=result.total)

    def _existing_result(self, bam: SourceBam) -> str | None:
        for hit in dxpy.find_data_objects(
            classname="file",
            state="closed",
            name="*_count.txt",
            name_mode="glob",
            properties={PROPERTY_SOURCE: bam.id},
            project=self.config.project,
            folder=self.config.results_folder,
            **self._api,
        ):
            return str(hit["id"])
        return None

    def _record_local_result(self, bam: SourceBam, result_id: str) -> None:
        dxpy.DXFile(bam.id, project=bam.project).set_properties({PROPERTY_RESULT: result_id}, **self._api)
        self.ledger.record_done(file_id=bam.id, project=bam.project, name=bam.name, result_id=result_id)

    def _fail_local(self, bam: SourceBam, message: str, attempt: int, stats: Stats) -> None:
        entry = Entry(bam.id, bam.project, bam.name, FAILED, None, None, attempt, message)
        self._fail(entry, message, stats)

    # --- the service loop ------------------------------------------------------------------

    def run(self, stop: threading.Event, *, once: bool = False) -> None:
        """Poll until ``stop`` is set; transient API failures are logged and retried next poll.

        systemd hears READY=1 after the first poll, successful or not (a platform outage is the
        runner's normal weather, not a start-up failure), and STOPPING=1 on the way out.
        """
        first = True
        while not stop.is_set():
            status = f"watching {self.config.project}:{self.config.folder}"
            try:
                self.poll_once()
            except (DxAuthFailed, DxAccessDenied):
                raise
            except dxpy.exceptions.InvalidAuthentication as error:
                raise DxAuthFailed(f"DNAnexus rejected the API token ({error.msg})") from None
            except _TRANSIENT as error:  # the platform or the network; the next poll retries
                if once:
                    raise BamcountdError(f"poll failed: {_describe_error(error)}") from None
                log.warning("poll_failed", error=_describe_error(error), retry_in=self.config.poll)
                status = f"last poll failed: {_describe_error(error)}"
                if self.metrics is not None:
                    self.metrics.poll_errors.inc()
            notify(("READY=1\n" if first else "") + f"STATUS={status}")
            first = False
            if once:
                return
            stop.wait(self.config.poll)
        notify("STOPPING=1")


def _named(error: BaseException, local: Path, name: str) -> str:
    return str(error).replace(str(local), name)


def _renamed(result: CountResult, name: str) -> CountResult:
    # The JSON names the BAM as the user knows it, not the scratch copy.
    return replace(result, bam=Path(name))


def _describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def notify(message: str) -> None:
    """sd_notify(3) without a library: one datagram to $NOTIFY_SOCKET, if systemd set it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as error:
            log.warning("notify_failed", error=str(error))


class Metrics:
    """Prometheus counters on ``--metrics-port`` (prometheus_client, imported only when asked)."""

    def __init__(self, port: int, *, address: str = "127.0.0.1") -> None:
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry()
        counter = prometheus_client.Counter
        self.launched = counter("bamcountd_dx_jobs_launched", "Applet jobs launched", registry=self.registry)
        self.counted = counter("bamcountd_dx_local_counts", "BAMs counted on this machine", registry=self.registry)
        self.done = counter("bamcountd_dx_bams_done", "BAMs with a result", registry=self.registry)
        self.failed = counter("bamcountd_dx_bams_failed", "BAMs marked failed", registry=self.registry)
        self.retried = counter("bamcountd_dx_jobs_retried", "Failed jobs relaunched", registry=self.registry)
        self.poll_errors = counter("bamcountd_dx_poll_errors", "Polls that failed", registry=self.registry)
        self.last_poll = prometheus_client.Gauge(
            "bamcountd_dx_last_poll_timestamp_seconds", "End of the last successful poll", registry=self.registry
        )
        self.server, self.thread = prometheus_client.start_http_server(port, addr=address, registry=self.registry)

    def record(self, stats: Stats) -> None:
        self.launched.inc(stats.launched)
        self.counted.inc(stats.counted)
        self.done.inc(stats.done + stats.counted)
        self.failed.inc(stats.failed)
        self.retried.inc(stats.retried)
        self.last_poll.set_to_current_time()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def redact_token(token: str) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """A structlog processor that replaces the API token wherever it appears in an event."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str) and token in value:
            return value.replace(token, "[redacted]")
        if isinstance(value, dict):
            return {key: scrub(inner) for key, inner in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(scrub(inner) for inner in value)
        return value

    def processor(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            event[key] = scrub(value)
        return event

    return processor


def install_redaction() -> None:
    """Add the token redactor to structlog's chain (call after bamcountd.logs.configure)."""
    context = dxpy.SECURITY_CONTEXT or {}
    token = context.get("auth_token")
    if not token:
        return
    processors = list(structlog.get_config()["processors"])
    # Just before the renderer: after format_exc_info, so tracebacks are scrubbed too.
    structlog.configure(processors=[*processors[:-1], redact_token(str(token)), processors[-1]])


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``: the runner finishes the current step and exits cleanly."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def config_from_args(args: argparse.Namespace, count: CountOptions) -> WatchConfig:
    """The runner's configuration from ``bamcountd dx-watch``'s options."""
    if args.poll <= 0:
        raise BadOption(f"--poll must be positive, not {args.poll}")
    for option, value in (("--folder", args.folder), ("--results-folder", args.results_folder)):
        if not value.startswith("/"):
            raise BadOption(f"{option} {value!r}: a DNAnexus folder path starts with '/'")
    if not args.project.startswith(("project-", "container-")):
        raise BadOption(f"--project {args.project!r}: expected a project ID (project-…)")
    if args.applet is not None and not args.applet.startswith("applet-"):
        raise BadOption(f"--applet {args.applet!r}: expected an applet ID (applet-…)")
    if count.index is not None:
        raise BadOption("--index: each BAM's index is found next to it in the project")
    applet_input = applet_inputs(count) if args.applet is not None else {}
    cache = count.index_cache if count.index_cache is not None else args.state / "index-cache"

    def local_request(bam: Path, index: Path | None) -> CountRequest:
        return CountRequest.of(bam, replace(count, index=index, index_cache=cache))

    return WatchConfig(
        project=args.project,
        folder=args.folder,
        recurse=args.recurse,
        results_folder=args.results_folder,
        state=args.state,
        applet=args.applet,
        applet_input=applet_input,
        local_request=local_request,
        poll=args.poll,
        max_attempts=args.max_attempts,
        api_retries=args.api_retries,
        page_size=args.page_size,
    )


def applet_inputs(count: CountOptions) -> Json:
    """The applet's inputs that carry ``count``'s options (the table's ``applet`` names); jobs
    always, the others where they differ from their default.

    :raises BadOption: an option set that the applet has no input for
    """
    inputs: Json = {}
    unsupported: list[str] = []
    for row in OPTIONS:
        value = value_of(count, row)
        if row.name == "index_cache" or (value == row.default and row.name != "jobs"):
            continue  # where a worker caches its index is the worker's business
        if row.applet is None:
            unsupported.append(row.flag)
        else:
            inputs[row.applet] = str(value) if row.kind == OR else value
    if unsupported:
        raise BadOption(f"{', '.join(unsupported)}: not an input of the applet; use --local for these")
    return inputs


def run_from_args(args: argparse.Namespace, count: CountOptions) -> None:
    config = config_from_args(args, count)
    install_redaction()
    ledger = Ledger(config.state / "dx-watch.sqlite")
    metrics = Metrics(args.metrics_port) if args.metrics_port is not None else None
    stop = threading.Event()
    try:
        with stop_on_signals(stop):
            runner = Runner(config, ledger, metrics=metrics)
            runner.run(stop, once=args.once)
    finally:
        ledger.close()
        if metrics is not None:
            metrics.close()
