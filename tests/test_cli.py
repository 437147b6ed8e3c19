"""The command line: formats, files, exit codes, logs, the demo."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bamcountd import CountRequest, Filters, count_bam_sync, logs
from bamcountd.cli import main
from bamcountd.report import format_seed, write_atomic
from tests.support.bams import header_names, oracle, samtools_count


def expected_rows(bam: Path, *filters: str) -> list[tuple[str, int]]:
    names = [*header_names(bam), "*"]
    counts = oracle(bam, names, filters)
    return [(name, counts[name]) for name in names]


def test_tsv(shared_bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", str(shared_bam), "--format", "tsv", "-F", "0x904", "-q", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = expected_rows(shared_bam, "-F", "0x904", "-q", "20")
    assert lines == [f"{name}\t{count}" for name, count in rows] + [
        f"total\t{samtools_count(shared_bam, '-F', '0x904', '-q', '20')}"
    ]


def test_json_contract(shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "counts.json"
    assert main(["count", str(shared_bam), "-o", str(out), "-f", "PROPER_PAIR", "-j", "3"]) == 0
    assert capsys.readouterr().out == ""
    document = json.loads(out.read_text())
    assert document["bam"] == str(shared_bam)
    assert document["total"] == samtools_count(shared_bam, "-f", "2")
    assert [(r["region"], r["count"]) for r in document["regions"]] == expected_rows(shared_bam, "-f", "2")
    assert document["filters"] == {"require_flags": 2, "exclude_flags": 0, "exclude_all_flags": 0, "min_mapq": 0}
    assert document["samtools"].startswith("1.")
    assert document["jobs"] == 3
    assert isinstance(document["seconds"], float)


def test_table(shared_bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", str(shared_bam), "--format", "table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["region", "count"]
    rows = expected_rows(shared_bam)
    assert [line.rsplit(None, 1) for line in lines[1 : len(rows) + 1]] == [[name, str(count)] for name, count in rows]
    assert lines[-1].split() == ["total", str(samtools_count(shared_bam))]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_seed_format_is_the_applets_byte_for_byte(shared_bam: Path, tmp_path: Path) -> None:
    out = tmp_path / "sample_count.txt"
    assert main(["count", str(shared_bam), "--format", "seed", "-o", str(out)]) == 0
    rows = expected_rows(shared_bam)
    expected = (
        "".join(f"Region {name}: {count}\n" for name, count in rows) + f"Total reads: {samtools_count(shared_bam)}"
    )
    assert out.read_text() == expected
    result = count_bam_sync(CountRequest(bam=shared_bam))
    assert format_seed(result) == expected


def test_index_method_reads_only_the_index(shared_bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", str(shared_bam), "--method", "index", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [(r["region"], r["count"]) for r in document["regions"]] == expected_rows(shared_bam)
    assert document["shards"] == 0
    assert main(["count", str(shared_bam), "--method", "index", "-q", "1"]) == 2
    assert "cannot apply" in capsys.readouterr().err


def test_output_folder_missing_is_a_usage_error(
    shared_bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["count", str(shared_bam), "-o", str(tmp_path / "no" / "such" / "out.tsv")]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_bad_jobs_is_a_usage_error(shared_bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", str(shared_bam), "-j", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_one_debug_event_per_shard(shared_bam: Path) -> None:
    logs.configure(level="debug", json=True)
    with capture_logs() as events:
        result = count_bam_sync(CountRequest(bam=shared_bam, split=False))
    shards = [e for e in events if e["event"] == "shard_counted"]
    assert len(shards) == len(result.regions)
    assert all(e["log_level"] == "debug" and e["seconds"] >= 0 for e in shards)
    by_region = {e["region"]: e["count"] for e in shards}
    assert by_region["{chr2}"] == samtools_count(shared_bam, "chr2")
    assert by_region["*"] == samtools_count(shared_bam, "*")
    assert next(e for e in events if e["event"] == "counted")["total"] == samtools_count(shared_bam)
    logs.configure(level="warning", json=False)


def test_debug_events_of_a_filtered_count_add_up_to_its_total(shared_bam: Path) -> None:
    """A filtered group of small references reports the reads that passed, not all it read."""
    logs.configure(level="debug", json=True)
    with capture_logs() as events:
        result = count_bam_sync(CountRequest(bam=shared_bam, filters=Filters(exclude_flags=0x904, min_mapq=20)))
    shards = [e for e in events if e["event"] == "shard_counted"]
    assert any(" " in e["region"] for e in shards)  # a group of references was counted in one go
    assert sum(e["count"] for e in shards) == result.total == samtools_count(shared_bam, "-F", "0x904", "-q", "20")
    logs.configure(level="warning", json=False)


def test_logs_are_json_lines_when_not_a_tty(shared_bam: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bamcountd", "count", str(shared_bam), "--log-level", "info"],
        capture_output=True,
        text=True,
        check=True,
    )
    events = [json.loads(line) for line in completed.stderr.splitlines()]
    assert events[-1]["event"] == "counted"
    assert events[-1]["total"] == samtools_count(shared_bam)
    assert completed.stdout.splitlines()[-1] == f"total\t{samtools_count(shared_bam)}"


def test_count_imports_structlog_only_for_an_event_to_log(shared_bam: Path) -> None:
    """At its default level a count has nothing to log, so structlog (a tenth of a start) is
    never imported; an event the level lets through imports it, configured as asked."""
    code = (
        "import sys; from bamcountd.cli import main; status = main(sys.argv[1:]); "
        "print('structlog imported:', 'structlog' in sys.modules, file=sys.stderr); sys.exit(status)"
    )
    argv = [sys.executable, "-c", code, "count", str(shared_bam), "--format", "tsv"]
    quiet = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert quiet.stderr == "structlog imported: False\n"
    assert quiet.stdout.splitlines()[-1] == f"total\t{samtools_count(shared_bam)}"
    told = subprocess.run([*argv, "--log-level", "info"], capture_output=True, text=True, check=True)
    *lines, last = told.stderr.splitlines()
    assert last == "structlog imported: True"
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["counted"]
    assert events[0]["level"] == "info" and events[0]["total"] == samtools_count(shared_bam)


def test_the_command_exits_with_mains_status_and_all_its_output(shared_bam: Path, tmp_path: Path) -> None:
    """`bamcountd` skips the interpreter's teardown: the output must still be whole, and the
    status main's."""
    names = [*header_names(shared_bam), "*"]
    completed = subprocess.run(
        [sys.executable, "-m", "bamcountd", "count", str(shared_bam), "--format", "tsv"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    counts = oracle(shared_bam, names)
    assert completed.stdout.splitlines() == [*(f"{n}\t{counts[n]}" for n in names), f"total\t{sum(counts.values())}"]
    missing = subprocess.run(
        [sys.executable, "-m", "bamcountd", "count", str(tmp_path / "none.bam")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr == f"bamcountd: error: {tmp_path / 'none.bam'}: no such file\n"


@pytest.mark.parametrize(
    ("script", "status"),
    [
        # stdout closed before the start (`>&-`): Python has no sys.stdout; a count to -o is fine.
        ("import os; os.close(1); os.execv(sys.executable, [sys.executable, '-c', {inner!r}])", 0),
        # output still buffered when stdout's descriptor is gone: the run fails, as at a normal exit.
        ("sys.stdout.write('x'); os.close(1); exit_now(0)", 1),
        ("sys.stdout.write('x'); os.close(1); exit_now(2)", 2),
    ],
)
def test_exit_now_flushes_what_it_can_and_keeps_the_status(script: str, status: int) -> None:
    inner = "import sys; from bamcountd.__main__ import exit_now; assert sys.stdout is None; exit_now(0)"
    code = f"import os, sys; from bamcountd.__main__ import exit_now; {script.format(inner=inner)}"
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=buffered, check=False)
    assert completed.returncode == status, completed.stderr
    assert completed.stderr == ""


def test_deferred_logging_yields_to_a_structlog_set_up_after_it(tmp_path: Path) -> None:
    """A program that ran a count in-process (logging deferred, nothing logged) and then set up
    structlog itself keeps its own set-up; one that did not gets bamcountd's."""
    code = """if True:
        import sys
        from bamcountd import logs
        logs.configure(level="info", json=True, defer=True)
        import structlog
        from structlog.testing import capture_logs
        if sys.argv[1] == "own":
            with capture_logs() as captured:
                logs.get_logger("t").info("mine", n=1)
            print(captured)
        else:
            logs.get_logger("t").info("theirs", n=2)
    """
    own = subprocess.run([sys.executable, "-c", code, "own"], capture_output=True, text=True, check=True)
    assert own.stdout == "[{'n': 1, 'event': 'mine', 'log_level': 'info'}]\n"
    assert own.stderr == ""
    theirs = subprocess.run([sys.executable, "-c", code, "none"], capture_output=True, text=True, check=True)
    event = json.loads(theirs.stderr)
    assert (event["event"], event["n"], event["level"]) == ("theirs", 2, "info")
    assert theirs.stdout == ""


def test_write_atomic_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_demo_counts_match_samtools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path), "--format", "tsv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bam = tmp_path / "demo.bam"
    assert lines == [f"{name}\t{count}" for name, count in expected_rows(bam)] + [f"total\t{samtools_count(bam)}"]
    assert "HLA-A*01:01:01:01" in lines[3]


def test_count_does_not_import_dxpy_or_service_code(shared_bam: Path) -> None:
    code = (
        "import sys; from bamcountd.cli import main; main(['count', sys.argv[1], '--format', 'tsv']); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dxpy', 'watchfiles', 'prometheus_client') "
        "or m.startswith(('bamcountd.service', 'bamcountd.dnanexus'))]; print(bad, file=sys.stderr)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, str(shared_bam)], capture_output=True, text=True, check=True
    )
    assert completed.stderr.strip() == "[]"


def test_count_does_not_import_structlogs_optional_extras(shared_bam: Path, tmp_path: Path) -> None:
    """structlog.dev imports rich (and pygments), better_exceptions and colorama when they are
    installed; they would cost every start, so the command hides them while structlog loads
    (a program that imports bamcountd keeps its own structlog)."""
    for name in ("rich", "better_exceptions", "colorama"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise SystemExit('{name} was imported')\n")
    argv = [sys.executable, "-m", "bamcountd", "count", str(shared_bam), "--format", "tsv", "-v", "--log-format"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    completed = subprocess.run([*argv, "console"], capture_output=True, text=True, env=env, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "was imported" not in completed.stderr
    assert "counted" in completed.stderr  # the console renderer still works
    assert completed.stdout.splitlines()[-1] == f"total\t{samtools_count(shared_bam)}"
    # The fakes are importable: without the CLI's care, structlog would have imported them.
    argv = [sys.executable, "-c", "import structlog"]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert "was imported" in plain.stderr


@pytest.mark.parametrize(
    ("command", "module", "extra"),
    [("serve", "watchfiles", "service"), ("serve", "prometheus_client", "service"), ("dx-watch", "dxpy", "dnanexus")],
)
def test_a_missing_extra_is_one_line_and_exit_2(command: str, module: str, extra: str, tmp_path: Path) -> None:
    # As after `pip install .` without the extra: the module cannot be imported.
    code = f"import sys; sys.modules[{module!r}] = None; from bamcountd.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["--watch", str(tmp_path), "--results", str(tmp_path / "r"), "--state", str(tmp_path / "s")]
    if command == "dx-watch":
        args = [
            "--project",
            "project-x",
            "--folder",
            "/",
            "--results-folder",
            "/r",
            "--state",
            str(tmp_path),
            "--local",
        ]
    completed = subprocess.run(
        [sys.executable, "-c", code, command, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [
        f"bamcountd: error: {module} is not installed; this command needs it: pip install 'bamcountd[{extra}]'"
    ]
    assert not (tmp_path / "r").exists()
