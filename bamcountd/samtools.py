"""The samtools boundary: nothing else in bamcountd runs samtools.

Every command is an argument list (never a shell), every path handed to samtools is absolute
(so none can be read as an option), and every result is checked three ways: exit status,
output shape and stderr.  samtools exits 0 on several bad inputs (unknown region, ambiguous
contig name, a file cut at a BGZF block boundary) and only says so on stderr, so any line on
stderr of a command that normally prints nothing there is treated as a failure.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import anyio.abc

from bamcountd.errors import (
    CorruptBam,
    NotCoordinateSorted,
    SamtoolsBadOutput,
    SamtoolsFailed,
    SamtoolsNotFound,
    SamtoolsTimeout,
)
from bamcountd.options import Filters
from bamcountd.urls import Url, redact

#: The oldest samtools whose region syntax (``{name}``) and ``FILE##idx##INDEX`` we rely on.
MINIMUM_VERSION = (1, 10)
#: ``view -e`` filter expressions, used for exact start-position shards.
EXPRESSIONS_VERSION = (1, 12)
#: ``view --save-counts``: the records a query reached and those its filters accepted, from one
#: ``view -c``, which makes a filtered count's accounting free.
SAVE_COUNTS_VERSION = (1, 22)
#: htslib's multi-region iterator (``view -M``) reads a CRAI with nested entries or several
#: references at one container right (cramfile.multi_region_unsafe says which need it before).
MULTI_REGION_CRAM_VERSION = (1, 18)

INSTALL_HINT = "install it (apt-get install samtools) or pass --samtools PATH"

# What ``samtools idxstats -`` says when it counts a stream, which has no index, by reading it.
_IDXSTATS_STREAM_NOTES = (
    re.compile(r"\A\[E::idx_find_and_load\] Could not retrieve index file for '-'\Z"),
    re.compile(r'\Asamtools idxstats: fail to load index for "-", reverting to slow method\Z'),
)
# idxstats' table, and its lines that hold any records (name, length, mapped, unmapped).
_IDXSTATS_TABLE = re.compile(rb"(?:[^\t\n]+\t[0-9]+\t[0-9]+\t[0-9]+\n)*")
_IDXSTATS_RECORDS = re.compile(rb"^([^\t\n]+)\t[0-9]+\t([0-9]+)\t([0-9]+)$(?<!\t0\t0)", re.M)
_CRAM_NO_ENTRY = re.compile(r"\A\[W::hts_itr_multi_cram\] No index entry for region ([0-9]+):[0-9]+-[0-9]+\Z")
_COUNT_LINE = re.compile(rb"\A([0-9]+)\n?\Z")
_HEADER_FIELD = re.compile(rb"\t([A-Za-z][A-Za-z0-9]):([^\t]*)")  # TAG:VALUE (SAM 1.6, 1.3)
_VERSION_LINE = re.compile(r"\Asamtools ([0-9]+\.[0-9]+(?:\.[0-9]+)?)")
_VERSION_ONLY = re.compile(r"\A([0-9]+\.[0-9]+(?:\.[0-9]+)?)[^+\s]*\+htslib-")  # a build may add "-20-gabc"


@dataclass(frozen=True)
class Samtools:
    """A located, version-checked samtools executable."""

    executable: str
    version: str
    version_info: tuple[int, ...]
    #: What every ``view`` of this count's input adds (a CRAM's fields to decode, its reference).
    view_options: tuple[str, ...] = ()
    #: The environment of every command on this count's input (None: bamcountd's own).
    env: Mapping[str, str] | None = field(default=None, compare=False)
    #: The working folder of every command on this count's input (None: bamcountd's own).  A
    #: URL's count runs in a private one: htslib drops a downloaded index in its working
    #: folder, and reuses one it finds there without checking it.
    cwd: Path | None = None

    @property
    def supports_expressions(self) -> bool:
        return self.version_info >= EXPRESSIONS_VERSION

    @property
    def supports_save_counts(self) -> bool:
        return self.version_info >= SAVE_COUNTS_VERSION

    @property
    def multi_region_reads_any_crai(self) -> bool:
        return self.version_info >= MULTI_REGION_CRAM_VERSION


@dataclass(frozen=True)
class Completed:
    """One finished samtools command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def stderr_lines(self) -> list[str]:
        text = redact(self.stderr.decode("utf-8", "replace"))  # htslib quotes the URLs it fails on
        return [line.strip() for line in text.splitlines() if line.strip()]

    def describe_failure(self) -> str | None:
        """Why this command's result must not be trusted, or None if it can be."""
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            cause = f"killed by {name}"
        elif self.returncode > 0:
            cause = f"exit status {self.returncode}"
        elif self.stderr_lines:
            cause = "exit status 0 but it reported a problem"
        else:
            return None
        words = _summarise(self.stderr_lines)
        return f"{cause}: {words}" if words else cause


@dataclass(frozen=True)
class Reference:
    """One @SQ line of the header."""

    name: str
    length: int


