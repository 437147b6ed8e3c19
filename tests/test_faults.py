"""Bad input and misbehaving samtools: a clear one-line error, the right exit status, no number
and no output file — never a plausible wrong count."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from bamcountd import CountRequest, count_bam
from bamcountd.cli import main
from bamcountd.errors import SamtoolsFailed
from bamcountd.synth import Reference, tricky_bam, write_bam
from tests.support.bams import SAMTOOLS, bgzf_blocks, samtools_count
from tests.support.fake_samtools import Fault, fake_samtools, processes_with


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["count", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bam(tmp_path: Path, shared_bam: Path) -> Path:
    """A private copy of the shared BAM (with its index), free to damage."""
    (tmp_path / "data").mkdir()
    copy = tmp_path / "data" / "sample.bam"
    shutil.copy2(shared_bam, copy)
    shutil.copy2(str(shared_bam) + ".bai", str(copy) + ".bai")
    return copy


def assert_failed(code: int, expected: int, out: str, err: str, *words: str, output: Path | None = None) -> None:
    assert code == expected, err
    assert out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("bamcountd: error: "), err
    for word in words:
        assert word in line, line
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def test_truncated_mid_block(bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bam.read_bytes()
    offset, size = bgzf_blocks(data)[2]
    bam.write_bytes(data[: offset + size // 2])
    out_file = tmp_path / "out.json"
    code, out, err = run_cli(capsys, bam, "-o", out_file)
    assert_failed(code, 1, out, err, str(bam), "truncated", output=out_file)


def test_truncated_at_a_block_boundary(bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """samtools itself exits 0 and undercounts here; we must not."""
    data = bam.read_bytes()
    blocks = bgzf_blocks(data)
    cut = data[: blocks[-2][0]]  # drop the last data block and the EOF marker
    bam.write_bytes(cut)
    plain = subprocess.run([SAMTOOLS, "view", "-c", str(bam)], capture_output=True, check=False)
    assert plain.returncode == 0  # the trap: samtools "succeeds" with a smaller number
    out_file = tmp_path / "out.tsv"
    code, out, err = run_cli(capsys, bam, "-o", out_file)
    assert_failed(code, 1, out, err, str(bam), "truncated", output=out_file)


def test_eof_marker_appended_back_still_caught_by_the_counts(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file cut at a block boundary, with an EOF marker glued on, passes quickcheck; the
    index's own totals then disagree with what the data holds."""
    data = bam.read_bytes()
    blocks = bgzf_blocks(data)
    eof = data[blocks[-1][0] :]
    os.utime(bam, ns=(0, 0))
    bam.write_bytes(data[: blocks[-2][0]] + eof)
    os.utime(str(bam) + ".bai")  # the old index now looks fresh
    code, out, err = run_cli(capsys, bam)
    assert_failed(code, 1, out, err, str(bam), "index")


