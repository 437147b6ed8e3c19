"""``systemd/bamcountd.service`` under a real systemd (252, PID 1 of a container over this
machine's root, see tests/service/machine.py), installed by the README's worker-VM steps:
readiness, status, exact results, restart after ``kill -9``, a bad configuration, stop in the
middle of counts, the watchdog, the sandbox, the journal.  Every count is checked against
``samtools view -c`` on the host."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bamcountd.synth import tricky_bam
from tests.service.machine import Machine, missing
from tests.support.bams import header_names, oracle, samtools_count
from tests.support.fake_samtools import Fault, fake_samtools
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
UNIT = "bamcountd.service"
INCOMING = "/srv/bamcountd/incoming"
RESULTS = "/srv/bamcountd/results"
CONFIG = "/etc/bamcountd/bamcountd.toml"

_MISSING = missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no systemd container: {_MISSING}")

# What the fixture writes as the site's configuration: the example, with test-sized waits.
SETTINGS = {"settle": "1", "rescan_interval": "2", "drain_seconds": "2", "retry_delay": "1"}

# A samtools that takes its time over every count (far longer than drain_seconds) and then runs
# the real one: so that a stop finds counts running (fault injection only; the container's
# python3 and samtools).
SLOW_COUNT = Fault("count", delay=60)


def pip_install(requirement: str) -> list[str]:
    """The README's pip step: the venv's pip, the wheels built where the package index is."""
    return [
        "/opt/bamcountd/venv/bin/pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        "/opt/test/wheels",
        requirement,
    ]


def install_steps() -> list[list[str]]:
    """The README's "Install on a worker VM" steps, as the fixture runs them inside (samtools and
    python3-venv are the host's; the wheels were built outside, where the package index is)."""
    return [
        ["useradd", "--system", "--home-dir", "/var/lib/bamcountd", "--shell", "/usr/sbin/nologin", "bamcountd"],
        ["/usr/bin/python3", "-m", "venv", "/opt/bamcountd/venv"],
        pip_install("bamcountd[service]"),
        ["install", "-d", "-m", "0755", "/etc/bamcountd"],
        ["install", "-m", "0644", "/opt/test/systemd/bamcountd.toml.example", CONFIG],
        ["install", "-d", "-o", "bamcountd", "-g", "bamcountd", "-m", "0750", RESULTS],
        ["install", "-d", "-m", "0755", INCOMING],
        ["install", "-m", "0644", "/opt/test/systemd/bamcountd.service", "/etc/systemd/system/"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "bamcountd"],
    ]


@pytest.fixture(scope="module")
def bams(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("unit-bams")
    return [tricky_bam(folder, reads=300 + 100 * i, unplaced=10 * i, seed=20 + i, name=f"s{i}.bam") for i in range(6)]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, bams: list[Path]) -> Iterator[Machine]:
    base = tmp_path_factory.mktemp("systemd")
    payload = base / "payload"
    wheels = payload / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(wheels),
            f"{REPO}[service,dnanexus]",  # dx-watch's too
        ],
        check=True,
        capture_output=True,
    )
    shutil.copytree(REPO / "systemd", payload / "systemd")
    (payload / "dx").mkdir()
    for support in (REPO / "devtools" / "dnanexus_emulator.py", Path(__file__).with_name("dx_platform.py")):
        shutil.copy(support, payload / "dx" / support.name)
    (payload / "bams").mkdir()
    for bam in bams:
        shutil.copy(bam, payload / "bams" / bam.name)
    fake_samtools(payload, SLOW_COUNT, name="slow-samtools", python="/usr/bin/python3", real="/usr/bin/samtools")
    box = Machine(base, payload)
    box.start()
    try:
        _site_config(box)
        for step in install_steps():
            box.run(*step)
        yield box
    finally:
        left = box.stop()
    assert left == [], left


def _site_config(box: Machine, **changes: str) -> None:
    """The example configuration with the test's settings (the README says: "then edit it")."""
    lines = (REPO / "systemd" / "bamcountd.toml.example").read_text().splitlines()
    settings = {**SETTINGS, **changes}
    edited = []
    for line in lines:
        key = line.split("=", 1)[0].strip().lstrip("# ")
        if key in settings and "=" in line:
            edited.append(f"{key} = {settings.pop(key)}")
        else:
            edited.append(line)
    edited += [f"{key} = {value}" for key, value in settings.items()]
    staged = box.payload / "site.toml"
    staged.write_text("\n".join(edited) + "\n")
    box.run("install", "-d", "-m", "0755", "/etc/bamcountd")
    box.run("install", "-m", "0644", "/opt/test/site.toml", CONFIG)