@dataclass(frozen=True)
class Header:
    references: tuple[Reference, ...]
    sort_order: str | None
    samples: tuple[str, ...] = ()  # the @RG lines' SM values, each once, in header order


@dataclass(frozen=True)
class IndexStat:
    """One line of ``samtools idxstats``: the index's own per-reference totals."""

    name: str
    length: int
    mapped: int
    unmapped: int

    @property
    def reads(self) -> int:
        return self.mapped + self.unmapped


def _summarise(lines: Sequence[str], limit: int = 3) -> str:
    """At most ``limit`` lines, the last among them: a traceback's (a reader's) or a tool's
    closing summary says what failed there."""
    if len(lines) <= limit:
        return " | ".join(lines)
    return " | ".join([*lines[: limit - 1], f"(+{len(lines) - limit} more lines)", lines[-1]])


async def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    piped: ByteRanges | None = None,
) -> Completed:
    """Run one command to completion; on cancellation or timeout the child is killed.

    The child is spawned by :func:`spawn`, and killed and reaped if the calling scope is cancelled,
    which is what guarantees that no samtools outlives a failed or interrupted count.  With
    ``piped``, the child reads those bytes on its stdin.

    :raises SamtoolsTimeout: the command ran past ``timeout``
    :raises CorruptBam: ``piped``'s file ends before its ranges do
    """
    started = time.monotonic()
    output: dict[str, bytes] = {}

    async def drain(name: str, stream: anyio.abc.ByteReceiveStream | None) -> None:
        assert stream is not None
        output[name] = b"".join([chunk async for chunk in stream])

    piped_read, piped_write = os.pipe() if piped is not None else (subprocess.DEVNULL, -1)
    pipe_in: _PipeIn | None = None
    try:
        with anyio.fail_after(timeout):
            try:
                process = await spawn(argv, stdin=piped_read, env=env, cwd=cwd)
                if piped is not None:
                    pipe_in, piped_write = _PipeIn.feeding(piped_write, piped), -1
            finally:  # ours would keep the pipe from ever closing
                for descriptor in (piped_read, piped_write):
                    if descriptor >= 0:
                        os.close(descriptor)
            async with process:
                async with anyio.create_task_group() as group:
                    group.start_soon(drain, "stdout", process.stdout)
                    group.start_soon(drain, "stderr", process.stderr)
                await process.wait()
    except TimeoutError:
        shown = redact(" ".join(argv[1:3]))  # idxstats' second word is the input, a URL's secrets and all
        raise SamtoolsTimeout(f"{shown}: killed after the {timeout:g} s time limit") from None
    if pipe_in is not None:
        await pipe_in.finished()
    assert process.returncode is not None
    return Completed(
        argv=tuple(argv),
        returncode=process.returncode,
        stdout=output["stdout"],
        stderr=output["stderr"],
        seconds=time.monotonic() - started,
    )


def wait_through_pidfds() -> None:
    """Have asyncio learn of its children's exits through pidfds, as Python 3.12 does by itself.

    Python 3.11's default watcher starts a thread per child, which blocks in ``waitpid``: a count
    of many shards pays for a thread and its hand-over to the event loop per samtools.  Called
    before an event loop of bamcountd's own starts; where pidfds are missing (Linux < 5.3, or a
    sandbox that forbids them), the default stays.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    import asyncio

    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    if not isinstance(asyncio.get_child_watcher(), asyncio.PidfdChildWatcher):
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


async def spawn(argv: Sequence[str], **options: Any) -> anyio.abc.Process:
    """``anyio.open_process``, shielded from cancellation: a cancellation that lands while asyncio
    is still starting the child (it waits for the pipes, then, cancelled, for the killed child)
    would leave a samtools that nobody holds, runs on and is never reaped.  Once this returns,
    the caller's ``async with`` kills and reaps it on any error or cancellation."""
    with anyio.CancelScope(shield=True):
        process = await anyio.open_process(list(argv), **options)
    return process