def test_corrupted_block(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(bam.read_bytes())
    offset, size = bgzf_blocks(bytes(data))[2]
    rng = random.Random(5)
    for k in range(offset + 40, offset + size - 20, 7):
        data[k] = rng.randrange(256)
    bam.write_bytes(bytes(data))
    os.utime(str(bam) + ".bai")
    code, out, err = run_cli(capsys, bam)
    assert_failed(code, 1, out, err, str(bam), "samtools")


def test_missing_index_with_no_index_build(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path(str(bam) + ".bai").unlink()
    code, out, err = run_cli(capsys, bam, "--no-index-build")
    assert_failed(code, 2, out, err, str(bam), "no index")


def test_stale_index_is_refused_with_no_index_build(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    later = time.time() + 60
    os.utime(bam, (later, later))
    code, out, err = run_cli(capsys, bam, "--no-index-build")
    assert_failed(code, 2, out, err, str(bam), "older than the BAM")


def test_stale_index_is_rebuilt_into_the_cache(bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    later = time.time() + 60
    os.utime(bam, (later, later))
    cache = tmp_path / "cache"
    code, out, err = run_cli(capsys, bam, "--format", "tsv", "--index-cache", cache)
    assert code == 0, err
    built = [p for p in cache.iterdir() if p.suffix != ".reach"]  # and the proof that queries reach every record
    assert len(built) == 1 and built[0].suffix == ".bai"
    counts = dict(line.split("\t") for line in out.splitlines())
    assert int(counts["total"]) == samtools_count(bam)
    assert int(counts["chr2"]) == samtools_count(bam, "chr2", index=built[0])


@pytest.mark.parametrize("filters", [(), ("-q", "20")])  # filtered: groups use the built BAI's reach
def test_missing_index_is_built_and_the_bam_left_alone(
    bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    Path(str(bam) + ".bai").unlink()
    before = sorted(p.name for p in bam.parent.iterdir())
    code, out, err = run_cli(capsys, bam, "--format", "tsv", *filters, "--index-cache", tmp_path / "cache")
    assert code == 0, err
    assert sorted(p.name for p in bam.parent.iterdir()) == before
    counts = dict(line.split("\t") for line in out.splitlines())
    assert int(counts["total"]) == samtools_count(bam, *filters)
    assert int(counts["chr2"]) == samtools_count(bam, *filters, "chr2", index=next((tmp_path / "cache").glob("*.bai")))


@pytest.mark.parametrize("how", [(), ("--no-split",), ("-q", "20")])
def test_index_from_another_bam(
    bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: tuple[str, ...]
) -> None:
    """Grouped small references (sum checked against the index), one process per reference
    (each count checked), and filtered (no count may exceed the index's): all refuse."""
    other = tricky_bam(tmp_path / "other", reads=2000, unplaced=50, seed=99)
    shutil.copy(str(other) + ".bai", str(bam) + ".bai")  # newer than the BAM: not stale
    code, out, err = run_cli(capsys, bam, *how)
    assert_failed(code, 1, out, err, str(bam), "index")


def test_unknown_region(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, bam, "-r", "chrNope")
    assert_failed(code, 2, out, err, "chrNope", "no reference")


def test_range_past_the_end(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, bam, "-r", "chr2:200000-300000")
    assert_failed(code, 2, out, err, "past the end")


def test_ambiguous_region(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    references = [Reference("chr1", 1000), Reference("chr1:1-100", 1000)]
    records = ["a\t0\tchr1\t5\t60\t10M\t*\t0\t0\tAAAAAAAAAA\t*", "b\t0\tchr1:1-100\t5\t60\t10M\t*\t0\t0\tAAAAAAAAAA\t*"]
    bam = write_bam(tmp_path / "amb.bam", references, records)
    code, out, err = run_cli(capsys, bam, "-r", "chr1:1-100")
    assert_failed(code, 2, out, err, "ambiguous", "{chr1:1-100}")
    code, out, err = run_cli(capsys, bam, "-r", "{chr1:1-100}", "-r", "{chr1}:1-100", "--format", "tsv")
    assert code == 0, err
    assert out.splitlines() == [
        f"{{chr1:1-100}}\t{samtools_count(bam, '{chr1:1-100}')}",
        f"{{chr1}}:1-100\t{samtools_count(bam, '{chr1}:1-100')}",
        "total\t2",
    ]


def test_bad_flag_is_a_usage_error(bam: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, bam, "-F", "NOT_A_FLAG")
    assert code == 2
    assert "NOT_A_FLAG" in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, tmp_path / "nope.bam")
    assert_failed(code, 2, out, err, "nope.bam", "no such file")


def test_directory_instead_of_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, tmp_path)
    assert_failed(code, 2, out, err, str(tmp_path), "directory")


def test_not_a_bam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "reads.bam"
    text.write_text("@HD\tVN:1.6\nr\t4\t*\t0\t0\t*\t*\t0\t0\tA\t*\n")
    code, out, err = run_cli(capsys, text)
    assert_failed(code, 1, out, err, str(text), "not a BAM")


def test_unreadable_file(bam: Path) -> None:
    bam.chmod(0)
    argv = [sys.executable, "-m", "bamcountd", "count", str(bam)]
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that let it
        drop = "-dac_override,-dac_read_search"
        argv = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *argv]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.strip() == f"bamcountd: error: {bam}: permission denied"


def test_unsorted_bam_needs_sorting_only_for_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whole references are counted in one pass (tests/test_quirks.py); a range needs an index."""
    references = [Reference("chr1", 10_000)]
    records = [f"r{i}\t0\tchr1\t{pos}\t60\t10M\t*\t0\t0\tAAAAAAAAAA\t*" for i, pos in enumerate([500, 20, 900, 3])]
    for sort_order in ("unsorted", "coordinate"):  # a header that lies about the order too
        bam = write_bam(
            tmp_path / f"{sort_order}.bam", references, records, sort=False, index=False, sort_order=sort_order
        )
        code, out, err = run_cli(capsys, bam, "--format", "tsv")
        assert (code, out) == (0, f"chr1\t4\n*\t0\ntotal\t{samtools_count(bam)}\n"), err
        code, out, err = run_cli(capsys, bam, "-r", "chr1:1-600")
        assert_failed(code, 2, out, err, str(bam), "not coordinate-sorted", "samtools sort")


def test_samtools_missing(
    bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(capsys, bam, "--samtools", tmp_path / "bin" / "samtools")
    assert_failed(code, 1, out, err, "samtools not found", "apt-get install samtools", "--samtools")
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, err = run_cli(capsys, bam)
    assert_failed(code, 1, out, err, "on PATH", "apt-get install samtools")


def _samtools_answering(folder: Path, version_only: str | None, version: str | None) -> Path:
    """A samtools that answers the version questions as told and runs the real one otherwise;
    None plays a samtools that does not know the option (exit status 1)."""
    faults = [
        Fault(f"first:{option}", stderr=f"[main] unrecognized command '{option}'\n", end="exit:1")
        if answer is None
        else Fault(f"first:{option}", stdout=f"{answer}\n", end="exit:0")
        for option, answer in (("--version-only", version_only), ("--version", version))
    ]
    return fake_samtools(folder, *faults, name="versioned-samtools")


@pytest.mark.parametrize(
    ("version_only", "version", "reported"),
    [
        ("1.16.1-20-gabc+htslib-1.16-5-gdef", None, "1.16.1"),  # the short form is all it asks
        (None, "samtools 1.13", "1.13"),  # a samtools without it is asked the long way
        ("garbage", "samtools 1.14", "1.14"),  # and so is one that answers it strangely
    ],
)
def test_samtools_version_short_form_then_long(
    bam: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    version_only: str | None,
    version: str | None,
    reported: str,
) -> None:
    samtools = _samtools_answering(tmp_path, version_only, version)
    code = main(["count", str(bam), "--samtools", str(samtools), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["samtools"] == reported
    assert result["total"] == samtools_count(bam)


@pytest.mark.parametrize(
    ("version_only", "version", "code", "words"),
    [
        (None, "samtools 1.9", 1, "samtools 1.9 is too old, need 1.10 or newer"),
        ("1.9+htslib-1.9", "samtools 1.9", 1, "samtools 1.9 is too old"),
        (None, "something else", 1, "did not print a samtools version"),
        ("garbage", "garbage", 1, "did not print a samtools version"),
        (None, None, 1, "did not print a samtools version"),
    ],
)
def test_samtools_version_too_old_or_unreadable(
    bam: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    version_only: str | None,
    version: str | None,
    code: int,
    words: str,
) -> None:
    samtools = _samtools_answering(tmp_path, version_only, version)
    got, out, err = run_cli(capsys, bam, "--samtools", samtools)
    assert_failed(got, code, out, err, str(samtools), words)


@pytest.fixture
def token() -> str:
    """What a hanging fake's ``sleep`` has on its command line (and how long it sleeps)."""
    return f"{random.randrange(10_000, 99_999)}.{os.getpid()}"


@pytest.mark.parametrize(
    ("fault", "args", "words"),
    [
        (Fault("count", end="signal:SIGKILL"), (), "killed by SIGKILL"),
        (Fault("count", stdout="lots of reads\n", end="exit:0"), (), "instead of a count"),
        # A filtered group is counted by `view -u -U | idxstats -` (twice): a failure of any of
        # them, or a stderr line beyond idxstats' two notes about reading a stream, is an error.
        (
            Fault("tally", stderr="[E::fake] tally failure\n", end="exit:1"),
            ("-q", "20"),
            "exit status 1: [E::fake] tally failure",
        ),
        (Fault("tally", stderr_after="[W::fake] something odd\n"), ("-q", "20"), "[W::fake] something odd"),
    ],
)
def test_samtools_killed_garbage_or_stray_stderr(
    bam: Path,
    tmp_path: Path,
    fault: Fault,
    args: tuple[str, ...],
    words: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(capsys, bam, *args, "--samtools", fake_samtools(tmp_path, fault))
    assert_failed(code, 1, out, err, str(bam), words)


def test_samtools_hang_past_timeout(bam: Path, tmp_path: Path, token: str, capsys: pytest.CaptureFixture[str]) -> None:
    fake = fake_samtools(tmp_path, Fault("count", hang=token))
    started = time.monotonic()
    code, out, err = run_cli(capsys, bam, "--samtools", fake, "--timeout", "1")
    assert_failed(code, 1, out, err, "time limit")
    assert time.monotonic() - started < 20
    assert processes_with(token) == []


def test_tally_pipeline_hang_is_killed_at_the_timeout(
    bam: Path, tmp_path: Path, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = fake_samtools(tmp_path, Fault("tally", hang=token))
    code, out, err = run_cli(capsys, bam, "-q", "20", "--samtools", fake, "--timeout", "1")
    assert_failed(code, 1, out, err, "time limit")
    assert processes_with(token) == []


def test_one_failure_cancels_the_rest_and_kills_them(bam: Path, tmp_path: Path, token: str) -> None:
    # The first `view -c` to get here fails after a moment; the others hang.
    crash_first = Fault(
        "count", once=str(bam.parent / "crashed"), delay=0.5, stderr="[E::fake] injected failure\n", end="exit:1"
    )
    fake = fake_samtools(tmp_path, crash_first, Fault("count", hang=token))

    async def attempt() -> None:
        with pytest.raises(SamtoolsFailed, match="injected failure"):
            await count_bam(CountRequest(bam=bam, samtools=str(fake), jobs=64, threads=1, split=False))

    anyio.run(attempt)
    assert (bam.parent / "crashed").exists()
    assert processes_with(token) == []


def test_cancelling_a_count_kills_every_samtools(bam: Path, tmp_path: Path, token: str) -> None:
    fake = fake_samtools(tmp_path, Fault("count", hang=token))

    async def attempt() -> None:
        with anyio.move_on_after(3) as scope:
            await count_bam(CountRequest(bam=bam, samtools=str(fake), jobs=4, split=False))
        assert scope.cancelled_caught

    anyio.run(attempt)
    assert processes_with(token) == []


def test_ctrl_c_exits_130_and_leaves_no_samtools(bam: Path, tmp_path: Path, token: str) -> None:
    fake = fake_samtools(tmp_path, Fault("count", hang=token))
    argv = [
        sys.executable,
        "-m",
        "bamcountd",
        "count",
        str(bam),
        "--samtools",
        str(fake),
        "-o",
        str(tmp_path / "o.tsv"),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(token), "samtools never started"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert b"interrupted" in err
    assert processes_with(token) == []
    assert not (tmp_path / "o.tsv").exists()


def test_a_long_stderr_is_shown_by_its_first_lines_and_its_last() -> None:
    """A reader's traceback ends with the line that says what failed; it is kept."""
    from bamcountd.samtools import Completed

    lines = ["Traceback (most recent call last):", *(f'  File "x.py", line {n}' for n in range(5)), "ValueError: bad"]
    failure = Completed(("python",), 1, b"", "\n".join(lines).encode(), 0.1).describe_failure()
    shown = 'Traceback (most recent call last): | File "x.py", line 0 | (+4 more lines) | ValueError: bad'
    assert failure == f"exit status 1: {shown}"  # each line stripped
    short = Completed(("samtools",), 0, b"", b"[W::x] one\n[W::y] two\n", 0.1).describe_failure()
    assert short == "exit status 0 but it reported a problem: [W::x] one | [W::y] two"


def test_the_cli_waits_for_samtools_through_pidfds(bam: Path) -> None:
    """Python 3.11 would start a thread per samtools to wait for it; the CLI's event loop learns
    of exits through pidfds instead (3.12 does so by itself, and is left as it is)."""
    code = (
        "import asyncio, sys\n"
        "from bamcountd.cli import main\n"
        f"status = main(['count', {str(bam)!r}, '--format', 'tsv'])\n"
        "watcher = getattr(asyncio.get_event_loop_policy(), '_watcher', None)\n"  # None: 3.12's own way
        "print('WATCHER', type(watcher).__name__, file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == f"total\t{samtools_count(bam)}"
    expected = "PidfdChildWatcher" if sys.version_info < (3, 12) and _pidfds_work() else "NoneType"
    assert f"WATCHER {expected}" in completed.stderr


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def test_index_cache_blocked_is_one_line_not_a_traceback(
    bam: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bamcountd.inputs import cached_index_path

    Path(str(bam) + ".bai").unlink()
    cache = tmp_path / "cache"
    cached_index_path(bam, cache, csi=False).mkdir(parents=True)  # a folder where the index goes
    code, out, err = run_cli(capsys, bam, "--index-cache", cache)
    assert_failed(code, 1, out, err, "Is a directory")


def test_killing_a_child_that_just_ended_keeps_its_exit_status(caplog: pytest.LogCaptureFixture) -> None:
    """A child that ended before the event loop heard of it: ``Popen.kill`` reaps it while
    polling, and asyncio's watcher then reports status 255 and warns; samtools.kill leaves it
    to the watcher, which reports its own status."""
    from bamcountd import samtools as st

    async def ended_then_killed(kill: Callable[[anyio.abc.Process], None]) -> int:
        async with await st.spawn([sys.executable, "-c", "import sys; sys.exit(3)"]) as process:
            time.sleep(1.0)  # the loop is held: the child ends unheard of
            kill(process)
            return await process.wait()

    def warned() -> bool:
        return any("exit status already read" in record.getMessage() for record in caplog.records)

    with caplog.at_level("WARNING", logger="asyncio"):
        assert anyio.run(ended_then_killed, st.kill) == 3
        assert not warned()
        if _pidfds_work() and sys.version_info < (3, 12):  # the race it avoids is there to avoid
            assert anyio.run(ended_then_killed, lambda process: process.kill()) == 255
            assert warned()
