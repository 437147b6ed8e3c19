"""Scatter by shards: the plan's shards spread over count_shards subjobs, gathered and verified;
through real dxpy and the emulator, against a single job and samtools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dxpy  # type: ignore[import-untyped]
import pytest

from bamcountd.count import CountPlan
from bamcountd.dnanexus.job import SCATTER_BYTES_PER_JOB, balance, scatter_subjobs
from bamcountd.synth import tricky_bam
from devtools.dnanexus_emulator import Emulator, Job
from tests.dnanexus.helpers import output_bytes, run_job, seed_text
from tests.support.bams import samtools_count, samtools_index, write_cram
from tests.support.fake_samtools import Fault, fake_samtools

FILTERS = ("-F", "0x904", "-q", "5")
#: Small shards, so that a test file is cut as a big one is.
INPUTS = {"exclude_flags": "0x904", "min_mapq": 5, "min_shard_reads": 2000}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A BAM whose chr1 holds most of the reads (62%), and a CRAM of the same reads; each with its index."""
    folder = tmp_path_factory.mktemp("scatter")
    bam = tricky_bam(folder, reads=60000, seed=17, name="sample.bam")
    cram = write_cram(bam, folder / "sample.cram", reference=None)
    return {"bam": (bam, samtools_index(bam)), "cram": (cram, Path(f"{cram}.crai"))}


def _input(emulator: Emulator, data: Path, index: Path, mode: str, **extra: object) -> dict[str, object]:
    data_id = emulator.add_file(data.name, data.read_bytes())
    index_id = emulator.add_file(index.name, index.read_bytes())
    return {
        "mappings_bam": dxpy.dxlink(data_id),
        "index_file": dxpy.dxlink(index_id),
        "input_mode": mode,
        **INPUTS,
        **extra,
    }


def _subjobs(emulator: Emulator, root: Job, function: str) -> list[Job]:
    return [job for job in emulator.jobs.values() if job.root == root.id and job.function == function]


def _plan(emulator: Emulator, root: Job) -> CountPlan:
    (gather_job,) = _subjobs(emulator, root, "gather")
    data = emulator.files[gather_job.input["plan"]["$dnanexus_link"]].data
    assert b"/F/D/" not in data.replace(b"/F/D/REDACTED/", b"")  # no URL token in the plan
    return CountPlan.from_json(json.loads(data))


@pytest.mark.parametrize(("kind", "mode"), [(k, m) for k in ("bam", "cram") for m in ("stream", "download")])
def test_a_scatter_gives_the_single_jobs_output(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]], kind: str, mode: str
) -> None:
    data, index = files[kind]
    job_input = _input(emulator, data, index, mode, scatter=True, scatter_jobs=3)
    single = run_job(emulator, applet, {**job_input, "scatter": False})
    assert single.state == "done", single.failure_message
    job = run_job(emulator, applet, job_input)
    assert job.state == "done", job.failure_message
    # The seed's count_file, byte for byte as a single job writes it, every number samtools'.
    count_file = output_bytes(emulator, job, "count_file")
    assert count_file == output_bytes(emulator, single, "count_file")
    assert count_file.decode() == seed_text(data, FILTERS)
    assert job.output is not None and job.output["total_reads"] == samtools_count(data, *FILTERS)
    scattered = json.loads(output_bytes(emulator, job, "counts_json"))
    alone = json.loads(output_bytes(emulator, single, "counts_json"))
    planned = _plan(emulator, job)
    assert scattered["shards"] == len(planned.shards)
    for key in ("seconds", "shards"):  # its own time; a scatter cuts for all its subjobs' processes
        del scattered[key], alone[key]
    assert scattered == alone
    assert scattered["verification"] == ("index" if kind == "bam" else "records" if mode == "stream" else "containers")
    # The large reference (chr1, region 0) is counted in parts by more than one subjob.
    workers = _subjobs(emulator, job, "count_shards")
    assert len(workers) == 2  # a small file: the rule's least, under scatter_jobs
    counted = [{n for n in worker.input["shards"] if 0 in planned.shards[n].regions} for worker in workers]
    assert all(counted), counted
    assert sorted(n for worker in workers for n in worker.input["shards"]) == list(range(len(planned.shards)))
    if mode == "download":  # main plans from its download; each subjob downloads the file again
        data_id = job_input["mappings_bam"]["$dnanexus_link"]  # type: ignore[index]
        assert emulator.served[data_id] == 4 * data.stat().st_size  # and the single job once
    for worker in workers:
        assert worker.output is not None and worker.output["mode"] == mode
        log = (emulator.work / "jobs" / worker.id / "job.log").read_text()
        assert "building_index" not in log
        assert "/F/D/" not in log.replace("/F/D/REDACTED/", "")  # no URL token in the log


def test_a_streamed_scatter_reads_the_bam_about_once(
    emulator: Emulator, applet: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Big enough for its shards (the default cut) that each samtools' header read and read-ahead
    # past its range (a few hundred kB each over HTTP) weigh as they do in a real file's.
    data = tricky_bam(tmp_path_factory.mktemp("once"), reads=300000, seed=3, name="once.bam")
    index = samtools_index(data)
    data_id = emulator.add_file(data.name, data.read_bytes())
    index_id = emulator.add_file(index.name, index.read_bytes())
    job_input = {"mappings_bam": dxpy.dxlink(data_id), "index_file": dxpy.dxlink(index_id), "scatter": True}
    job = run_job(emulator, applet, job_input)
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data)
    workers = _subjobs(emulator, job, "count_shards")
    assert len(workers) == 2
    size, index_size = data.stat().st_size, index.stat().st_size
    # Each worker reads only its shards' byte ranges (and the header); the index, which is
    # small, is fetched whole by main and by each subjob.
    assert emulator.served[data_id] <= 1.3 * size, (emulator.served[data_id], size)
    assert emulator.served[index_id] == 3 * index_size