def _drop(box: Machine, *names: str) -> None:
    """Copy BAMs into the watch folder the way an uploader should: a hidden name, then a rename."""
    for name in names:
        box.run("cp", f"/opt/test/bams/{name}", f"{INCOMING}/.{name}.part")
        box.run("mv", f"{INCOMING}/.{name}.part", f"{INCOMING}/{name}")


def _results(box: Machine) -> dict[str, dict[str, object]]:
    # Not the hidden temp files of a write in progress (.NAME.*.tmp), which may be gone by the cat.
    listing = box.run("find", RESULTS, "-type", "f", "-not", "-name", ".*", "-printf", "%P\\n").stdout.split()
    return {name: json.loads(box.run("cat", f"{RESULTS}/{name}").stdout) for name in listing}


def _expected(bam: Path) -> dict[str, int]:
    return {**oracle(bam, [*header_names(bam), "*"]), "total": samtools_count(bam)}


def _counted(document: dict[str, object]) -> dict[str, int]:
    regions = document["regions"]
    assert isinstance(regions, list)
    return {row["region"]: row["count"] for row in regions} | {"total": int(str(document["total"]))}


def _reset(box: Machine) -> None:
    """An empty watch folder, no results, a fresh ledger, the service running."""
    box.run("systemctl", "stop", UNIT)
    box.run("sh", "-c", f"rm -rf {INCOMING}/* {RESULTS}/* /var/lib/bamcountd/*")
    _site_config(box)
    box.run("systemctl", "reset-failed", UNIT, check=False)
    box.run("systemctl", "start", UNIT)


def _wait_results(box: Machine, names: list[str], timeout: float = 60) -> dict[str, dict[str, object]]:
    wanted = {name.removesuffix(".bam") + ".counts.json" for name in names}
    wait_for(
        lambda: wanted <= set(_results(box)),
        timeout=timeout,
        what=f"results for {names}",
        context=lambda: _journal(box),
    )
    return _results(box)


def _journal(box: Machine) -> str:
    return box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False).stdout


def test_enable_now_returns_ready_and_results_are_exact(machine: Machine, bams: list[Path]) -> None:
    _reset(machine)  # `systemctl start` returns once the daemon said READY=1 (Type=notify)
    state = machine.show(UNIT, "ActiveState", "SubState", "StatusText", "Type", "User", "NRestarts")
    assert (state["ActiveState"], state["SubState"], state["Type"]) == ("active", "running", "notify"), state
    assert state["StatusText"].startswith("0 queued, 0 running, 0 done"), state
    names = [bam.name for bam in bams[:3]]
    _drop(machine, *names)
    results = _wait_results(machine, names)
    assert set(results) == {name.removesuffix(".bam") + ".counts.json" for name in names}
    for bam in bams[:3]:
        assert _counted(results[bam.name.removesuffix(".bam") + ".counts.json"]) == _expected(bam)
    wait_for(
        lambda: machine.show(UNIT, "StatusText")["StatusText"].startswith("0 queued, 0 running, 3 done"),
        timeout=10,
        what="the status line to follow the queue",
    )


def test_kill_9_restarts_and_loses_or_repeats_nothing(machine: Machine, bams: list[Path]) -> None:
    _reset(machine)
    cursor = machine.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout.split("cursor: ")[-1].strip()
    before = machine.show(UNIT, "MainPID", "NRestarts")
    _drop(machine, *(bam.name for bam in bams))
    wait_for(
        lambda: len(_results(machine)) >= 1, timeout=60, what="the first result", context=lambda: _journal(machine)
    )
    machine.run("kill", "-9", before["MainPID"])  # in the middle of the batch
    wait_for(
        lambda: (
            machine.show(UNIT, "NRestarts")["NRestarts"] == str(int(before["NRestarts"]) + 1)
            and machine.show(UNIT, "ActiveState")["ActiveState"] == "active"
        ),
        timeout=30,
        what="systemd to restart the daemon",
        context=lambda: _journal(machine),
    )
    assert machine.show(UNIT, "MainPID")["MainPID"] != before["MainPID"]
    results = _wait_results(machine, [bam.name for bam in bams])
    assert sorted(results) == sorted(bam.name.removesuffix(".bam") + ".counts.json" for bam in bams)
    for bam in bams:
        assert _counted(results[bam.name.removesuffix(".bam") + ".counts.json"]) == _expected(bam)
    # Each BAM's result written once: counted ("done") or, if the kill fell between its result
    # and the ledger's commit, adopted after the restart; never both, never twice.
    since = machine.run("journalctl", "-u", UNIT, "--after-cursor", cursor, "--no-pager", "-o", "cat").stdout
    events = [json.loads(line) for line in since.splitlines() if line.startswith("{")]
    settled = [e["file"] for e in events if e.get("event") in ("done", "result_adopted")]
    assert sorted(Path(name).name for name in settled) == sorted(bam.name for bam in bams), settled