def kill(process: anyio.abc.Process) -> None:
    """SIGKILL ``process`` unless it is known to have ended, without reaping it.

    ``Popen.kill`` polls first, and a child that had just ended is reaped there: asyncio's
    watcher then finds it gone, reports exit status 255 and warns on stderr.  A pidfd names
    this very child, ended or not, and signals it without reaping it.
    """
    if process.returncode is not None:
        return
    try:
        descriptor = os.pidfd_open(process.pid)
    except AttributeError:  # no pidfds here
        with suppress(ProcessLookupError):
            process.kill()
        return
    except OSError:  # reaped already: nothing left to kill
        return
    try:
        signal.pidfd_send_signal(descriptor, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(descriptor)


def _uncompressed_view(samtools: Samtools, filters: Filters, threads: int) -> list[str]:
    """``samtools view -u [filters] [-@ N]``: records for a reader to count, nothing to deflate."""
    view = [samtools.executable, "view", "--no-PG", "-u", *samtools.view_options, *filters.argv()]
    if threads > 1:
        view += ["-@", str(threads - 1)]
    return view


@dataclass(frozen=True)
class ByteRanges:
    """What samtools reads on its stdin instead of a file: ``ranges`` of the file at ``path``,
    in order, then ``tail`` (a CRAM's header, some of its containers, its EOF container)."""

    path: Path
    ranges: tuple[tuple[int, int], ...]
    tail: bytes = b""


def _widen(descriptor: int) -> None:
    """Make a pipe hold 1 MiB (Linux's usual most), not 64 KiB: samtools then waits on its
    writer a sixteenth as often, which on busy cores is where time goes."""
    with suppress(OSError):  # a lower limit (fs.pipe-max-size): the pipe keeps its size
        fcntl.fcntl(descriptor, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)


class _PipeIn(threading.Thread):
    """Writes a :class:`ByteRanges` into a pipe (``sendfile``: no copy through Python, and no
    wait on the event loop), then closes it; the thread owns the descriptor from its start."""

    def __init__(self, descriptor: int, piped: ByteRanges) -> None:
        super().__init__(name="bamcountd-pipe-in", daemon=True)
        self.descriptor, self.piped = descriptor, piped
        self.error: CorruptBam | None = None

    @classmethod
    def feeding(cls, descriptor: int, piped: ByteRanges) -> _PipeIn:
        """One started on the write end ``descriptor``, widened first (see _widen)."""
        _widen(descriptor)
        writer = cls(descriptor, piped)
        writer.start()
        return writer

    async def finished(self) -> None:
        """Wait for it to end, once samtools has (it read it all, or it would not have ended well).

        :raises CorruptBam: the file ended before its ranges did, or could not be read
        """
        await anyio.to_thread.run_sync(self.join)
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        piped = self.piped
        try:
            with open(piped.path, "rb") as source:
                for first, end in piped.ranges:
                    offset = first
                    while offset < end:
                        sent = os.sendfile(self.descriptor, source.fileno(), offset, end - offset)
                        if not sent:
                            self.error = CorruptBam(f"{piped.path}: the file ends at byte {offset}, before byte {end}")
                            return
                        offset += sent
            tail = memoryview(piped.tail)
            while tail:
                tail = tail[os.write(self.descriptor, tail) :]
        except BrokenPipeError:
            pass  # samtools stopped reading: its exit status says why
        except OSError as error:
            self.error = CorruptBam(f"{piped.path}: cannot be read ({error.strerror})")
        finally:
            os.close(self.descriptor)


@dataclass(frozen=True)
class Tally:
    """The commands of an accounted count: ``view`` and a reader on each of its outputs (the
    records that pass the filters, and, when filters apply, those that do not)."""

    view: Completed
    selected: Completed
    unselected: Completed | None


@dataclass
class Reader:
    """A reader process started ahead of the samtools command that feeds it (an interval
    sweep's, whose imports then overlap the planning): it waits for its stdin, the read end of
    a pipe whose write end, ``feed``, becomes samtools' stdout (:func:`run_tally` takes it);
    any file it is to read must be written before that samtools starts.  Its ``feed`` closed
    unused (by the :func:`readers_ahead` that started it), it ends."""

    process: anyio.abc.Process
    argv: tuple[str, ...]
    feed: int | None  # None once taken: whoever took it closes it

    def take(self) -> int:
        feed, self.feed = self.feed, None
        assert feed is not None, "a reader feeds one samtools"
        return feed

    def drop(self) -> None:
        """Not needed after all (nothing will feed it): killed now, even while it is starting."""
        if self.feed is not None:
            os.close(self.take())
            kill(self.process)


@asynccontextmanager
async def readers_ahead(argvs: Sequence[Sequence[str]], *, cwd: Path) -> AsyncIterator[list[Reader]]:
    """Start a :class:`Reader` for each command line; at the end, whichever of them
    :func:`run_tally` has not taken are killed (they have nothing to read), and every one reaped."""
    readers: list[Reader] = []
    async with AsyncExitStack() as stack:
        for argv in argvs:
            stdin, feed = os.pipe()
            try:
                process = await spawn(argv, stdin=stdin, cwd=cwd)
            except BaseException:
                os.close(feed)
                raise
            finally:
                os.close(stdin)
            reader = Reader(process, tuple(argv), feed)
            stack.push_async_callback(_reap, reader)
            readers.append(reader)
        yield readers


async def _reap(reader: Reader) -> None:
    reader.drop()  # if not taken
    async with reader.process:  # its pipes closed and it waited for (killed if that is cancelled)
        pass


#: How a tally's readers count: per reference (``idxstats -``), or one total for the whole stream.
PER_REFERENCE = "per-reference"
TOTAL = "total"
#: The key of a :data:`TOTAL` tally's only entry in :func:`parse_tally`'s result.
WHOLE_STREAM = b""


async def run_tally(
    samtools: Samtools,
    source: str,
    *,
    regions: Sequence[str] = (),
    bed: Path | None = None,
    filters: Filters,
    expression: str | None = None,
    readers: str | Sequence[str] | Reader = PER_REFERENCE,
    threads: int = 1,
    one_query_each: bool = False,
    piped: ByteRanges | None = None,
    cwd: Path,
    timeout: float | None = None,
) -> Tally:
    """Count what ``samtools view [filters] [-e EXPR] SOURCE REGIONS`` reaches, split into the
    records that pass and those that do not, by samtools alone: ``view -u`` (uncompressed BAM,
    nothing to deflate) writes the passing records to one pipe and, with ``-U``, the others to
    a second, and a reader on each counts them: ``idxstats -`` per reference (it counts a
    stream it finds no index for by reading it), or ``view -c -`` for one total, which applies
    the same ``-e`` so that the records the expression left out are not counted as reached.
    Passed + failed is what the query reached, which must equal the index's count for a whole
    reference.  On cancellation or timeout every process is killed.  ``cwd`` is private:
    idxstats looks for ``-.bai`` there, which must not exist.  ``readers`` may also be a
    command line of its own (the interval sweep), which then reads the passing records alone,
    or such a :class:`Reader` started already.  Several ``regions`` are read by the
    multi-region iterator (``-M``: each record once), or with ``one_query_each`` by a query
    each, in their order: for whole references, which share no record.  With ``piped``,
    ``source`` is ``-`` and samtools reads those bytes on its stdin.
    """
    started = time.monotonic()
    ahead = readers if isinstance(readers, Reader) else None
    split = ahead is None and (filters.active or expression is not None) and readers in (PER_REFERENCE, TOTAL)
    selected_read, selected_write = os.pipe() if ahead is None else (-1, ahead.take())
    unselected_read, unselected_write = os.pipe() if split else (-1, -1)
    piped_read, piped_write = os.pipe() if piped is not None else (-1, -1)
    view = _uncompressed_view(samtools, filters, threads)
    if expression is not None:
        view += ["-e", expression]
    if bed is not None:
        view += ["-M", "-L", str(bed)]
    if split:
        view += ["-U", f"/dev/fd/{unselected_write}"]
    if len(regions) > 1 and not one_query_each:
        view.append("-M")  # the multi-region iterator: each record once, however many regions it overlaps
    view += [source, *regions]
    if isinstance(readers, Reader):
        reader = unselected_reader = list(readers.argv)
    elif not isinstance(readers, str):
        reader = unselected_reader = list(readers)
    elif readers == PER_REFERENCE:
        reader = [samtools.executable, "idxstats", "-"]
        unselected_reader = reader
    else:
        reader = [samtools.executable, "view", "--no-PG", "-c", "-"]
        unselected_reader = reader if expression is None else [*reader[:-1], "-e", expression, "-"]
    plan: list[tuple[list[str], int, int, tuple[int, ...]]] = [
        (
            view,
            subprocess.DEVNULL if piped is None else piped_read,
            selected_write,
            (unselected_write,) if split else (),
        ),
    ]
    if ahead is None:
        plan.append((reader, selected_read, subprocess.PIPE, ()))
    if split:
        plan.append((unselected_reader, unselected_read, subprocess.PIPE, ()))
    outputs: dict[tuple[int, str], bytes] = {}

    async def drain(key: tuple[int, str], stream: anyio.abc.ByteReceiveStream | None) -> None:
        assert stream is not None
        outputs[key] = b"".join([chunk async for chunk in stream])

    pipe_in: _PipeIn | None = None
    async with AsyncExitStack() as stack:
        processes: list[anyio.abc.Process] = []
        try:  # each child gets only its own ends (subprocess closes every other descriptor)
            for argv, stdin, stdout, passed in plan:
                process = await spawn(argv, stdin=stdin, stdout=stdout, pass_fds=passed, cwd=cwd, env=samtools.env)
                processes.append(await stack.enter_async_context(process))
            if ahead is not None:
                processes.append(ahead.process)  # its own readers_ahead reaps it
            if piped is not None:
                pipe_in, piped_write = _PipeIn.feeding(piped_write, piped), -1
        finally:  # ours would keep the pipes from ever closing
            for descriptor in (
                selected_read,
                selected_write,
                unselected_read,
                unselected_write,
                piped_read,
                piped_write,
            ):
                if descriptor >= 0:
                    os.close(descriptor)
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as group:
                    for number, process in enumerate(processes):
                        group.start_soon(drain, (number, "stderr"), process.stderr)
                        if number:
                            group.start_soon(drain, (number, "stdout"), process.stdout)
                for process in processes:
                    await process.wait()
        except BaseException as error:
            for process in processes:
                kill(process)
            if isinstance(error, TimeoutError):
                raise SamtoolsTimeout(f"view -u: killed after the {timeout:g} s time limit") from None
            raise
    if pipe_in is not None:
        await pipe_in.finished()
    seconds = time.monotonic() - started
    done = []
    commands = [view, reader, *([unselected_reader] if split else [])]
    for number, (argv, process) in enumerate(zip(commands, processes, strict=True)):
        assert process.returncode is not None
        printed = outputs.get((number, "stdout"), b"")
        done.append(Completed(tuple(argv), process.returncode, printed, outputs[(number, "stderr")], seconds))
    return Tally(done[0], done[1], done[2] if split else None)


class StreamTally(NamedTuple):
    """A pass over the whole file: ``view -u [filters]``, and its records per reference name
    (``*`` for the unplaced), those that pass the filters and those that do not."""

    view: Completed
    passed: dict[bytes, int]
    failed: dict[bytes, int]
    positionless: dict[bytes, int]  # records with a reference but no position, passing or not


async def run_stream(
    samtools: Samtools, bam: Path | Url, *, filters: Filters, threads: int = 1, timeout: float | None = None
) -> StreamTally:
    """Read the whole file in file order, as a whole-file ``samtools view -c`` does, and count
    its records per reference.  samtools decompresses (with ``threads``) and filters; the
    records are counted in worker threads (:mod:`bamcountd.bamstream`), because no samtools
    command counts an unsorted stream per reference.  On cancellation or timeout samtools is
    killed; a failure of samtools is reported before anything its output lacks.
    """
    from bamcountd.bamstream import READ_BUFFER, StreamCounts, count_records

    started = time.monotonic()
    split = filters.active
    pipes = [os.pipe() for _ in range(2 if split else 1)]
    view = _uncompressed_view(samtools, filters, threads)
    if split:
        view += ["-U", f"/dev/fd/{pipes[1][1]}"]
    view.append(source(bam))
    found: list[StreamCounts | None] = [None] * len(pipes)
    problems: list[BaseException] = []
    stderr = b""

    def count(number: int, descriptor: int) -> None:
        with open(descriptor, "rb") as stream:  # (a read into Inflated's buffer bypasses stream's)
            try:
                found[number] = count_records(stream, f"{bam}: the whole file")
            except SamtoolsBadOutput as error:
                problems.append(error)
                while stream.read(READ_BUFFER):  # drain, so that samtools is never left blocked
                    pass

    async def drain(stream: anyio.abc.ByteReceiveStream | None) -> None:
        nonlocal stderr
        assert stream is not None
        stderr = b"".join([chunk async for chunk in stream])

    try:
        process = await spawn(
            view,
            stdin=subprocess.DEVNULL,
            stdout=pipes[0][1],
            pass_fds=tuple(w for _, w in pipes[1:]),
            env=samtools.env,
            cwd=samtools.cwd,
        )
    except BaseException:
        for descriptor in (d for pipe in pipes for d in pipe):
            os.close(descriptor)
        raise
    for _, write in pipes:  # ours would keep the pipes from ever closing
        os.close(write)
    readers = [read for read, _ in pipes]
    async with process:
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as group:
                    group.start_soon(drain, process.stderr)
                    for number, read in enumerate(readers):
                        group.start_soon(partial(anyio.to_thread.run_sync, count, number, read, abandon_on_cancel=True))
                    readers = []  # each thread closes its own
                await process.wait()
        except BaseException as error:
            kill(process)
            for read in readers:
                os.close(read)
            if isinstance(error, TimeoutError):
                raise SamtoolsTimeout(f"view -u: killed after the {timeout:g} s time limit") from None
            raise
    assert process.returncode is not None
    completed = Completed(tuple(view), process.returncode, b"", stderr, time.monotonic() - started)
    _checked(completed, f"{bam}: the whole file")
    if problems:
        raise problems[0]
    streams = [counts for counts in found if counts is not None]
    positionless: dict[bytes, int] = {}
    for counts in streams:
        for name, n in counts.positionless.items():
            positionless[name] = positionless.get(name, 0) + n
    passed, failed = (streams[0].by_name(), streams[1].by_name() if split else {})
    return StreamTally(completed, passed, failed, positionless)


_located: dict[tuple[str, int, int], Samtools] = {}


def find(path: str | None = None) -> str:
    """The absolute path of samtools (``path``, or the first on PATH)."""
    wanted = path or "samtools"
    executable = shutil.which(wanted)
    if executable is None:
        where = f"at {wanted}" if os.sep in wanted else "on PATH"
        raise SamtoolsNotFound(f"samtools not found {where}: {INSTALL_HINT}")
    return os.path.abspath(executable)


async def locate(path: str | None = None) -> Samtools:
    """Find samtools (``path`` or PATH), check its version; cached per executable."""
    executable = find(path)
    stat = os.stat(executable)
    key = (executable, stat.st_ino, stat.st_mtime_ns)
    if key in _located:
        return _located[key]
    # `--version-only` prints one line ("1.16.1+htslib-1.16") in 3 ms; `--version` also lists
    # htslib's build and plugins, 15 ms that were the longest step of a small count's checks.
    # It is the fallback for a samtools that lacks the short form.
    version = _version_of(await _run_version(executable, "--version-only"), _VERSION_ONLY)
    if version is None:
        version = _version_of(await _run_version(executable, "--version"), _VERSION_LINE)
    if version is None:
        raise SamtoolsBadOutput(f"{executable}: `samtools --version` did not print a samtools version")
    info = tuple(int(part) for part in version.split("."))
    if info < MINIMUM_VERSION:
        raise SamtoolsNotFound(
            f"{executable}: samtools {version} is too old, need "
            f"{'.'.join(map(str, MINIMUM_VERSION))} or newer: {INSTALL_HINT}"
        )
    located = Samtools(executable=executable, version=version, version_info=info)
    _located[key] = located
    return located


async def _run_version(executable: str, option: str) -> Completed:
    try:
        return await run([executable, option], timeout=30)
    except OSError as error:
        raise SamtoolsNotFound(f"{executable}: cannot run samtools ({error.strerror}): {INSTALL_HINT}") from None


def _version_of(completed: Completed, pattern: re.Pattern[str]) -> str | None:
    """The version number ("1.16.1") on the first line, if the command worked and printed one."""
    first = completed.stdout.decode("utf-8", "replace").splitlines()[:1]
    match = pattern.match(first[0]) if completed.returncode == 0 and first else None
    return match.group(1) if match is not None else None


def _checked(completed: Completed, what: str) -> Completed:
    failure = completed.describe_failure()
    if failure is not None:
        raise SamtoolsFailed(f"{what}: samtools {failure}")
    return completed


# htslib's SAM_* bits (sam.h): the fields of a CRAM record that a count may need decoded.
SAM_FLAG, SAM_RNAME, SAM_POS, SAM_MAPQ, SAM_CIGAR = 0x2, 0x4, 0x8, 0x10, 0x20
# glibc hands a CRAM slice's big buffers back to the kernel after each slice and faults them in
# again for the next, which made the kernel's share of a count larger than the decoding: these
# keep them in the heap (no effect on what is decoded).
_MALLOC_RETAIN = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def cram_view_options(required_fields: int, reference: Path | None) -> tuple[str, ...]:
    """What every ``samtools view`` of a CRAM adds: decode only ``required_fields`` (never the
    bases, so never the reference), no MD/NM, and the user's reference when one was given."""
    options = ("--input-fmt-option", f"required_fields={required_fields:#x}", "--input-fmt-option", "decode_md=0")
    return options if reference is None else (*options, "--reference", str(reference))


def cram_environment(no_reference: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of samtools on a CRAM.  Without the user's own ``REF_PATH`` htslib would
    fetch references from the EBI's server; ``no_reference`` (a folder that holds none) stops
    that, so a reference that is needed and missing is an error, never a download."""
    env = dict(os.environ if base is None else base)
    env.setdefault("REF_PATH", f"{no_reference}/%s")
    for name, value in _MALLOC_RETAIN.items():
        env.setdefault(name, value)
    return env


def source(bam: Path | Url) -> str:
    """What samtools is given to read: a path, or a URL with its secrets (never shown)."""
    return bam.secret if isinstance(bam, Url) else str(bam)


def with_index(bam: Path | Url, index: Path) -> str:
    """htslib's ``FILE##idx##INDEX`` form: works for every command (idxstats has no ``-X``,
    and ``view -X`` refuses ``-L`` without a region argument); for a URL, the index is a
    local file htslib need not download."""
    return f"{source(bam)}##idx##{index}"


async def quickcheck(
    executable: str, bam: Path | Url, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> None:
    # -u: a BAM of unaligned reads has no @SQ lines and is still a BAM to count.
    completed = await run([executable, "quickcheck", "-u", "-v", source(bam)], timeout=120, env=env, cwd=cwd)
    if completed.returncode != 0:
        words = _summarise(completed.stderr_lines) or "not a valid BAM"
        raise CorruptBam(f"{bam}: failed samtools quickcheck, the file is truncated or not a BAM ({words})")


async def read_header(
    executable: str, bam: Path | Url, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Header:
    completed = await run([executable, "view", "--no-PG", "-H", source(bam)], timeout=300, env=env, cwd=cwd)
    failure = completed.describe_failure()
    if failure is not None:
        raise CorruptBam(f"{bam}: cannot read the header: samtools {failure}")
    references: list[Reference] = []
    sort_order: str | None = None
    samples: list[str] = []
    for raw in completed.stdout.split(b"\n"):
        if raw.startswith(b"@HD\t"):
            for field in raw.split(b"\t")[1:]:
                if field.startswith(b"SO:"):
                    sort_order = field[3:].decode("ascii", "replace")
        elif raw.startswith(b"@SQ\t"):
            fields = dict(_HEADER_FIELD.findall(raw))
            if b"SN" not in fields or b"LN" not in fields or not fields[b"LN"].isdigit():
                raise CorruptBam(f"{bam}: malformed @SQ header line: {raw[:200]!r}")
            references.append(Reference(name=os.fsdecode(fields[b"SN"]), length=int(fields[b"LN"])))
        elif raw.startswith(b"@RG\t"):
            for field in raw.split(b"\t")[1:]:
                if field.startswith(b"SM:") and os.fsdecode(field[3:]) not in samples:
                    samples.append(os.fsdecode(field[3:]))
    return Header(references=tuple(references), sort_order=sort_order, samples=tuple(samples))


async def idxstats(
    executable: str,
    bam: Path | Url,
    index: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 300,
    cwd: Path | None = None,
) -> list[IndexStat]:
    """The index's per-reference totals; of a CRAM, whose CRAI holds none, samtools counts them
    by reading every record (FLAG and RNAME decoded), whatever index it is given."""
    completed = await run([executable, "idxstats", with_index(bam, index)], timeout=timeout, env=env, cwd=cwd)
    _checked(completed, f"{bam}: idxstats")
    stats: list[IndexStat] = []
    for raw in completed.stdout.splitlines():
        parts = raw.split(b"\t")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise SamtoolsBadOutput(f"{bam}: unexpected `samtools idxstats` line {raw[:200]!r}")
        stats.append(IndexStat(os.fsdecode(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])))
    return stats


async def build_index(samtools: Samtools, bam: Path | Url, out: Path, *, csi: bool, threads: int) -> None:
    """Index ``bam`` into ``out`` atomically (a temp file renamed into place)."""
    partial = out.with_name(f".{out.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    argv = [samtools.executable, "index", "-@", str(max(threads - 1, 0))]
    if not out.name.endswith(".crai"):  # a CRAM's index is always a CRAI
        argv += ["-c"] if csi else ["-b"]
    argv += [source(bam), str(partial)]
    try:
        completed = await run(argv, env=samtools.env, cwd=samtools.cwd)
        failure = completed.describe_failure()
        if failure is not None:
            words = " ".join(completed.stderr_lines)
            if "Unsorted positions" in words or "NO_COOR reads not in a single block" in words:
                raise NotCoordinateSorted(
                    f"{bam}: the BAM is not coordinate-sorted, so it cannot be indexed; "
                    f"sort it first (samtools sort -o sorted.bam {bam.name})"
                )
            raise CorruptBam(f"{bam}: cannot build an index: samtools {failure}")
        # A BAM stamped in the future (clock skew on shared storage) would make htslib call
        # the fresh index stale; it describes exactly this content, so date it no older.
        bam_mtime = bam.stat().st_mtime_ns if isinstance(bam, Path) else 0
        if partial.stat().st_mtime_ns < bam_mtime:
            os.utime(partial, ns=(bam_mtime, bam_mtime))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def count_argv(
    samtools: Samtools,
    bam: Path | Url,
    index: Path,
    regions: Iterable[str],
    *,
    filters: Filters,
    threads: int = 1,
    expression: str | None = None,
    bed: Path | None = None,
    save_counts: Path | None = None,
    piped: bool = False,
) -> list[str]:
    """``samtools view -c`` for one shard.

    Regions come as arguments, or as a BED file for the multi-region iterator (``-M -L``),
    which reads each stretch of the file once instead of seeking once per region; ``piped``:
    none, samtools reads its stdin (see :class:`ByteRanges`).
    ``save_counts`` asks samtools 1.22+ to write there what it reached and accepted.
    """
    argv = [samtools.executable, "view", "--no-PG", "-c", *samtools.view_options, *filters.argv()]
    if save_counts is not None:
        argv += ["--save-counts", str(save_counts)]
    if threads > 1:
        argv += ["-@", str(threads - 1)]
    if expression is not None:
        argv += ["-e", expression]
    if bed is not None:
        argv += ["-M", "-L", str(bed)]
    regions = list(regions)
    if piped:  # a stream on stdin: some of a CRAM's containers, which need no index
        argv.append("-")
    elif regions or bed is not None:
        argv += [with_index(bam, index), *regions]
    else:  # the whole file, which needs no index
        argv.append(source(bam))
    return argv


def parse_count(completed: Completed, what: str) -> int:
    """The integer of a ``view -c`` run, after checking exit status and stderr."""
    _checked(completed, what)
    match = _COUNT_LINE.match(completed.stdout)
    if match is None:
        raise SamtoolsBadOutput(f"{what}: samtools printed {completed.stdout[:80]!r} instead of a count")
    return int(match.group(1))


_SAVED_COUNT = re.compile(rb'"(records_processed|records_filter_accepted)"\s*:\s*([0-9]+)')


def parse_saved_counts(completed: Completed, saved: Path, what: str) -> tuple[int, int]:
    """(records reached, records passing) of a ``view -c --save-counts`` run, after checking
    it as any count; the file's accepted records must be the count it printed."""
    count = parse_count(completed, what)
    try:
        text = saved.read_bytes()
    except OSError as error:
        raise SamtoolsBadOutput(f"{what}: samtools wrote no --save-counts file ({error.strerror})") from None
    found = {key: int(value) for key, value in _SAVED_COUNT.findall(text)}
    if set(found) != {b"records_processed", b"records_filter_accepted"} or found[b"records_filter_accepted"] != count:
        raise SamtoolsBadOutput(f"{what}: samtools' --save-counts file says {text[:200]!r}, its count {count}")
    return found[b"records_processed"], count


def parse_tally(tally: Tally, what: str) -> dict[bytes, tuple[int, int]]:
    """(records reached, records passing the filters) per reference name with any records, or
    under :data:`WHOLE_STREAM` for :data:`TOTAL` readers, from a :func:`run_tally`, after
    checking every command.  idxstats' two notes about reading a stream are expected; any
    other stderr line is a failure.  idxstats prints every reference of the header, so only
    the lines with records are looked at one by one."""
    readers = [c for c in (tally.selected, tally.unselected) if c is not None]
    per_reference = readers[0].argv[1:2] == ("idxstats",)
    if per_reference:
        readers = [_without_stream_notes(c) for c in readers]
    view_lines = tally.view.stderr_lines
    if tally.view.returncode == -signal.SIGPIPE or any("Broken pipe" in line for line in view_lines):
        for completed in readers:  # a reader gave up first: its words say why
            _checked(completed, what)
    _checked(tally.view, what)
    found: dict[bytes, list[int]] = {}
    for column, completed in enumerate(readers):
        if not per_reference:
            found.setdefault(WHOLE_STREAM, [0, 0])[column] += parse_count(completed, what)
            continue
        _checked(completed, what)
        out = completed.stdout
        if not _IDXSTATS_TABLE.fullmatch(out) or not (out.startswith(b"*\t") or b"\n*\t" in out):
            raise SamtoolsBadOutput(f"{what}: `samtools idxstats -` printed {out[-200:]!r}")
        for match in _IDXSTATS_RECORDS.finditer(out):
            name, mapped, unmapped = match.groups()
            found.setdefault(name, [0, 0])[column] += int(mapped) + int(unmapped)
    return {name: (passed + failed, passed) for name, (passed, failed) in found.items()}


def parse_sweep(tally: Tally, intervals: int, what: str) -> list[int]:
    """Each interval's count from a :func:`run_tally` whose reader was the interval sweep
    (``python -m bamcountd.overlaps``), after checking both commands: one count per interval
    (bamstream.write_counts)."""
    reader = tally.selected
    if tally.view.returncode == -signal.SIGPIPE or any("Broken pipe" in line for line in tally.view.stderr_lines):
        _checked_reader(reader, what)  # the reader gave up first: its words say why
    _checked(tally.view, what)
    _checked_reader(reader, what)
    from bamcountd.bamstream import read_counts  # (imported only by counts that need it)

    found = read_counts(reader.stdout, intervals)
    if found is None:
        raise SamtoolsBadOutput(f"{what}: the interval sweep printed {reader.stdout[-200:]!r}, not {intervals} counts")
    return found[0]


def _checked_reader(completed: Completed, what: str) -> None:
    failure = completed.describe_failure()
    if failure is not None:
        raise SamtoolsBadOutput(f"{what}: the interval sweep over samtools' output failed ({failure})")


def without_empty_reference_notes(completed: Completed, empty: frozenset[int]) -> Completed:
    """``completed`` without htslib's note that a CRAM's index has no entry for a reference of a
    ``-M -L`` BED, where that reference (numbered as in the header) holds no records at all."""
    return _without(completed, lambda line: _no_entry_for(line) in empty)


def _no_entry_for(line: str) -> int | None:
    match = _CRAM_NO_ENTRY.match(line)
    return int(match.group(1)) if match is not None else None


def _without_stream_notes(completed: Completed) -> Completed:
    return _without(completed, lambda line: any(n.match(line) for n in _IDXSTATS_STREAM_NOTES))


def _without(completed: Completed, expected: Callable[[str], bool]) -> Completed:
    lines = [line for line in completed.stderr_lines if not expected(line)]
    return Completed(
        completed.argv, completed.returncode, completed.stdout, "\n".join(lines).encode(), completed.seconds
    )


# --- files for the demo, the tests and the benchmarks (synchronous, outside any count) ----------


def write_bam_sync(samtools: str, sam_lines: Iterable[str], path: Path, *, sort: bool = True, threads: int = 1) -> None:
    """Write SAM text (header then records, a line each without newline) to ``path`` as a BAM:
    coordinate-sorted by ``samtools sort``, or as it comes by ``samtools view -b``."""
    if sort:
        argv = [samtools, "sort", "--no-PG", "-@", str(threads), "-o", str(path), "-"]
    else:
        argv = [samtools, "view", "--no-PG", "-b", "-@", str(threads), "-o", str(path), "-"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE) as process:
        assert process.stdin is not None
        batch: list[str] = []
        for line in sam_lines:
            batch.append(line)
            if len(batch) >= 10_000:
                process.stdin.write(("\n".join(batch) + "\n").encode())
                batch.clear()
        if batch:
            process.stdin.write(("\n".join(batch) + "\n").encode())
        process.stdin.close()
    if process.returncode != 0:
        raise SamtoolsFailed(f"{' '.join(argv)} failed with exit status {process.returncode}")


def index_sync(samtools: str, bam: Path) -> None:
    """``samtools index BAM`` (the index next to it, as samtools names it)."""
    argv = [samtools, "index", str(bam)]
    code = subprocess.run(argv, check=False).returncode
    if code != 0:
        raise SamtoolsFailed(f"{' '.join(argv)} failed with exit status {code}")
