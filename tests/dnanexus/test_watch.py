"""dx-watch against the emulator: one job (or one local count) per closed BAM, whatever happens."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import dxpy  # type: ignore[import-untyped]

from bamcountd.ledger import Ledger
from bamcountd.options import CountOptions
from bamcountd.synth import tricky_bam
from devtools.dnanexus_emulator import Emulator
from devtools.dx_runner import make_runner, settle
from tests.dnanexus.helpers import seed_text
from tests.support.bams import SAMTOOLS, write_cram
from tests.support.fake_samtools import Fault, fake_samtools


def _bams(folder: Path, count: int) -> list[Path]:
    return [tricky_bam(folder, reads=600, unplaced=30, seed=seed, name=f"s{seed}.bam") for seed in range(1, count + 1)]


def test_one_job_per_closed_bam_across_pages_restarts_and_runners(
    emulator: Emulator, applet: str, tmp_path: Path
) -> None:
    bams = _bams(tmp_path / "bams", 3)
    ids = {bam.name: emulator.add_file(bam.name, bam.read_bytes(), folder="/incoming") for bam in bams}
    index = tmp_path / "s1.bam.bai"
    subprocess.run([SAMTOOLS, "index", str(bams[0]), str(index)], check=True)
    bai_id = emulator.add_file("s1.bam.bai", index.read_bytes(), folder="/incoming")
    emulator.add_file("notes.txt", b"not a BAM", folder="/incoming")
    emulator.add_file("elsewhere.bam", bams[0].read_bytes(), folder="/other")
    emulator.add_file("nested.bam", bams[0].read_bytes(), folder="/incoming/sub")  # no --recurse
    growing = emulator.add_file("growing.bam", b"", folder="/incoming", state="open")

    runner = make_runner(emulator, tmp_path / "state", applet=applet)
    settle(runner, emulator)

    assert any("starting" in request for request in emulator.find_requests), "only one result page was read"
    jobs = emulator.root_jobs()
    assert sorted(job.input["mappings_bam"]["$dnanexus_link"]["id"] for job in jobs) == sorted(ids.values())
    by_bam = {job.input["mappings_bam"]["$dnanexus_link"]["id"]: job for job in jobs}
    assert by_bam[ids["s1.bam"]].input["index_file"]["$dnanexus_link"]["id"] == bai_id
    assert "index_file" not in by_bam[ids["s2.bam"]].input
    results = {f.name: f for f in emulator.files_in("/counts")}
    for bam in bams:
        count_file = results[f"{bam.stem}_count.txt"]
        assert count_file.data.decode() == seed_text(bam)
        assert emulator.files[ids[bam.name]].properties["bamcountd_result"] == count_file.id
        assert json.loads(results[f"{bam.stem}.counts.json"].data)["total"] == int(seed_text(bam).rsplit(" ", 1)[1])
    assert {entry.state for entry in runner.ledger.entries()} == {"done"}

    # The open BAM closes: counted on the next poll, and only then.
    assert all(job.input["mappings_bam"]["$dnanexus_link"]["id"] != growing for job in jobs)
    with emulator.lock:
        emulator.files[growing].data = bams[1].read_bytes()
        emulator.files[growing].parts = {}
    emulator.close_file(growing)
    settle(runner, emulator)
    assert len(emulator.root_jobs()) == 4

    # A restart (same ledger) and a second runner (own ledger, sees the BAMs' properties): no launch.
    runner.ledger.close()
    settle(make_runner(emulator, tmp_path / "state", applet=applet), emulator)
    other = make_runner(emulator, tmp_path / "other-state", applet=applet)
    settle(other, emulator)
    assert len(emulator.root_jobs()) == 4
    assert emulator.run_requests == 4
    assert {entry.state for entry in other.ledger.entries()} == {"done"}


def test_failed_job_is_retried_then_marked_failed(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("flaky.bam", shared_bam.read_bytes(), folder="/incoming")
    emulator.fail_next_jobs(3, reason="AppInternalError", message="worker lost")
    runner = make_runner(emulator, tmp_path / "state", applet=applet, max_attempts=3)
    settle(runner, emulator)
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "quarantined" and entry.attempts == 3
    assert entry.error == "AppInternalError: worker lost"
    assert emulator.files[bam_id].properties["bamcountd_failed"] == "AppInternalError: worker lost"
    assert len(emulator.root_jobs()) == 3


def test_failed_job_is_retried_until_it_succeeds(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("flaky.bam", shared_bam.read_bytes(), folder="/incoming")
    emulator.fail_next_jobs(1, reason="UnresponsiveWorker", message="worker lost")
    runner = make_runner(emulator, tmp_path / "state", applet=applet)
    settle(runner, emulator)
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "done" and entry.attempts == 2
    assert emulator.files[entry.result or ""].data.decode() == seed_text(shared_bam)


def test_job_terminated_by_a_person_is_not_relaunched(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    emulator.fail_next_jobs(1, reason="Terminated", message="terminated by user-alice", state="terminated")
    runner = make_runner(emulator, tmp_path / "state", applet=applet)
    settle(runner, emulator)
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "quarantined"
    assert entry.error == "Terminated: terminated by user-alice"
    assert len(emulator.root_jobs()) == 1


def test_bad_bam_is_marked_failed_without_retry(emulator: Emulator, applet: str, tmp_path: Path) -> None:
    bam_id = emulator.add_file("junk.bam", b"junk" * 100, folder="/incoming")
    runner = make_runner(emulator, tmp_path / "state", applet=applet)
    settle(runner, emulator)
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "quarantined" and entry.attempts == 1
    assert entry.error is not None and entry.error.startswith("AppError: ") and "junk.bam" in entry.error
    assert len(emulator.root_jobs()) == 1


def test_local_mode_counts_here_and_uploads_once(emulator: Emulator, tmp_path: Path) -> None:
    bams = _bams(tmp_path / "bams", 2)
    ids = {bam.name: emulator.add_file(bam.name, bam.read_bytes(), folder="/incoming") for bam in bams}
    bad = emulator.add_file("cut.bam", bams[0].read_bytes()[:500], folder="/incoming")
    runner = make_runner(emulator, tmp_path / "state", applet=None)
    settle(runner, emulator)
    results = {f.name: f for f in emulator.files_in("/counts")}
    assert sorted(results) == ["s1.counts.json", "s1_count.txt", "s2.counts.json", "s2_count.txt"]
    for bam in bams:
        assert results[f"{bam.stem}_count.txt"].data.decode() == seed_text(bam)
        assert results[f"{bam.stem}_count.txt"].properties["bamcountd_source"] == ids[bam.name]
        assert json.loads(results[f"{bam.stem}.counts.json"].data)["bam"] == bam.name
    failed = runner.ledger.get(bad)
    assert failed is not None and failed.state == "quarantined"
    assert failed.error is not None and "cut.bam" in failed.error and "input.bam" not in failed.error
    assert emulator.root_jobs() == []

    # Crash after the upload, before the BAM's property and the ledger: the result is found, not redone.
    with emulator.lock:
        del emulator.files[ids["s1.bam"]].properties["bamcountd_result"]
    runner.ledger.close()
    shutil.rmtree(tmp_path / "state")
    again = make_runner(emulator, tmp_path / "state", applet=None)
    settle(again, emulator)
    assert len(emulator.files_in("/counts")) == 4
    entry = again.ledger.get(ids["s1.bam"])
    assert entry is not None and entry.state == "done" and entry.result == results["s1_count.txt"].id


def test_ledger_survives_reopening(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.sqlite", lock=False)
    ledger.record_launch("file-1", scope="project-1", name="a.bam", handle="job-1", attempt=1)
    ledger.record_done("file-2", scope="project-1", name="b.bam", result="file-9")
    ledger.close()
    reopened = Ledger.open(tmp_path / "l.sqlite", lock=False)
    assert [(e.id, e.state, e.handle) for e in reopened.launched()] == [("file-1", "running", "job-1")]
    entry = reopened.get("file-2")
    assert entry is not None and entry.result == "file-9"


def test_properties_reach_the_platform(emulator: Emulator) -> None:
    # Sanity of the emulator's wire format for the calls the runner depends on.
    file_id = emulator.add_file("x.bam", b"data", folder="/incoming")
    dxpy.DXFile(file_id, project=emulator.project).set_properties({"bamcountd_job": "job-x"})
    assert dxpy.DXFile(file_id).describe(fields={"properties": True})["properties"] == {"bamcountd_job": "job-x"}


def test_local_transient_failure_is_retried_then_marked_failed(
    emulator: Emulator, shared_bam: Path, tmp_path: Path
) -> None:
    # A fake samtools only to inject the fault: real for everything but counting views.
    fake = fake_samtools(tmp_path / "bin", Fault("read", stderr="injected crash\n", end="exit:1"), name="samtools")
    bam_id = emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    state = tmp_path / "state"
    runner = make_runner(emulator, state, applet=None, max_attempts=2)
    runner.config = replace(runner.config, count=CountOptions(index_cache=state / "cache", samtools=str(fake)))
    runner.poll_once()
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "failed" and entry.attempts == 1
    runner.poll_once()
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "quarantined" and entry.attempts == 2
    assert entry.error is not None and entry.error.startswith("SamtoolsFailed: ") and "injected crash" in entry.error
    assert emulator.files[bam_id].properties["bamcountd_failed"] == entry.error
    assert emulator.files_in("/counts") == []


def test_a_cram_is_paired_with_its_crai_and_streamed_once(emulator: Emulator, applet: str, tmp_path: Path) -> None:
    bam = tricky_bam(tmp_path / "bams", reads=600, unplaced=30, seed=5, name="c.bam")
    cram = write_cram(bam, tmp_path / "bams" / "c.cram", reference=None)
    cram_id = emulator.add_file("c.cram", cram.read_bytes(), folder="/incoming")
    crai_id = emulator.add_file("c.cram.crai", Path(f"{cram}.crai").read_bytes(), folder="/incoming")
    emulator.add_file("c.crai", Path(f"{cram}.crai").read_bytes(), folder="/incoming")  # an index, not a CRAM
    for _ in range(2):  # a second runner over the same state launches nothing more
        runner = make_runner(emulator, tmp_path / "state", applet=applet)
        settle(runner, emulator)
    (job,) = emulator.root_jobs()
    assert job.input["mappings_bam"]["$dnanexus_link"]["id"] == cram_id
    assert job.input["index_file"]["$dnanexus_link"]["id"] == crai_id
    assert job.input["input_mode"] == "stream"
    assert job.state == "done", job.failure_message
    (result,) = (f for f in emulator.files_in("/counts") if f.name.endswith("_count.txt"))
    assert result.name == "c_count.txt"
    assert result.data.decode() == seed_text(cram)
