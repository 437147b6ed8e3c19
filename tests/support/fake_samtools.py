"""The one fake samtools of the tests: fault injection only, never used to prove a count.

:func:`fake_samtools` writes an executable that takes the first :class:`Fault` matching its
command line, does what it says (record its pid, wait, print, exit, die, hang), and runs the
real samtools for everything else, and for a matching command too unless the fault ends it.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

#: The real samtools every fake runs (the oracle's own).
SAMTOOLS = shutil.which("samtools") or "samtools"


@dataclass(frozen=True)
class Fault:
    """One injected behaviour.

    ``on`` picks the commands: ``"read"`` a ``view`` without ``-H``, ``"count"`` a ``view``
    with ``-c``, ``"tally"`` the reading end of a tally pipeline (``idxstats -``), ``"first:X"``
    a command line whose first argument is X.  ``contains`` narrows it to command lines with an
    argument containing that text; ``once`` to the first command that creates that file.

    Then, in this order: ``pids`` gets a file named by the pid holding the arguments; the fake
    waits while ``hold`` exists, then ``delay`` seconds; ``stdout`` and ``stderr`` are printed;
    ``hang`` becomes ``sleep HANG`` (its command line shows HANG); ``end`` is ``"real"`` (run the
    real samtools), ``"exit:N"``, ``"signal:NAME"`` (sent to itself) or ``"abort"``; and
    ``stderr_after`` runs the real samtools as a child, prints it after, and exits as the child did.
    """

    on: str
    contains: str | None = None
    once: str | None = None
    pids: str | None = None
    hold: str | None = None
    delay: float = 0.0
    stdout: str = ""
    stderr: str = ""
    hang: str | None = None
    end: str = "real"
    stderr_after: str | None = None


_SCRIPT = """#!{python}
# A fake samtools for fault injection (tests/support/fake_samtools.py); never proves a count.
import json, os, signal, subprocess, sys, time
REAL = {real!r}
FAULTS = json.loads({faults!r})
args = sys.argv[1:]
def matches(fault):
    on = fault["on"]
    if on == "read":
        hit = args[:1] == ["view"] and "-H" not in args
    elif on == "count":
        hit = args[:1] == ["view"] and "-c" in args
    elif on == "tally":
        hit = args == ["idxstats", "-"]
    else:
        hit = args[:1] == [on[len("first:"):]]
    if hit and fault["contains"] is not None:
        hit = any(fault["contains"] in arg for arg in args)
    if hit and fault["once"] is not None:
        try:
            os.close(os.open(fault["once"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            hit = False
    return hit
fault = next((f for f in FAULTS if matches(f)), None)
if fault is not None:
    if fault["pids"]:
        with open(os.path.join(fault["pids"], str(os.getpid())), "w") as out:
            out.write(" ".join(args))
    while fault["hold"] and os.path.exists(fault["hold"]):
        time.sleep(0.05)  # held until the test removes the file
    if fault["delay"]:
        time.sleep(fault["delay"])
    sys.stdout.write(fault["stdout"])
    sys.stdout.flush()
    sys.stderr.write(fault["stderr"])
    sys.stderr.flush()
    if fault["hang"] is not None:
        os.execvp("sleep", ["sleep", fault["hang"]])
    if fault["stderr_after"] is not None:
        code = subprocess.call([REAL, *args])
        sys.stderr.write(fault["stderr_after"])
        sys.exit(code)
    end = fault["end"]
    if end.startswith("exit:"):
        sys.exit(int(end[len("exit:"):]))
    if end.startswith("signal:"):
        os.kill(os.getpid(), getattr(signal, end[len("signal:"):]))
    if end == "abort":
        os.abort()
os.execvp(REAL, [REAL, *args])
"""


def fake_samtools(
    folder: Path,
    *faults: Fault,
    name: str = "fake-samtools",
    python: str = sys.executable,
    real: str = SAMTOOLS,
) -> Path:
    """Write the fake as ``folder/name`` (made executable); ``python`` and ``real`` are the
    interpreter and samtools where it will run (another machine's, for a container)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    encoded = json.dumps([asdict(fault) for fault in faults])
    script.write_text(_SCRIPT.format(python=python, real=real, faults=encoded))
    script.chmod(0o755)
    return script


def processes_with(token: str) -> list[int]:
    """Pids whose command line contains ``token`` (a fake's hanging ``sleep``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if token.encode() in cmdline:
                found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
