"""Job mode: the applet run the way the platform runs it, against the emulator."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dxpy  # type: ignore[import-untyped]

from bamcountd.dnanexus import job as job_module
from bamcountd.options import OPTIONS
from devtools.dnanexus_emulator import Emulator
from tests.dnanexus.conftest import APPLET_DIR
from tests.dnanexus.helpers import output_bytes, run_job
from tests.support.bams import SAMTOOLS, header_names, oracle, samtools_count
from tests.support.fake_samtools import Fault, fake_samtools


def _seed_text(bam: Path, filters: tuple[str, ...] = ()) -> str:
    names = [*header_names(bam), "*"]
    counts = oracle(bam, names, filters)
    return (
        "".join(f"Region {name}: {counts[name]}\n" for name in names) + f"Total reads: {samtools_count(bam, *filters)}"
    )


def test_main_counts_like_samtools_in_the_seed_format(emulator: Emulator, applet: str, shared_bam: Path) -> None:
    bam_id = emulator.add_file("sample.bam", shared_bam.read_bytes(), folder="/incoming")
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(bam_id)})
    assert job.state == "done", job.failure_message
    assert job.output is not None
    assert output_bytes(emulator, job, "count_file").decode() == _seed_text(shared_bam)
    assert job.output["total_reads"] == samtools_count(shared_bam)
    counts = json.loads(output_bytes(emulator, job, "counts_json"))
    assert counts["total"] == samtools_count(shared_bam)
    assert counts["bam"] == "sample.bam"
    assert {r["region"]: r["count"] for r in counts["regions"]} == oracle(shared_bam, [*header_names(shared_bam), "*"])
    names = sorted(f.name for f in emulator.files_in("/results"))
    assert names == ["sample.counts.json", "sample_count.txt"]


def test_main_uses_the_given_index_and_filters(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "given.bam"
    shutil.copyfile(shared_bam, copy)
    index = tmp_path / "given.bam.bai"
    subprocess.run([SAMTOOLS, "index", str(copy), str(index)], check=True)
    bam_id = emulator.add_file("given.bam", copy.read_bytes())
    bai_id = emulator.add_file("given.bam.bai", index.read_bytes())
    job_input = {
        "mappings_bam": dxpy.dxlink(bam_id),
        "index_file": dxpy.dxlink(bai_id),
        "exclude_flags": "SECONDARY 0x800 UNMAP",  # ORed as a repeated -F: 0x904
        "min_mapq": 20,
    }
    job = run_job(emulator, applet, job_input)
    assert job.state == "done", job.failure_message
    assert output_bytes(emulator, job, "count_file").decode() == _seed_text(copy, ("-F", "0x904", "-q", "20"))
    log = (emulator.work / "jobs" / job.id / "job.log").read_text()
    assert "building_index" not in log


def test_not_a_bam_is_an_app_error(emulator: Emulator, applet: str) -> None:
    bam_id = emulator.add_file("bad.bam", b"this is not a BAM file\n" * 10)
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(bam_id)})
    assert job.state == "failed"
    assert job.failure_reason == "AppError"
    assert job.failure_message is not None and "bad.bam" in job.failure_message


def test_truncated_bam_is_an_app_error_with_samtools_words(emulator: Emulator, applet: str, shared_bam: Path) -> None:
    data = shared_bam.read_bytes()
    bam_id = emulator.add_file("cut.bam", data[: len(data) // 2])
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(bam_id)})
    assert job.state == "failed"
    assert job.failure_reason == "AppError"
    assert job.failure_message is not None and "cut.bam" in job.failure_message
    assert "missing EOF block" in job.failure_message  # samtools quickcheck's own words


def test_samtools_crash_is_an_app_internal_error(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    # A fake samtools only to inject the fault: it answers --version and quickcheck like the
    # real one, then dies on every counting command.
    crash = Fault("read", stderr="samtools view: injected crash\n", end="signal:SIGSEGV")
    fake = fake_samtools(tmp_path / "bin", crash, name="samtools")
    emulator.job_env["PATH"] = f"{fake.parent}:{os.environ['PATH']}"
    bam_id = emulator.add_file("ok.bam", shared_bam.read_bytes())
    job = run_job(emulator, applet, {"mappings_bam": dxpy.dxlink(bam_id)})
    assert job.state == "failed"
    assert job.failure_reason == "AppInternalError"
    assert job.failure_message is not None and "injected crash" in job.failure_message


def test_dxapp_json_matches_the_entry_point() -> None:
    spec = json.loads((APPLET_DIR / "dxapp.json").read_text())
    parameters = inspect.signature(job_module.main).parameters
    # main's own inputs, then the count options' (from the options table, through **count_inputs).
    own = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    count_inputs = [row.applet for row in OPTIONS if row.applet is not None]
    assert sorted(item["name"] for item in spec["inputSpec"]) == sorted(own + count_inputs)
    required = [item["name"] for item in spec["inputSpec"] if not item.get("optional") and "default" not in item]
    assert required == [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name in own]
    assert {item["name"] for item in spec["outputSpec"]} == {"count_file", "counts_json", "total_reads"}
    run_spec = spec["runSpec"]
    assert run_spec["interpreter"] == "python3" and (APPLET_DIR / run_spec["file"]).is_file()
    assert run_spec["execDepends"] == [{"name": "samtools"}]
    assert set(run_spec["executionPolicy"]["restartOn"]) == {"UnresponsiveWorker", "ExecutionError"}
    assert run_spec["restartableEntryPoints"] == "all"


def test_dx_build_accepts_the_applet(emulator: Emulator, tmp_path: Path) -> None:
    # dx-toolkit's own `dx build` validates dxapp.json and the source folder (dry run: no upload).
    dx = Path(sys.executable).with_name("dx")
    completed = subprocess.run(
        [str(dx), "build", "--dry-run", "--destination", f"{emulator.project}:/", str(APPLET_DIR)],
        env={**os.environ, **emulator.env(), "DX_USER_CONF_DIR": str(tmp_path / "dx-config")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "DRY-RUN" in completed.stdout
    assert "warning" not in completed.stderr.lower()