def test_a_bad_configuration_exits_2_and_is_not_restarted(machine: Machine) -> None:
    _reset(machine)
    _site_config(machine, max_files="0")
    machine.run("systemctl", "restart", UNIT, check=False)
    state = machine.show(UNIT, "ActiveState", "ExecMainStatus", "NRestarts", "Result")
    assert (state["ActiveState"], state["ExecMainStatus"]) == ("failed", "2"), state
    time.sleep(6)  # past RestartSec=5s: no second try
    assert machine.show(UNIT, "NRestarts", "ActiveState") == {"NRestarts": state["NRestarts"], "ActiveState": "failed"}
    assert "max_files" in _journal(machine)
    _reset(machine)


def test_stop_mid_count_leaves_no_samtools_and_requeues(machine: Machine, bams: list[Path]) -> None:
    _reset(machine)
    _site_config(machine, samtools='"/opt/test/slow-samtools"')
    machine.run("systemctl", "restart", UNIT)
    names = [bam.name for bam in bams[:2]]
    _drop(machine, *names)
    wait_for(
        lambda: machine.run("pgrep", "-f", "slow-samtools view", check=False).returncode == 0,
        timeout=30,
        what="a count to be running",
    )
    started = time.monotonic()
    machine.run("systemctl", "stop", UNIT)
    took = time.monotonic() - started
    assert took < 60, took  # TimeoutStopSec
    assert machine.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert machine.run("pgrep", "samtools", check=False).stdout == ""
    assert _results(machine) == {}
    journal = _journal(machine)
    assert '"event": "cancelling"' in journal and '"event": "requeued"' in journal, journal[-3000:]
    _site_config(machine)
    machine.run("systemctl", "start", UNIT)
    results = _wait_results(machine, names)
    for bam in bams[:2]:
        assert _counted(results[bam.name.removesuffix(".bam") + ".counts.json"]) == _expected(bam)


def test_the_watchdog_restarts_a_stalled_daemon(machine: Machine) -> None:
    _reset(machine)
    dropin = "/etc/systemd/system/bamcountd.service.d"
    machine.run("install", "-d", dropin)
    machine.run("sh", "-c", f"printf '[Service]\\nWatchdogSec=3s\\n' > {dropin}/watchdog.conf")
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "restart", UNIT)
    try:
        before = machine.show(UNIT, "MainPID", "NRestarts")
        machine.run("kill", "-STOP", before["MainPID"])  # a scheduler that stalls: no more WATCHDOG=1
        wait_for(
            lambda: (
                machine.show(UNIT, "NRestarts")["NRestarts"] != before["NRestarts"]
                and machine.show(UNIT, "ActiveState")["ActiveState"] == "active"
            ),
            timeout=40,
            what="the watchdog to restart the daemon",
            context=lambda: _journal(machine),
        )
        assert "Watchdog timeout" in machine.run("journalctl", "--no-pager", "-o", "cat").stdout
    finally:
        machine.run("rm", "-rf", dropin)
        machine.run("systemctl", "daemon-reload")
        _reset(machine)


def test_the_sandbox_holds_and_the_daemon_still_counts(machine: Machine, bams: list[Path]) -> None:
    _reset(machine)
    main = int(machine.show(UNIT, "MainPID")["MainPID"])
    assert machine.run("ps", "-o", "user=", "-p", str(main)).stdout.strip() == "bamcountd"
    for path in ("/etc/bamcountd/probe", "/opt/bamcountd/probe", "/var/tmp/../lib/probe", f"{INCOMING}/probe"):
        denied = machine.enter(main, "touch", path, user="bamcountd")
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied.stderr)
    assert machine.enter(main, "ls", "/root", user="bamcountd").returncode != 0  # ProtectHome
    for path in (f"{RESULTS}/probe", "/var/lib/bamcountd/probe"):
        allowed = machine.enter(main, "touch", path, user="bamcountd")
        assert allowed.returncode == 0, (path, allowed.stderr)
        machine.enter(main, "rm", path, user="bamcountd")
    _drop(machine, bams[0].name)
    results = _wait_results(machine, [bams[0].name])
    assert _counted(results[bams[0].name.removesuffix(".bam") + ".counts.json"]) == _expected(bams[0])
    security = machine.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security)
    assert score is not None and float(score.group(1)) <= 2.0, security  # the running unit, as systemd rates it


