"""A real ``bamcountd serve`` process, real BAMs dropped the ways uploaders drop them, every
count checked against ``samtools view -c``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service.helpers import (
    assert_result_matches,
    drop_by_rename,
    drop_slowly,
    expected_counts,
    result_path,
    results,
)
from tests.support.daemon import Daemon, Daemons, Folders
from tests.support.waiting import wait_for


def ledger_states(folders: Folders) -> dict[bytes, str]:
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        return {bytes(path): state for path, state in db.execute("SELECT key, state FROM items")}


@pytest.mark.timeout(90)
def test_slow_copy_rename_and_subfolders_are_counted_once(
    templates: list[Path], folders: Folders, daemons: Daemons
) -> None:
    daemon = daemons.start(extra=["--formats", "tsv,seed"])
    (folders.watch / "run 1" / "lane").mkdir(parents=True)
    slow = drop_slowly(templates[0], folders.watch / "slow.bam", chunks=8, pause=0.2)
    renamed = drop_by_rename(templates[1], folders.watch / "run 1" / "lane" / "renamed.bam")
    with_index = folders.watch / "indexed.bam"
    shutil.copyfile(templates[2], with_index)
    shutil.copyfile(templates[2].with_name(templates[2].name + ".bai"), folders.watch / "indexed.bam.bai")
    # Not BAMs, or not ready: never counted.
    (folders.watch / "partial.bam.part").write_bytes(templates[0].read_bytes()[:1000])
    (folders.watch / ".hidden.bam").write_bytes(templates[0].read_bytes())
    os.symlink(templates[0], folders.watch / "link.bam")

    expected = {
        "slow.bam": (slow, templates[0]),
        "run 1/lane/renamed.bam": (renamed, templates[1]),
        "indexed.bam": (with_index, templates[2]),
    }
    wait_for(
        lambda: all(result_path(folders, rel).exists() for rel in expected),
        timeout=60,
        what="three results",
        context=daemon.log,
    )
    for relative, (bam, template) in expected.items():
        document = assert_result_matches(result_path(folders, relative), bam, template)
        stat = bam.stat()
        assert document["source"]["path"] == str(bam)
        assert (document["source"]["size"], document["source"]["inode"]) == (stat.st_size, stat.st_ino)
        assert document["source"]["mtime_ns"] == stat.st_mtime_ns
        assert document["bamcountd"]
        assert document["bam"] == str(bam)

    # The same JSON as `bamcountd count --format json` (plus source and version), and the extra
    # formats are exactly what `count` prints.
    def count_output(fmt: str) -> str:
        argv = [sys.executable, "-m", "bamcountd", "count", str(with_index), "--format", fmt]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    daemon_json = json.loads(result_path(folders, "indexed.bam").read_text())
    count_json = json.loads(count_output("json"))
    assert set(daemon_json) == {*count_json, "source", "bamcountd"}
    assert {k: v for k, v in daemon_json.items() if k in count_json and k != "seconds"} == {
        k: v for k, v in count_json.items() if k != "seconds"
    }
    stem = folders.results / "indexed"
    assert stem.with_name("indexed.counts.tsv").read_text() == count_output("tsv")
    assert stem.with_name("indexed.counts.txt").read_text() == count_output("seed")
    assert stem.with_name("indexed.counts.txt").read_text().endswith(f"Total reads: {daemon_json['total']}")
    # The BAM that came with a fresh index used it; the others got one built in the state folder.
    assert json.loads(result_path(folders, "indexed.bam").read_text())["index"] == str(with_index) + ".bai"
    assert json.loads(result_path(folders, "slow.bam").read_text())["index"].startswith(str(folders.state))
    assert daemon.stop() == 0
    assert [p.relative_to(folders.results).as_posix() for p in results(folders)] == [
        f"{stem}.{suffix}"
        for stem in ("indexed", "run 1/lane/renamed", "slow")
        for suffix in ("counts.json", "counts.tsv", "counts.txt")
    ]
    assert set(ledger_states(folders).values()) == {"done"}
    # The slow copy was seen while it grew, but counted only once it had settled.
    counted = [e for e in daemon.events() if e.get("event") == "done" and e["file"].endswith("slow.bam")]
    assert len(counted) == 1


@pytest.mark.timeout(90)
def test_replaced_file_is_counted_again_and_restart_does_not_recount(
    templates: list[Path], folders: Folders, daemons: Daemons
) -> None:
    daemon = daemons.start()
    bam = drop_by_rename(templates[0], folders.watch / "sample.bam")
    result = result_path(folders, "sample.bam")
    wait_for(result.exists, timeout=30, what="first result", context=daemon.log)
    assert_result_matches(result, bam, templates[0])
    first_inode = json.loads(result.read_text())["source"]["inode"]

    drop_by_rename(templates[1], bam)  # a new version under the same name
    wait_for(
        lambda: json.loads(result.read_text())["source"]["inode"] != first_inode,
        timeout=30,
        what="the replaced BAM's result",
    )
    assert_result_matches(result, bam, templates[1])
    assert expected_counts(templates[1]) != expected_counts(templates[0])
    assert daemon.stop() == 0

    # The indexes the daemon built for both versions (in its state folder) went once each was
    # counted; a leftover (a crash during a build) goes at the next start.
    assert list((folders.state / "index").iterdir()) == []
    (folders.state / "index" / ".0123abcd.bai.77.1.part").write_bytes(b"partial")
    # A restart finds everything done: nothing is counted again.
    daemon.start()
    daemon.signal(signal.SIGHUP)  # and a rescan on demand changes nothing
    wait_for(
        lambda: any(e.get("event") == "rescan_requested" for e in daemon.events()),
        timeout=10,
        what="SIGHUP",
        context=daemon.log,
    )
    assert daemon.stop() == 0
    assert not [e for e in daemon.events() if e.get("event") == "counting"]
    assert [e["files"] for e in daemon.events() if e.get("event") == "pruned_indexes"] == [1]
    assert list((folders.state / "index").iterdir()) == []
    assert [p.name for p in results(folders)] == ["sample.counts.json"]


@pytest.mark.timeout(90)
def test_odd_file_names(templates: list[Path], folders: Folders, daemons: Daemons) -> None:
    names = ["with space.bam", "new\nline.bam", "caf\u00e9 \u2013 ok.bam"]
    raw_name = b"latin1-\xe9.bam"  # not UTF-8
    daemon = daemons.start()
    bams = [drop_by_rename(templates[0], folders.watch / name) for name in names]
    raw_bam = Path(os.fsdecode(os.path.join(os.fsencode(folders.watch), raw_name)))
    shutil.copyfile(templates[0], raw_bam)
    bams.append(raw_bam)
    targets = [result_path(folders, bam.name) for bam in bams]
    wait_for(lambda: all(t.exists() for t in targets), timeout=60, what="results for odd names", context=daemon.log)
    for target, bam in zip(targets, bams, strict=True):
        document = assert_result_matches(target, bam, templates[0])
        assert os.fsencode(document["source"]["path"]) == os.fsencode(bam)
    assert daemon.stop() == 0


@pytest.mark.timeout(90)
def test_sighup_reloads_what_can_change_and_survives_a_bad_file(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    config = tmp_path / "bamcountd.toml"
    config.write_text("max_files = 2\n")
    daemon = daemons.start(extra=["--config", str(config)])
    drop_by_rename(templates[0], folders.watch / "before.bam")
    wait_for(result_path(folders, "before.bam").exists, timeout=30, what="first result", context=daemon.log)
    assert not (folders.results / "before.counts.tsv").exists()

    # --results on the command line wins over the file; metrics_addr needs a restart.
    config.write_text(
        f'formats = ["tsv"]\nmax_files = 1\nresults = "{tmp_path / "elsewhere"}"\nmetrics_addr = "127.0.0.1:1"\n'
    )
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: bool(_events(daemon, "config_reloaded")), timeout=10, what="reload", context=daemon.log)
    (reloaded,) = _events(daemon, "config_reloaded")
    assert {"formats", "max_files"} <= set(reloaded["changed"]) and "results" not in reloaded["changed"]
    (restart,) = _events(daemon, "reload_needs_restart")
    assert restart["keys"] == ["metrics_addr"]
    after = drop_by_rename(templates[1], folders.watch / "after.bam")
    # The extra formats are written before the JSON, so the JSON is the one to wait for.
    wait_for(result_path(folders, "after.bam").exists, timeout=30, what="result after reload", context=daemon.log)
    assert (folders.results / "after.counts.tsv").exists()
    assert_result_matches(result_path(folders, "after.bam"), after, templates[1])

    config.write_text("max_files = 0\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: bool(_events(daemon, "reload_failed")), timeout=10, what="failed reload", context=daemon.log)
    assert "max_files: must be at least 1" in _events(daemon, "reload_failed")[0]["error"]
    late = drop_by_rename(templates[2], folders.watch / "late.bam")
    wait_for(result_path(folders, "late.bam").exists, timeout=30, what="still serving", context=daemon.log)
    assert (folders.results / "late.counts.tsv").exists()
    assert_result_matches(result_path(folders, "late.bam"), late, templates[2])
    assert daemon.stop() == 0
    assert not (tmp_path / "elsewhere").exists()


def _events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]
