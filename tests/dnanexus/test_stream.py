"""input_mode: stream over preauthenticated URLs, or download; through real dxpy and the emulator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dxpy  # type: ignore[import-untyped]
import pytest

from bamcountd.dnanexus import job as job_module
from bamcountd.synth import tricky_bam
from devtools.dnanexus_emulator import Emulator
from tests.dnanexus.conftest import APPLET_DIR
from tests.dnanexus.helpers import output_bytes, run_job, seed_text
from tests.support.bams import samtools_count, samtools_index, write_cram, write_fasta

FILTERS = ("-F", "0x904", "-q", "5")
FILTER_INPUTS = {"exclude_flags": "0x904", "min_mapq": 5}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A BAM and a CRAM (no reference needed) of the same reads, each with its index."""
    folder = tmp_path_factory.mktemp("stream")
    bam = tricky_bam(folder, reads=120000, seed=13, name="sample.bam")
    bai = samtools_index(bam)
    cram = write_cram(bam, folder / "sample.cram", reference=None)
    return {"bam": (bam, bai), "cram": (cram, Path(f"{cram}.crai"))}


def _add(emulator: Emulator, data: Path, index: Path) -> tuple[str, str]:
    return emulator.add_file(data.name, data.read_bytes()), emulator.add_file(index.name, index.read_bytes())


@pytest.mark.parametrize("kind", ["bam", "cram"])
@pytest.mark.parametrize("mode", ["stream", "download"])
def test_both_modes_give_the_seed_output(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]], kind: str, mode: str
) -> None:
    data, index = files[kind]
    data_id, index_id = _add(emulator, data, index)
    job_input = {
        "mappings_bam": dxpy.dxlink(data_id),
        "index_file": dxpy.dxlink(index_id),
        "input_mode": mode,
        **FILTER_INPUTS,
    }
    job = run_job(emulator, applet, job_input)
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data, FILTERS)
    assert job.output is not None and job.output["total_reads"] == samtools_count(data, *FILTERS)
    counts = json.loads(output_bytes(emulator, job, "counts_json"))
    assert (counts["bam"], counts["index"]) == (data.name, index.name)
    assert counts["notes"] == []
    size, index_size = data.stat().st_size, index.stat().st_size
    served = emulator.served[data_id] + emulator.served[index_id]
    if mode == "download":
        assert (emulator.served[data_id], emulator.served[index_id]) == (size, index_size)
    elif kind == "bam":
        # About one file: the probe's head, samtools' headers and block boundaries come twice.
        assert served <= 1.3 * (size + index_size), (served, size, index_size)
    else:
        # A CRAM's cross-check (samtools idxstats) reads every record over the URL too: twice.
        # Each samtools also reads its header with a request open at the end and hangs up, and
        # what the server sent by then (into the client's socket buffer) counts as served: more
        # the busier the machine, so each such request is allowed a slack.
        slack = _OPEN_ENDED_SLACK * _open_ended(emulator, data_id)
        assert served <= 2 * size + index_size + slack, (served, size, slack, _retries(emulator, job.id))
        assert emulator.served[index_id] == index_size
    log = (emulator.work / "jobs" / job.id / "job.log").read_text()
    assert "/F/D/" not in log.replace("/F/D/REDACTED/", "")  # no URL token in the log


def test_a_stream_that_cannot_read_ranges_falls_back_to_a_download(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, index = files["bam"]
    data_id, index_id = _add(emulator, data, index)
    emulator.preauthenticated_ranges = False
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(data_id), "index_file": dxpy.dxlink(index_id)})
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data)
    counts = json.loads(output_bytes(emulator, job, "counts_json"))
    assert counts["total"] == samtools_count(data)
    assert len(counts["notes"]) == 1 and "ignores Range requests" in counts["notes"][0]
    assert "downloaded" in counts["notes"][0]
    assert "stream_failed" in (emulator.work / "jobs" / job.id / "job.log").read_text()


def test_an_expired_url_is_an_app_error_with_the_platforms_words(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, index = files["bam"]
    data_id, index_id = _add(emulator, data, index)
    emulator.url_lifetime = 0
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(data_id), "index_file": dxpy.dxlink(index_id)})
    assert job.state == "failed"
    assert job.failure_reason == "AppError"
    assert job.failure_message is not None
    assert "HTTP 403" in job.failure_message and "the download URL has expired" in job.failure_message
    assert "sample.bam" in job.failure_message and "/F/D/REDACTED/" in job.failure_message


def test_a_truncated_streamed_file_is_an_app_error(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]]
) -> None:
    data, index = files["bam"]
    cut_id = emulator.add_file("sample.bam", data.read_bytes()[: data.stat().st_size // 2])
    index_id = emulator.add_file(index.name, index.read_bytes())
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(cut_id), "index_file": dxpy.dxlink(index_id)})
    assert job.state == "failed"
    assert job.failure_reason == "AppError"
    assert job.failure_message is not None and "truncated" in job.failure_message
    assert "sample.bam" in job.failure_message


def test_urls_outlive_the_jobs_timeout() -> None:
    spec = json.loads((APPLET_DIR / "dxapp.json").read_text())
    hours = max(policy["hours"] for policy in spec["runSpec"]["timeoutPolicy"].values())
    assert hours * 3600 < job_module.URL_SECONDS
    modes = next(item for item in spec["inputSpec"] if item["name"] == "input_mode")
    assert (modes["default"], tuple(modes["choices"])) == ("stream", job_module.INPUT_MODES)


@pytest.mark.parametrize("mode", ["stream", "download"])
def test_a_cram_with_a_reference_counts_without_reading_it(
    emulator: Emulator, applet: str, files: dict[str, tuple[Path, Path]], tmp_path: Path, mode: str
) -> None:
    data, index = files["cram"]
    data_id, index_id = _add(emulator, data, index)
    reference_id = emulator.add_file("ref.fa", write_fasta(tmp_path / "ref.fa", files["bam"][0]).read_bytes())
    job_input = {
        "mappings_bam": dxpy.dxlink(data_id),
        "index_file": dxpy.dxlink(index_id),
        "reference_fasta": dxpy.dxlink(reference_id),
        "input_mode": mode,
    }
    job = run_job(emulator, applet, job_input)
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == seed_text(data)
    assert emulator.served.get(reference_id, 0) == 0
    notes = json.loads(output_bytes(emulator, job, "counts_json"))["notes"]
    assert notes == ["reference_fasta was not read: counting decodes no bases, so it needs no reference"]


_OPEN_ENDED_SLACK = 2 << 20


def _open_ended(emulator: Emulator, dxid: str) -> int:
    """The requests for ``dxid`` with a range open at the end (``bytes=N-``)."""
    return sum(1 for asked_id, asked in emulator.downloads if asked_id == dxid and re.fullmatch(r"bytes=\d+-", asked))


def _retries(emulator: Emulator, job_id: str) -> list[str]:
    log = (emulator.work / "jobs" / job_id / "job.log").read_text()
    return [line[:300] for line in log.splitlines() if "retried" in line or "stream_failed" in line]