def test_the_journal_has_the_daemons_json_events(machine: Machine, bams: list[Path]) -> None:
    _reset(machine)
    _drop(machine, bams[1].name)
    _wait_results(machine, [bams[1].name])
    lines = machine.run("journalctl", "-u", UNIT, "--no-pager", "-o", "json").stdout.splitlines()
    events = []
    for line in lines:
        message = json.loads(line).get("MESSAGE")
        if isinstance(message, str) and message.startswith("{"):
            events.append(json.loads(message))
    done = [event for event in events if event.get("event") == "done"]
    assert done and done[-1]["file"].endswith(bams[1].name) and done[-1]["total"] == samtools_count(bams[1])
    assert any(event.get("event") == "ready" for event in events)


def _seed_text(bam: Path) -> str:
    names = [*header_names(bam), "*"]
    counts = oracle(bam, names)
    return "".join(f"Region {name}: {counts[name]}\n" for name in names) + f"Total reads: {samtools_count(bam)}"


def test_the_dx_watch_unit_counts_a_project_folder_and_stops_cleanly(machine: Machine, bams: list[Path]) -> None:
    """systemd/bamcountd-dx.service, installed as its comment says, against the emulator (on the
    container's loopback), in --local mode: READY after the first poll, the seed-format count of
    the folder's BAM uploaded, and SIGTERM an exit 0."""
    dx_unit = "bamcountd-dx.service"
    machine.run(*pip_install("bamcountd[dnanexus]"))
    machine.run("install", "-d", "-m", "0700", "/srv/dx-platform")
    machine.run(
        "systemd-run",
        "--unit=dx-platform",
        "--property=Type=exec",
        "/usr/bin/python3",  # the emulator needs no more than the standard library; this checkout may be hidden inside
        "/opt/test/dx/dx_platform.py",
        "/srv/dx-platform",
        f"/opt/test/bams/{bams[0].name}",
    )
    try:
        wait_for(
            lambda: machine.run("test", "-s", "/srv/dx-platform/platform.json", check=False).returncode == 0,
            timeout=30,
            what="the emulator to listen",
            context=lambda: machine.run("journalctl", "-u", "dx-platform", "--no-pager", check=False).stdout,
        )
        reach = json.loads(machine.run("cat", "/srv/dx-platform/platform.json").stdout)
        context = json.dumps(
            {"auth_token_type": "Bearer", "auth_token": reach["token"]}
        )  # as the unit's comment writes it
        (machine.payload / "dx-watch.env").write_text(
            f"DX_SECURITY_CONTEXT={context}\nDX_APISERVER_HOST=127.0.0.1\nDX_APISERVER_PORT={reach['port']}\n"
            f"DX_APISERVER_PROTOCOL=http\nDX_WATCH_PROJECT={reach['project']}\nDX_WATCH_FOLDER=/incoming\n"
            "DX_WATCH_RESULTS=/counts\nDX_WATCH_MODE=--local\n"
        )
        # The steps of the unit's own comment.
        machine.run("install", "-m", "0644", "/opt/test/systemd/bamcountd-dx.service", "/etc/systemd/system/")
        machine.run("install", "-d", "-m", "0700", "/etc/bamcountd")
        machine.run("install", "-m", "0600", "-o", "root", "-g", "root", "/opt/test/dx-watch.env", "/etc/bamcountd/")
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "start", dx_unit)  # Type=notify: READY=1 after the first poll
        state = machine.show(dx_unit, "ActiveState", "SubState", "StatusText")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        wanted = bams[0].name.removesuffix(".bam") + "_count.txt"

        def uploaded() -> dict[str, str]:
            text = machine.run("cat", "/srv/dx-platform/counts.json", check=False).stdout
            return json.loads(text) if text else {}

        wait_for(
            lambda: wanted in uploaded(),
            timeout=60,
            what="dx-watch to upload the count",
            context=lambda: machine.run("journalctl", "-u", dx_unit, "--no-pager", "-o", "cat", check=False).stdout,
        )
        assert base64.b64decode(uploaded()[wanted]).decode() == _seed_text(bams[0])
        machine.run("systemctl", "stop", dx_unit)
        stopped = machine.show(dx_unit, "ActiveState", "Result", "ExecMainStatus")
        assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, stopped
    finally:
        machine.run("systemctl", "stop", "dx-platform", check=False)
