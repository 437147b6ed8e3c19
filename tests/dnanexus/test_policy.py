"""dx-watch's policy (what to launch, follow, retry, adopt) against an in-memory platform: no emulator."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from bamcountd.dnanexus.model import DxFile
from bamcountd.dnanexus.platform import JobInfo, Platform
from bamcountd.dnanexus.watch import Runner, WatchConfig
from bamcountd.errors import BamcountdError, DxAccessDenied, DxUnavailable
from bamcountd.ledger import Ledger
from bamcountd.options import CountOptions
from tests.support.bams import header_names, oracle, samtools_count

PROJECT = "project-policy"
APPLET = "applet-policy"
PACKAGE = Path(__file__).resolve().parents[2] / "bamcountd"

Json = dict[str, Any]


@dataclass
class FakeFile:
    id: str
    name: str
    folder: str
    data: bytes
    properties: dict[str, str] = field(default_factory=dict)
    state: str = "closed"


@dataclass
class FakeJob:
    id: str
    input: Json
    nonce: str
    state: str = "running"
    output: Json = field(default_factory=dict)
    reason: str | None = None
    message: str | None = None


class FakePlatform(Platform):
    """The platform's rules that the policy relies on: closed files only, properties, nonces.
    Every method the policy calls is overridden: nothing reaches dxpy."""

    def __init__(self) -> None:
        self.files: dict[str, FakeFile] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.nonces: dict[str, str] = {}
        self.run_requests: list[str] = []  # the nonce of every run call
        self.downloads = 0
        self.fail_set_properties = 0  # the next N set_properties calls fail (a crash mid-launch)
        self.unavailable = False

    # --- set-up and outcomes ------------------------------------------------------------------

    def add_file(
        self, name: str, data: bytes = b"", *, folder: str = "/incoming", properties: Mapping[str, str] | None = None
    ) -> str:
        file_id = f"file-{len(self.files):04d}"
        self.files[file_id] = FakeFile(file_id, name, folder, data, dict(properties or {}))
        return file_id

    def finish(self, job_id: str) -> str:
        result = self.add_file("x_count.txt", b"Total reads: 1", folder="/counts")
        self.jobs[job_id].state = "done"
        self.jobs[job_id].output = {"count_file": {"$dnanexus_link": result}, "total_reads": 1}
        return result

    def fail(self, job_id: str, reason: str, message: str, *, state: str = "failed") -> None:
        job = self.jobs[job_id]
        job.state, job.reason, job.message = state, reason, message

    def root_job(self, bam_id: str) -> FakeJob:
        (job,) = (job for job in self.jobs.values() if _linked(job.input["mappings_bam"]) == bam_id)
        return job

    # --- Platform ------------------------------------------------------------------------------

    def check_access(self, project: str, applet: str | None = None) -> None:
        if project != PROJECT or applet not in (None, APPLET):
            raise DxAccessDenied(f"{project}: ResourceNotFound")

    def find_closed_files(
        self,
        project: str,
        folder: str,
        *,
        pattern: str,
        regexp: bool = False,
        recurse: bool = False,
        page_size: int | None = None,
    ) -> list[DxFile]:
        self._check()
        return [
            self.describe_file(f.id, project)
            for f in self.files.values()
            if f.state == "closed"
            and (f.folder == folder or (recurse and f.folder.startswith(folder.rstrip("/") + "/")))
            and (re.search(pattern, f.name) if regexp else fnmatch.fnmatchcase(f.name, pattern))
        ]

    def find_closed_file(self, project: str, folder: str, *, pattern: str, properties: Mapping[str, str]) -> str | None:
        self._check()
        for f in self.files.values():
            if (
                f.folder == folder
                and fnmatch.fnmatchcase(f.name, pattern)
                and properties.items() <= f.properties.items()
            ):
                return f.id
        return None

    def describe_file(self, file_id: str, project: str) -> DxFile:
        f = self.files[file_id]
        return DxFile(f.id, project, f.name, f.folder, len(f.data), dict(f.properties))

    def set_properties(self, file_id: str, project: str, properties: Mapping[str, str]) -> None:
        if self.fail_set_properties:
            self.fail_set_properties -= 1
            raise DxUnavailable("ConnectionError: the runner died here")
        self.files[file_id].properties.update(properties)

    def run_applet(
        self,
        applet: str,
        job_input: Json,
        *,
        project: str,
        folder: str,
        name: str,
        properties: Mapping[str, str],
        nonce: str,
    ) -> str:
        self._check()
        self.run_requests.append(nonce)
        if nonce not in self.nonces:
            job_id = f"job-{len(self.jobs):04d}"
            self.jobs[job_id] = FakeJob(job_id, job_input, nonce)
            self.nonces[nonce] = job_id
        return self.nonces[nonce]

    def describe_job(self, job_id: str) -> JobInfo:
        job = self.jobs[job_id]
        return JobInfo(job.id, job.state, job.output, job.reason, job.message)

    def dxlink(self, file_id: str, project: str | None = None) -> Json:
        return {"$dnanexus_link": {"project": project, "id": file_id}}

    def download(self, file: str | Json, path: Path, *, project: str | None = None) -> None:
        self.downloads += 1
        path.write_bytes(self.files[_linked(file) if isinstance(file, dict) else file].data)

    def upload(
        self,
        path: Path,
        *,
        project: str | None = None,
        folder: str | None = None,
        properties: Mapping[str, str] | None = None,
        wait_on_close: bool = False,
    ) -> str:
        return self.add_file(path.name, path.read_bytes(), folder=folder or "/", properties=properties)

    def _check(self) -> None:
        if self.unavailable:
            raise DxUnavailable("ConnectionError: connection refused")


def _linked(link: Json) -> str:
    return str(link["$dnanexus_link"]["id"])


def _runner(platform: Platform, state: Path, *, applet: str | None = APPLET, **options: Any) -> Runner:
    config = WatchConfig(
        project=PROJECT,
        folder="/incoming",
        results_folder="/counts",
        state=state,
        applet=applet,
        count=CountOptions(jobs=2, index_cache=state / "index-cache"),
        max_attempts=options.pop("max_attempts", 3),
        poll=0.01,
        retry_delay=options.pop("retry_delay", 0.0),
        **options,
    )
    return Runner(config, Ledger.open(state / "dx-watch.sqlite", lock=False), platform)


def test_each_closed_bam_is_launched_once_with_its_index(tmp_path: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam")
    bai = platform.add_file("a.bam.bai")
    bare = platform.add_file("b.bam")
    platform.add_file("b.bai", folder="/elsewhere")  # not next to b.bam
    platform.add_file("c.bam", folder="/incoming/sub")  # not without recurse
    platform.files[platform.add_file("open.bam")].state = "open"
    runner = _runner(platform, tmp_path)
    stats = runner.poll_once()
    assert (stats.seen, stats.launched) == (2, 2)
    runner.poll_once()
    assert sorted(platform.run_requests) == [f"bamcountd-{bam}-{APPLET}-1", f"bamcountd-{bare}-{APPLET}-1"]
    job = platform.root_job(bam)
    assert job.input == {
        "mappings_bam": platform.dxlink(bam, PROJECT),
        "index_file": platform.dxlink(bai, PROJECT),
        "input_mode": "stream",
        "jobs": 2,
    }
    assert "index_file" not in platform.root_job(bare).input
    assert platform.files[bam].properties == {"bamcountd_job": job.id, "bamcountd_attempt": "1"}
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.handle, entry.attempts) == ("running", job.id, 1)


def test_a_done_job_gives_the_bam_its_result(tmp_path: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam")
    runner = _runner(platform, tmp_path)
    runner.poll_once()
    assert runner.poll_once().done == 0  # still running: nothing changes
    result = platform.finish(platform.root_job(bam).id)
    assert runner.poll_once().done == 1
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.result) == ("done", result)
    assert platform.files[bam].properties["bamcountd_result"] == result
    runner.poll_once()
    assert len(platform.run_requests) == 1


@pytest.mark.parametrize(
    ("properties", "status"),
    [
        ({"bamcountd_job": "job-other", "bamcountd_attempt": "2"}, "running"),
        ({"bamcountd_result": "file-result"}, "done"),
        ({"bamcountd_failed": "AppError: not a BAM"}, "quarantined"),
    ],
)
def test_the_bams_properties_are_adopted_not_relaunched(
    tmp_path: Path, properties: dict[str, str], status: str
) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam", properties=properties)
    platform.jobs["job-other"] = FakeJob("job-other", {}, "elsewhere")
    runner = _runner(platform, tmp_path)
    runner.poll_once()
    assert platform.run_requests == []
    entry = runner.ledger.get(bam)
    assert entry is not None and entry.state == status
    if status == "running":
        assert (entry.handle, entry.attempts) == ("job-other", 2)
    if status == "done":
        assert entry.result == "file-result"
    if status == "quarantined":
        assert entry.error == "AppError: not a BAM"


def test_a_failed_job_is_retried_up_to_max_attempts_with_a_nonce_per_attempt(tmp_path: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam")
    runner = _runner(platform, tmp_path, max_attempts=3)
    runner.poll_once()
    for attempt in (1, 2, 3):
        job = platform.jobs[platform.nonces[f"bamcountd-{bam}-{APPLET}-{attempt}"]]
        platform.fail(job.id, "AppInternalError", "worker lost")
        stats = runner.poll_once()
        assert stats.retried == (1 if attempt < 3 else 0)
    assert platform.run_requests == [f"bamcountd-{bam}-{APPLET}-{attempt}" for attempt in (1, 2, 3)]
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts) == ("quarantined", 3)
    assert entry.error == "AppInternalError: worker lost"
    assert platform.files[bam].properties["bamcountd_failed"] == "AppInternalError: worker lost"
    assert platform.files[bam].properties["bamcountd_attempt"] == "3"


def test_a_retried_job_that_succeeds_is_done(tmp_path: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam")
    runner = _runner(platform, tmp_path)
    runner.poll_once()
    platform.fail(platform.nonces[f"bamcountd-{bam}-{APPLET}-1"], "UnresponsiveWorker", "worker lost")
    runner.poll_once()
    result = platform.finish(platform.nonces[f"bamcountd-{bam}-{APPLET}-2"])
    runner.poll_once()
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts, entry.result) == ("done", 2, result)


@pytest.mark.parametrize(
    ("state", "reason", "message"),
    [
        ("failed", "AppError", "bad.bam: not a BAM"),
        ("failed", "InputError", "bad input"),
        ("terminated", "Terminated", "terminated by user-alice"),
    ],
)
def test_permanent_failures_and_terminations_are_not_retried(
    tmp_path: Path, state: str, reason: str, message: str
) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam")
    runner = _runner(platform, tmp_path)
    runner.poll_once()
    platform.fail(platform.root_job(bam).id, reason, message, state=state)
    assert runner.poll_once().failed == 1
    runner.poll_once()
    assert len(platform.run_requests) == 1
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts, entry.error) == (
        "quarantined",
        1,
        f"{reason}: {message}",
    )


def test_a_launch_repeated_after_a_crash_gets_the_first_job_back(tmp_path: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("a.bam")
    platform.fail_set_properties = 1  # the job exists; neither the BAM nor the ledger knows it
    runner = _runner(platform, tmp_path)
    with pytest.raises(DxUnavailable):
        runner.poll_once()
    assert runner.ledger.get(bam) is None
    runner.poll_once()
    second = _runner(platform, tmp_path / "second")  # another runner, its own ledger
    second.poll_once()
    assert platform.run_requests == [f"bamcountd-{bam}-{APPLET}-1"] * 2
    assert len(platform.jobs) == 1
    (job_id,) = platform.jobs
    assert platform.files[bam].properties["bamcountd_job"] == job_id
    for ledger in (runner.ledger, second.ledger):
        entry = ledger.get(bam)
        assert entry is not None and entry.handle == job_id


def _seed_text(bam: Path) -> str:
    names = [*header_names(bam), "*"]
    counts = oracle(bam, names)
    return "".join(f"Region {name}: {counts[name]}\n" for name in names) + f"Total reads: {samtools_count(bam)}"


def test_local_mode_counts_uploads_and_records_once(tmp_path: Path, shared_bam: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("s.bam", shared_bam.read_bytes())
    runner = _runner(platform, tmp_path / "state", applet=None)
    assert runner.poll_once().counted == 1
    results = {f.name: f for f in platform.files.values() if f.folder == "/counts"}
    assert sorted(results) == ["s.counts.json", "s_count.txt"]
    count_file = results["s_count.txt"]
    assert count_file.data.decode() == _seed_text(shared_bam)
    assert count_file.properties == {"bamcountd_source": bam, "bamcountd_source_name": "s.bam"}
    assert platform.files[bam].properties == {"bamcountd_result": count_file.id}
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.result) == ("done", count_file.id)
    assert list((tmp_path / "state" / "scratch").iterdir()) == []
    runner.poll_once()
    assert platform.downloads == 1 and platform.run_requests == []

    # Uploaded before a crash, never recorded: found again, not recounted.
    del platform.files[bam].properties["bamcountd_result"]
    again = _runner(platform, tmp_path / "fresh", applet=None)
    again.poll_once()
    assert platform.downloads == 1
    entry = again.ledger.get(bam)
    assert entry is not None and (entry.state, entry.result) == ("done", count_file.id)


def test_local_mode_waits_out_the_back_off_before_a_retry(tmp_path: Path, shared_bam: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("s.bam", shared_bam.read_bytes())
    runner = _runner(platform, tmp_path, applet=None, max_attempts=3, retry_delay=0.4)
    runner.config = replace(runner.config, count=CountOptions(samtools=str(tmp_path / "no-samtools")))
    runner.poll_once()
    first = runner.ledger.get(bam)
    assert first is not None and (first.state, first.attempts) == ("failed", 1)
    assert first.not_before >= first.updated_at + 0.39
    runner.poll_once()  # within the back-off: not tried again
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts) == ("failed", 1)
    time.sleep(max(0.0, first.not_before - time.time()) + 0.05)
    runner.poll_once()
    second = runner.ledger.get(bam)
    assert second is not None and (second.state, second.attempts) == ("failed", 2)
    assert second.not_before >= second.updated_at + 0.79  # doubled, as the daemon's


def test_local_mode_retries_a_tool_failure_then_marks_the_bam_failed(tmp_path: Path, shared_bam: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("s.bam", shared_bam.read_bytes())
    runner = _runner(platform, tmp_path, applet=None, max_attempts=2)
    runner.config = replace(runner.config, count=CountOptions(samtools=str(tmp_path / "no-samtools")))
    runner.poll_once()
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts) == ("failed", 1)
    runner.poll_once()
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts) == ("quarantined", 2)
    assert entry.error is not None and entry.error.startswith("Samtools")
    assert platform.files[bam].properties["bamcountd_failed"] == entry.error
    assert not any(f.folder == "/counts" for f in platform.files.values())


def test_local_mode_fails_a_bad_bam_at_once_naming_it(tmp_path: Path) -> None:
    platform = FakePlatform()
    bam = platform.add_file("junk.bam", b"junk" * 100)
    runner = _runner(platform, tmp_path, applet=None)
    assert runner.poll_once().failed == 1
    entry = runner.ledger.get(bam)
    assert entry is not None and (entry.state, entry.attempts) == ("quarantined", 1)
    assert entry.error is not None and "junk.bam" in entry.error and "input.bam" not in entry.error
    runner.poll_once()
    assert platform.downloads == 1


def test_an_unavailable_platform_fails_the_poll_not_the_runner(tmp_path: Path) -> None:
    platform = FakePlatform()
    platform.add_file("a.bam")
    platform.unavailable = True
    runner = _runner(platform, tmp_path)
    with pytest.raises(BamcountdError, match=r"^poll failed: ConnectionError: connection refused$"):
        runner.run(threading.Event(), once=True)
    stop = threading.Event()
    polls = 0

    def poll_once() -> Any:
        nonlocal polls
        polls += 1
        platform.unavailable = polls < 2
        if polls == 2:
            stop.set()
        return Runner.poll_once(runner)

    runner.poll_once = poll_once  # type: ignore[method-assign]
    runner.run(stop)
    assert polls == 2 and len(platform.run_requests) == 1


def test_a_bad_project_stops_the_runner(tmp_path: Path) -> None:
    runner = _runner(FakePlatform(), tmp_path, applet="applet-gone")
    with pytest.raises(DxAccessDenied):
        runner.run(threading.Event())


def _imports(path: Path, *, top_level: bool = False) -> set[str]:
    """The modules a file imports (only at its top level, if asked), leaving out
    ``if TYPE_CHECKING:`` blocks (annotations only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    names: set[str] = set()
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_the_policy_imports_no_dxpy() -> None:
    # The runner's wiring (run_from_args, install_redaction) imports the platform when it starts.
    for module in ("watch.py", "local.py", "runtime.py"):
        top_level = _imports(PACKAGE / "dnanexus" / module, top_level=True)
        assert not {name for name in top_level if name.split(".")[0] in ("dxpy", "urllib3")}, module
        assert "bamcountd.dnanexus.platform" not in top_level, module
    code = "import sys, bamcountd.dnanexus.watch; sys.exit('dxpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_only_the_platform_module_imports_dxpy() -> None:
    importers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "dxpy" for name in _imports(path))
    )
    assert importers == ["dnanexus/platform.py"]


def test_an_index_is_looked_for_under_every_name_samtools_reads() -> None:
    from bamcountd.dnanexus.watch import index_names

    assert index_names("a.bam") == ("a.bam.bai", "a.bam.csi", "a.bai", "a.csi")
    assert index_names("a.cram") == ("a.cram.crai", "a.crai")
