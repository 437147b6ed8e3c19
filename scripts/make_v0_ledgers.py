"""Writes tests/data/ledger-v0-*.sqlite3: state databases as bamcountd 0.1.0 writes them.

They are made by the release's own code, bamcountd.service.ledger.Ledger (the daemon's
``STATE/ledger.sqlite3``, table ``files``) and bamcountd.dnanexus.state.Ledger (dx-watch's
``STATE/dx-watch.sqlite``, table ``bams``), with a row in every state, so that
tests/test_ledger_module.py can check that bamcountd.ledger migrates them.  Those modules go
away once bamcountd.ledger replaces them: run this at a commit that still has them (the files
were made at 53faf39), from the repository root: .venv/bin/python scripts/make_v0_ledgers.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bamcountd.dnanexus.state import Ledger as DxLedger
from bamcountd.service.ledger import Identity
from bamcountd.service.ledger import Ledger as DaemonLedger

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
ROOT = Path("/watch/in")


def daemon(state: Path) -> Path:
    def ident(n: int) -> Identity:
        return Identity(dev=2049, inode=1000 + n, size=10_000 * n, mtime_ns=1_700_000_000_000_000_000 + n)

    with DaemonLedger.open(state) as ledger:
        rows = {
            "seen": ROOT / "seen.bam",
            "queued": ROOT / "queued.bam",
            "requeued": ROOT / "sub" / "requeued.bam",
            "running": ROOT / "running.bam",
            "done": ROOT / "done.bam",
            "failed": ROOT / "failed.bam",
            "quarantined": ROOT / "quarantined.bam",
            "latin1": Path(os.fsdecode(b"/watch/in/caf\xe9.bam")),  # not UTF-8
        }
        for n, (what, path) in enumerate(rows.items(), start=1):
            identity = ident(n)
            ledger.observe(path, ROOT, identity, now=1_700_000_100.0 + n)
            if what == "seen":
                continue
            ledger.queue(path, identity)
            if what in ("queued", "latin1"):
                continue
            ledger.start(path, identity)
            if what == "requeued":
                ledger.requeue(path, identity, not_before=1_700_000_900.0, error="results folder: No space left")
            elif what == "done":
                ledger.finish(path, identity)
            elif what == "failed":
                ledger.fail(path, identity, "samtools: exit 1", retry_at=1_700_000_500.0)
                ledger.start(path, identity)
                ledger.fail(path, identity, "samtools: exit 1 again", retry_at=1_700_000_800.0)
            elif what == "quarantined":
                ledger.quarantine(path, identity, "CorruptBam: truncated BGZF block")
        # "running" stays running: the database of a daemon that died mid-count.
    return state / "ledger.sqlite3"


def dx_watch(state: Path) -> Path:
    path = state / "dx-watch.sqlite"
    ledger = DxLedger(path)
    try:
        where = {"project": "project-G0000000000000000000000P"}
        for what, job, attempt in (
            ("LAUNCHED", "job-LAUNCHED000000000000000", 2),
            ("DONE", "job-DONE0000000000000000000", 1),
        ):
            bam = {"file_id": f"file-{what:0<22}", "name": f"{what.lower()}.bam", **where}
            ledger.record_launch(**bam, job_id=job, attempt=attempt)
        ledger.record_done(
            file_id="file-DONE000000000000000000", name="done.bam", result_id="file-RESULT0000000000000000", **where
        )
        ledger.record_failed(
            file_id="file-FAILED00000000000000000", name="failed.bam", reason="AppError: no index", attempts=3, **where
        )
        ledger.record_retry(
            file_id="file-RETRY00000000000000000",
            name="retry.bam",
            reason="SamtoolsFailed: exit 1",
            attempts=1,
            **where,
        )
    finally:
        ledger.close()
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for made, target in (
            (daemon(Path(folder) / "daemon"), "ledger-v0-daemon.sqlite3"),
            (dx_watch(Path(folder) / "dx"), "ledger-v0-dx-watch.sqlite3"),
        ):
            leftovers = [p.name for p in made.parent.iterdir() if p.name.endswith(("-wal", "-shm"))]
            assert not leftovers, leftovers  # the last close checkpointed the WAL into the file
            shutil.copyfile(made, DATA / target)
            print(DATA / target)


if __name__ == "__main__":
    main()
