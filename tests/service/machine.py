"""A real systemd for the unit tests: PID 1 of a ``systemd-nspawn`` container whose root is this
machine's own ``/``, read-only, under a tmpfs overlay (``--volatile=overlay``), so that nothing
the tests do inside reaches the host.  The recipe, and the traps it avoids, are in
``../shared/recipes/systemd-under-test.md``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.waiting import wait_for

# Runs in a private mount namespace: a tmpfs on /run (nspawn keeps its state there, and /run is
# on disk on this machine kind), a cgroup of its own (so that nothing can be left behind
# unseen), and the host's / bound where nspawn takes it as the container's lower layer.
_BOOT = r"""
set -eu
root=$1 payload=$2 cgroup=$3 target=$4
mount -n -t tmpfs -o mode=755 tmpfs /run
for hierarchy in unified systemd; do
    if [ -d /sys/fs/cgroup/$hierarchy ]; then
        mkdir -p /sys/fs/cgroup/$hierarchy/$cgroup
        echo $$ > /sys/fs/cgroup/$hierarchy/$cgroup/cgroup.procs
    fi
done
mount --bind / "$root"
exec systemd-nspawn -q -D "$root" --volatile=overlay --register=no --keep-unit --console=pipe \
    --link-journal=no --private-network --bind-ro="$payload":/opt/test \
    --bind-ro="$target":/etc/systemd/system/bamcountd-test.target \
    -b -- systemd.unit=bamcountd-test.target
"""

_TARGET = """[Unit]
Description=bamcountd tests: basic.target and nothing of the host's
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""


def missing() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting systemd in a container needs root"
    for tool in ("systemd-nspawn", "nsenter", "unshare", "setsid"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install systemd-container)"
    return None


class Machine:
    """One booted container; ``run`` executes a command inside (all its namespaces)."""

    def __init__(self, base: Path, payload: Path) -> None:
        self.base = base
        self.payload = payload
        self.cgroup = f"bamcountd-test-{os.getpid()}"
        self._root = base / "root"
        self._root.mkdir(parents=True, exist_ok=True)
        self._target = base / "bamcountd-test.target"
        self._target.write_text(_TARGET)
        self._boot = base / "boot.sh"
        self._boot.write_text(_BOOT)
        self._log = base / "nspawn.log"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def start(self, timeout: float = 30) -> None:
        with self._log.open("wb") as log:
            self._nspawn = subprocess.Popen(
                [
                    *("setsid", "unshare", "--mount", "--propagation", "private", "--", "bash", str(self._boot)),
                    *(str(self._root), str(self.payload), self.cgroup, str(self._target)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_for(
            lambda: self._find_init() is not None, timeout=timeout, what="the container's systemd", context=self.log
        )
        wait_for(
            lambda: self.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded"),
            timeout=timeout,
            what="the container to boot",
            context=self.log,
        )

    def _find_init(self) -> int | None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self._nspawn.returncode}:\n{self.log()}")
        for task in Path(f"/proc/{self._nspawn.pid}/task").glob("*/children"):
            for child in task.read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    self.init_pid = int(child)
                    return self.init_pid
        return None

    def log(self) -> str:
        return self._log.read_text(errors="replace")

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container, as root or as ``user``; no shell."""
        command = ["nsenter", "-t", str(self.init_pid), "-a"]
        if user is not None:
            command += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        completed = subprocess.run(
            [*command, *argv], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
        if check and completed.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {completed.returncode}:\n{completed.stdout}{completed.stderr}"
            )
        return completed

    def enter(self, pid: int, *argv: str, user: str) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the mount namespace of a process inside (a service's sandbox), as ``user``."""
        host_pid = self.host_pid(pid)
        return subprocess.run(
            [
                "nsenter",
                "-t",
                str(host_pid),
                "-m",
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--init-groups",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def host_pid(self, pid: int) -> int:
        """The host's number for a process that the container calls ``pid``."""
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                fields = line.split()
                if fields[:1] == ["NSpid:"] and len(fields) > 2 and fields[-1] == str(pid):
                    return int(fields[1])
        raise AssertionError(f"no process {pid} inside the container")

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self, timeout: float = 20) -> list[str]:
        """Power the container off; return what was left behind (nothing, or a description)."""
        left: list[str] = []
        if self._nspawn is None:
            return left
        if self.init_pid:
            os.kill(self.init_pid, signal.SIGRTMIN + 4)  # systemd's "poweroff"
        try:
            self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            left.append("systemd-nspawn was still running and was killed")
            self._nspawn.kill()
            self._nspawn.wait()
        for hierarchy in ("unified", "systemd"):
            folder = Path(f"/sys/fs/cgroup/{hierarchy}/{self.cgroup}")
            if not folder.is_dir():
                continue
            pids = [pid for procs in folder.rglob("cgroup.procs") for pid in procs.read_text().split()]
            if pids:
                left.append(f"processes in {folder}: {pids}")
                for pid in pids:
                    os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            folder.rmdir()
        mounts = Path("/proc/self/mountinfo").read_text()
        if str(self._root) in mounts:
            left.append(f"a mount on {self._root}")
        return left
