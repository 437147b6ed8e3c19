"""A real ``bamcountd serve`` process for the service tests, and what they check its results with."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bams import header_names, oracle, samtools_count

REPO = Path(__file__).resolve().parents[2]


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\n{context()[-6000:]}" if context is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


@dataclass
class Folders:
    watch: Path
    results: Path
    state: Path

    @classmethod
    def under(cls, base: Path) -> Folders:
        folders = cls(base / "watch", base / "results", base / "state")
        for folder in (folders.watch, folders.results, folders.state):
            folder.mkdir(parents=True, exist_ok=True)
        return folders


class NotifySocket:
    """The test's own ``NOTIFY_SOCKET``: a thread collects every datagram the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._lock = threading.Lock()
        self._messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append(data.decode())

    @property
    def messages(self) -> list[str]:
        with self._lock:
            return list(self._messages)

    def fields(self) -> list[str]:
        return [line for message in self.messages for line in message.split("\n")]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._socket.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)


@dataclass
class Daemon:
    """``bamcountd serve`` in its own session (so a test can kill it and all its children)."""

    folders: Folders
    extra: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    notify: NotifySocket | None = None
    starts: int = 0

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bamcountd",
            "serve",
            "--watch",
            str(self.folders.watch),
            "--results",
            str(self.folders.results),
            "--state",
            str(self.folders.state),
            "--settle",
            "0.5",
            "--rescan-interval",
            "2",
            "--log-format",
            "json",
            *self.extra,
        ]

    def start(self, *, wait_ready: bool = True) -> Daemon:
        self.starts += 1
        tag = f"{id(self):x}-{self.starts}"
        self.log_path = self.folders.state.parent / f"daemon-{tag}.log"
        if self.notify is not None:
            self.notify.close()
        # A short path: unix socket names are limited to 107 bytes.
        self.notify = NotifySocket(Path(tempfile.mkdtemp(prefix="bcd-notify-")) / "sock")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **self.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            assert self.notify is not None
            return "READY=1" in self.notify.fields() or self.exited()

        wait_for(ready, timeout=timeout, what="READY=1")
        assert not self.exited(), self.log()

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far; a line still being written is left for later."""
        complete = self.log().split("\n")[:-1]
        return [json.loads(line) for line in complete if line.startswith("{")]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill9(self, *, group: bool = False) -> None:
        """A crash: SIGKILL the daemon (``group``: with its children, as systemd kills a cgroup)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill9(group=True)
        if self.notify is not None:
            self.notify.close()


def drop_by_rename(source: Path, target: Path) -> Path:
    """Copy under a partial name, then rename into place (what a careful uploader does)."""
    partial = target.with_name(target.name + ".part")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


def drop_slowly(source: Path, target: Path, *, chunks: int = 6, pause: float = 0.25) -> Path:
    """Copy in chunks with pauses (a slow upload straight to the final name)."""
    data = source.read_bytes()
    step = max(1, len(data) // chunks + 1)
    with open(target, "wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start : start + step])
            out.flush()
            time.sleep(pause)
    return target


def result_path(folders: Folders, relative: str) -> Path:
    return folders.results / (relative[: -len(".bam")] + ".counts.json")


def results(folders: Folders) -> list[Path]:
    return sorted(path for path in folders.results.rglob("*") if path.is_file())


@functools.cache
def _oracle_cached(template: Path, size: int, mtime_ns: int) -> dict[str, int]:
    return oracle(template, [*header_names(template), "*"])


def expected_counts(template: Path) -> dict[str, int]:
    """samtools' own counts for the daemon's default regions (every reference, then '*') of an
    indexed template BAM."""
    stat = template.stat()
    return _oracle_cached(template, stat.st_size, stat.st_mtime_ns)


def assert_result_matches(result_file: Path, bam: Path, template: Path) -> dict[str, Any]:
    """The result of ``bam`` (a byte-for-byte copy of ``template``) has samtools' counts."""
    assert bam.read_bytes() == template.read_bytes(), f"{bam} is not a copy of {template}"
    document: dict[str, Any] = json.loads(result_file.read_text())
    expected = expected_counts(template)
    assert {r["region"]: r["count"] for r in document["regions"]} == expected
    assert document["total"] == samtools_count(template) == sum(expected.values())
    return document


FAKE_SAMTOOLS = """#!{python}
# Fault injection only: runs the real samtools, except that a read command (view without -H)
# records its pid and then hangs (FAKE_HANG), waits while the file FAKE_HOLD exists, or aborts
# (an argument contains FAKE_CRASH).
import os, sys, time
real = os.environ["FAKE_REAL_SAMTOOLS"]
args = sys.argv[1:]
reading = bool(args) and args[0] == "view" and "-H" not in args
if reading and os.environ.get("FAKE_PIDS"):
    with open(os.path.join(os.environ["FAKE_PIDS"], str(os.getpid())), "w") as out:
        out.write(" ".join(args))
if reading and os.environ.get("FAKE_HANG"):
    time.sleep(3600)
while reading and os.environ.get("FAKE_HOLD") and os.path.exists(os.environ["FAKE_HOLD"]):
    time.sleep(0.05)  # held until the test removes the file
crash = os.environ.get("FAKE_CRASH")
if reading and crash and any(crash in arg for arg in args):
    sys.stderr.write("samtools: simulated crash\\n")
    sys.stderr.flush()
    os.abort()
os.execv(real, [real, *args])
"""


def fake_samtools(folder: Path) -> tuple[Path, dict[str, str]]:
    """A samtools wrapper for fault injection (see FAKE_SAMTOOLS), and the environment it needs;
    never used to prove a count."""
    from tests.bams import SAMTOOLS

    path = folder / "fake-samtools"
    path.write_text(FAKE_SAMTOOLS.format(python=sys.executable))
    path.chmod(0o755)
    return path, {"FAKE_REAL_SAMTOOLS": shutil.which(SAMTOOLS) or SAMTOOLS}


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