def test_without_an_index_main_builds_it_once_for_every_subjob(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, _ = files["bam"]
    data_id = emulator.add_file(data.name, data.read_bytes())
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(data_id), "scatter": True, **INPUTS})
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data, FILTERS)
    notes = json.loads(output_bytes(emulator, job, "counts_json"))["notes"]
    assert notes == ["no index_file was given: the file was downloaded, since building its index reads all of it"]
    workers = _subjobs(emulator, job, "count_shards")
    assert len(workers) == 2
    for worker in workers:
        assert worker.input["input_mode"] == "download"
        assert "building_index" not in (emulator.work / "jobs" / worker.id / "job.log").read_text()


def test_a_failing_subjob_fails_the_job_with_samtools_words(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # A fake samtools only to inject the fault: main's checks and plan run as the real one's
    # (they count nothing), then every count in the subjobs dies.
    crash = Fault("count", stderr="samtools view: injected crash\n", end="signal:SIGSEGV")
    fake = fake_samtools(tmp_path / "bin", crash, name="samtools")
    emulator.job_env["PATH"] = f"{fake.parent}:{os.environ['PATH']}"
    data, index = files["bam"]
    job = run_job(emulator, applet, _input(emulator, data, index, "stream", scatter=True))
    assert job.state == "failed"
    assert job.failure_reason == "AppInternalError"
    assert job.failure_message is not None and "injected crash" in job.failure_message
    assert "sample.bam" in job.failure_message
    assert any(worker.state == "failed" for worker in _subjobs(emulator, job, "count_shards"))


def test_a_truncated_file_fails_a_scatter_with_samtools_words(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, index = files["bam"]
    cut_id = emulator.add_file(data.name, data.read_bytes()[: data.stat().st_size // 2])
    index_id = emulator.add_file(index.name, index.read_bytes())
    job_input = {"mappings_bam": dxpy.dxlink(cut_id), "index_file": dxpy.dxlink(index_id), "scatter": True}
    job = run_job(emulator, applet, job_input)
    assert job.state == "failed"
    assert job.failure_reason == "AppError"
    assert job.failure_message is not None and "sample.bam" in job.failure_message
    assert "truncated" in job.failure_message or "missing EOF block" in job.failure_message


def test_the_subjob_rule() -> None:
    gib = 1024**3
    assert 10 * gib == SCATTER_BYTES_PER_JOB
    assert [scatter_subjobs(size, 8) for size in (1, 10 * gib, 25 * gib, 50 * gib, 100 * gib)] == [2, 2, 3, 5, 8]
    assert scatter_subjobs(100 * gib, 20) == 10
    assert scatter_subjobs(100 * gib, 1) == 1


def test_balance_spreads_one_references_shards_over_the_bins() -> None:
    # One reference cut into six pieces (with its five boundary corrections), and small ones.
    weights = [10.0] * 6 + [0.0] * 5 + [3.0, 2.0, 1.0]
    bins = balance(weights, 3)
    assert bins == balance(weights, 3)  # deterministic
    assert sorted(n for numbers in bins for n in numbers) == list(range(len(weights)))  # each exactly once
    assert all(sum(1 for n in numbers if n < 6) == 2 for numbers in bins)  # the big reference in every bin
    loads = [sum(max(weights[n], 1.0) for n in numbers) for numbers in bins]
    assert max(loads) - min(loads) <= 2.0
    assert balance([5.0], 4) == [[0]]
    assert balance([], 3) == []


def test_parts_that_disagree_with_the_index_are_counted_again_as_a_single_job(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # A fake samtools only to inject the fault: one piece of chr1, once, says a wrong number.
    wrong = Fault("count", contains="{chr1}:", once=str(tmp_path / "once"), stdout="999999\n", end="exit:0")
    fake = fake_samtools(tmp_path / "bin", wrong, name="samtools")
    emulator.job_env["PATH"] = f"{fake.parent}:{os.environ['PATH']}"
    data, index = files["bam"]
    job_input = _input(emulator, data, index, "stream", scatter=True)
    del job_input["exclude_flags"], job_input["min_mapq"]
    job = run_job(emulator, applet, job_input)
    assert job.state == "done", job.failure_message
    assert (tmp_path / "once").exists()  # the fault did fire
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data)
    (gather_job,) = _subjobs(emulator, job, "gather")
    assert "parts_differ" in (emulator.work / "jobs" / gather_job.id / "job.log").read_text()


def test_an_expired_url_fails_a_scatter_with_the_platforms_words(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, index = files["bam"]
    emulator.url_lifetime = 0
    job = run_job(emulator, applet, _input(emulator, data, index, "stream", scatter=True))
    assert job.state == "failed"
    assert job.failure_reason == "AppError"
    assert job.failure_message is not None
    assert "HTTP 403" in job.failure_message and "the download URL has expired" in job.failure_message
    assert "/F/D/REDACTED/" in job.failure_message


def test_a_scatter_whose_stream_cannot_read_ranges_downloads_in_every_subjob(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, index = files["bam"]
    emulator.preauthenticated_ranges = False
    job = run_job(emulator, applet, _input(emulator, data, index, "stream", scatter=True))
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data, FILTERS)
    notes = json.loads(output_bytes(emulator, job, "counts_json"))["notes"]
    assert len(notes) == 1 and "ignores Range requests" in notes[0] and "every subjob downloaded" in notes[0]
    workers = _subjobs(emulator, job, "count_shards")
    assert workers and all(worker.input["input_mode"] == "download" for worker in workers)
