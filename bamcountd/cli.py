"""Command line: argument parsing, sub-commands, and the ONLY place that maps errors to exit
codes (0 ok, 2 usage or input error, 1 data or tool failure, 130 interrupted)."""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bamcountd import logs
from bamcountd.errors import BadOption, BamcountdError, CohortFailed, InputError, MissingExtra
from bamcountd.options import (
    APPEND,
    OFF,
    OPTIONS,
    OR,
    VALUE,
    CountOptions,
    Option,
    OptionValueError,
    from_values,
    positive_int,
    seconds,
)
from bamcountd.report import FORMATS

if TYPE_CHECKING:
    from bamcountd.inputs import Input

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(command=words[0] if words and not words[0].startswith("-") else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports usage errors itself, with status 2
        return int(exit_.code or 0)
    # count and demo log nothing at their default level: structlog need not be imported.
    logs.configure(level=_log_level(args), json=_log_json(args.log_format), defer=args.defer_logging)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        _require_extra(args.extra)
        return handler(args)
    except KeyboardInterrupt:
        print("bamcountd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CohortFailed as error:  # each BAM's own line, then the status of the worst
        for _, failure in error.failures:
            _print_error(failure)
        return EXIT_USAGE if error.input_only else EXIT_FAILURE
    except InputError as error:
        _print_error(error)
        return EXIT_USAGE
    except BamcountdError as error:
        _print_error(error)
        return EXIT_FAILURE
    except OSError as error:  # the machine, not the input: a full disk, a folder in the way
        _print_error(error)
        return EXIT_FAILURE


#: The optional dependencies of each extra, which the commands that need them check first.
_EXTRAS = {"service": ("watchfiles", "prometheus_client"), "dnanexus": ("dxpy", "prometheus_client")}


def _require_extra(extra: str | None) -> None:
    """:raises MissingExtra: a module of the command's extra is not installed"""
    for module in _EXTRAS.get(extra or "", ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(
                f"{module} is not installed; this command needs it: pip install 'bamcountd[{extra}]'"
            ) from None


def _print_error(error: BaseException) -> None:
    from bamcountd.urls import redact  # every message shows URLs so already; this is the last guard

    print(f"bamcountd: error: {redact(str(error))}", file=sys.stderr)


def _log_level(args: argparse.Namespace) -> str:
    """-v, else --log-level, else the sub-command's own default (services log more)."""
    if args.verbose:
        return "debug"
    return str(args.log_level or args.quiet_log_level)


def _log_json(choice: str) -> bool | None:
    return None if choice == "auto" else choice == "json"


class _Version(argparse.Action):
    """``--version``, looked up only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        import bamcountd

        parser.exit(message=f"bamcountd {bamcountd.__version__}\n")


def _build_parser(*, command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the options of ``serve`` only when it is the command (they are the service's
    table, and ``count`` does not pay for importing it)."""
    parser = argparse.ArgumentParser(
        prog="bamcountd",
        description="Exact, parallel read counts of BAM files per region, with samtools.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log at debug level (one event per region)")
    # No default here: a parent's actions are shared by every sub-parser, so each sub-command
    # sets its own default level under another name (quiet_log_level).
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: warning for count, info for the services",
    )
    parser.set_defaults(quiet_log_level="warning", defer_logging=False, extra=None)
    common.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "console", "json"],
        help="console on a terminal, JSON lines otherwise (default: auto)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    count = _command(
        commands,
        common,
        "count",
        "count the reads of BAMs per region",
        "Count the reads of coordinate-sorted BAMs per region; several BAMs make a matrix (a row per "
        "region, a column per sample) or, with --format json, a list of the per-BAM results.",
    )
    count.add_argument("bam", nargs="*", help="coordinate-sorted BAMs or CRAMs: files, or URLs (http, https, s3, gs)")
    count.add_argument("--bams-from", type=Path, metavar="FILE", help="more BAMs: one path or URL a line")
    add_options(count, OPTIONS)
    count.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: table on a terminal, json for -o *.json, else tsv)",
    )
    count.add_argument("-o", "--output", type=Path, help="write the result to FILE atomically instead of stdout")
    count.set_defaults(handler=_run_count, defer_logging=True)

    demo = _command(
        commands,
        common,
        "demo",
        "count a small generated BAM",
        "Generate a small BAM with tricky contig names and count it.",
    )
    demo.add_argument("--dir", type=Path, help="where to write demo.bam (default: a temporary folder)")
    demo.add_argument("--format", choices=FORMATS, default="table")
    demo.add_argument("--samtools", help="samtools executable (default: samtools on PATH)")
    demo.set_defaults(handler=_run_demo, defer_logging=True)
    _add_service_commands(commands, common, with_options=command == "serve")
    _add_dnanexus_commands(commands, common)
    return parser


# Sub-parsers: argparse's private type has no public name.
_Commands = Any


def _command(
    commands: _Commands, common: argparse.ArgumentParser, name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, parents=[common], help=summary, description=description)
    return parser


def _add_service_commands(commands: _Commands, common: argparse.ArgumentParser, *, with_options: bool) -> None:
    """``bamcountd serve``: the watch-folder daemon (bamcountd.service)."""
    serve = _command(
        commands,
        common,
        "serve",
        "watch folders and count every BAM dropped there (the daemon)",
        "Watch folders for BAMs and write RESULTS/<relative path minus .bam>.counts.json for each "
        "one, exactly once. Every option can also be set as BAMCOUNTD_<KEY> or in the TOML --config file, "
        "KEY being the option name with _ for - (--region: regions; --no-split: split = false; "
        "--no-index-build: build_index = false); flags win over the environment, which wins over the file.",
    )
    if with_options:
        from bamcountd.service.config import CONFIG_FILE, SERVICE_OPTIONS

        add_options(serve, [CONFIG_FILE, *SERVICE_OPTIONS])
        add_options(serve, OPTIONS)
    serve.set_defaults(handler=_run_serve, quiet_log_level="info", extra="service")


def _run_serve(args: argparse.Namespace) -> int:
    from bamcountd.service.config import CONFIG_FILE, SERVICE_OPTIONS, load
    from bamcountd.service.daemon import serve

    flags = _given(args, [CONFIG_FILE, *SERVICE_OPTIONS, *OPTIONS])
    config = load(flags)
    # journald reads stdout: JSON lines unless it is a terminal, one line at a time.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    logs.configure(level=_log_level(args), json=_log_json(args.log_format), stream=sys.stdout)
    import anyio

    from bamcountd.samtools import wait_through_pidfds

    wait_through_pidfds()
    anyio.run(partial(serve, config, reload=partial(load, flags)))
    return EXIT_OK


def _argument(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A table converter as argparse's ``type=`` (for options outside the tables)."""

    def argument(word: str) -> Any:
        try:
            return convert(word)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    argument.__name__ = convert.__name__
    return argument


_positive_int = _argument(positive_int)
_seconds = _argument(seconds)


def _help(row: Option) -> str:
    shown = row.kind == VALUE and row.default not in (None, (), 0) and "default" not in row.help
    return f"{row.help} (default {row.default})" if shown else row.help


def add_options(parser: argparse.ArgumentParser, rows: Iterable[Option]) -> None:
    """The rows of an options table as argparse options, which keep the words as given (a
    repeated ``-F`` as a list, ORed by its converter).  None has a default here: what was not
    given is absent from the namespace, so each runner applies its precedence, the table's
    converters and its defaults, and names the flag in what it refuses."""
    groups: dict[str, Any] = {}
    for row in rows:
        if row.group not in groups:
            groups[row.group] = parser.add_argument_group(row.group)
        where = groups[row.group]
        common: dict[str, Any] = {"dest": row.name, "default": argparse.SUPPRESS, "help": _help(row)}
        if row.kind == OFF:
            where.add_argument(*row.flags, action="store_false", **common)
            continue
        action = "append" if row.kind in (APPEND, OR) else "store"
        where.add_argument(*row.flags, action=action, metavar=row.metavar, choices=row.choices, **common)


def _given(args: argparse.Namespace, rows: Iterable[Option]) -> dict[str, Any]:
    return {row.name: getattr(args, row.name) for row in rows if hasattr(args, row.name)}


def count_options(args: argparse.Namespace) -> CountOptions:
    """The count options given on the command line, the table's defaults for the rest.

    :raises BadOption: a value its option's converter refused
    """
    try:
        return from_values(_given(args, OPTIONS))
    except OptionValueError as error:
        raise BadOption(f"{error.option.flag}: {error}") from None


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return str(args.format)
    if args.output is not None:
        return "json" if args.output.suffix == ".json" else "tsv"
    return "table" if sys.stdout.isatty() else "tsv"


def _bams(args: argparse.Namespace) -> list[Input]:
    """The BAMs named on the command line, then those of ``--bams-from`` (blank lines and
    ``#`` comments skipped): files or URLs.

    :raises BadOption: none given, or an unreadable list
    :raises RemoteUnsupported: a URL samtools cannot read
    """
    from bamcountd.inputs import parse_input

    words: list[str] = list(args.bam)
    if args.bams_from is not None:
        try:
            lines = args.bams_from.read_bytes().splitlines()
        except OSError as error:
            raise BadOption(f"{args.bams_from}: cannot read the list of BAMs ({error.strerror})") from None
        stripped = (os.fsdecode(raw).strip() for raw in lines)
        words += [line for line in stripped if line and not line.startswith("#")]
    if not words:
        raise BadOption("count: give a BAM, or --bams-from FILE")
    return [parse_input(word) for word in words]


def _run_count(args: argparse.Namespace) -> int:
    from bamcountd.count import CountRequest, count_bam_sync
    from bamcountd.report import render, write_atomic

    if args.output is not None and not os.access(args.output.parent if str(args.output.parent) else ".", os.W_OK):
        raise BadOption(f"{args.output}: cannot write there (folder missing or not writable)")
    fmt = _output_format(args)
    bams = _bams(args)
    options = count_options(args)
    if len(bams) > 1 or args.bams_from is not None:
        text = _count_cohort(bams, options, fmt)
    else:
        with _Progress(sys.stderr) as progress:
            result = count_bam_sync(CountRequest.of(bams[0], options), progress=progress.regions)
        text = render(result, fmt)
    if args.output is not None:
        try:
            write_atomic(args.output, text.encode("utf-8", "surrogateescape"))  # names are header bytes
        except OSError as error:
            raise BamcountdError(f"{args.output}: cannot write the result ({error.strerror})") from None
    else:
        _write_stdout(text)
    return EXIT_OK


def _count_cohort(bams: Sequence[Input], options: CountOptions, fmt: str) -> str:
    """Many BAMs at once; nothing is rendered unless every one was counted.

    :raises CohortFailed: one or more BAMs failed
    """
    from bamcountd.count import CountRequest, count_bams_sync
    from bamcountd.report import COHORT_FORMATS, render_cohort

    if fmt not in COHORT_FORMATS:
        raise BadOption(f"--format {fmt}: one BAM's format; many BAMs are {', '.join(COHORT_FORMATS)}")
    with _Progress(sys.stderr) as progress:
        results = count_bams_sync([CountRequest.of(bam, options) for bam in bams], progress=progress.bams)
    return render_cohort(results, fmt)


def _write_stdout(text: str) -> None:
    if not text.endswith("\n") and sys.stdout.isatty():
        text += "\n"  # the seed format ends without one; keep the prompt on its own line
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
    else:  # reference names are the header's bytes, which need not be UTF-8
        buffer.write(text.encode("utf-8", "surrogateescape"))
        buffer.flush()


def _run_demo(args: argparse.Namespace) -> int:
    from bamcountd.count import CountRequest, count_bam_sync
    from bamcountd.report import render
    from bamcountd.synth import demo_bam

    with tempfile.TemporaryDirectory(prefix="bamcountd-demo-") as scratch:
        folder = args.dir if args.dir is not None else Path(scratch)
        bam = demo_bam(folder, samtools=args.samtools or "samtools")
        print(f"# demo BAM: {bam}" + ("" if args.dir else " (removed on exit)"), file=sys.stderr)
        result = count_bam_sync(CountRequest(bam=bam, samtools=args.samtools, index_cache=folder / "cache"))
        _write_stdout(render(result, args.format))
    return EXIT_OK


class _Progress:
    """``done/total regions (or BAMs), elapsed`` on stderr for counts longer than a second, on a
    tty only."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._started = time.monotonic()
        self._shown = False

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()

    def regions(self, done: int, total: int) -> None:
        self._show(done, total, "regions")

    def bams(self, done: int, total: int) -> None:
        self._show(done, total, "BAMs")

    def _show(self, done: int, total: int, what: str) -> None:
        elapsed = time.monotonic() - self._started
        if self._enabled and elapsed >= 1.0:
            self._stream.write(f"\rcounting: {done:,}/{total:,} {what}, {elapsed:.1f} s")
            self._stream.flush()
            self._shown = True


# --- DNAnexus ------------------------------------------------------------------------------


def _add_dnanexus_commands(commands: _Commands, common: argparse.ArgumentParser) -> None:
    """``bamcountd dx-watch``: the DNAnexus project-folder runner (bamcountd.dnanexus)."""
    watch = _command(
        commands,
        common,
        "dx-watch",
        "count every closed BAM that appears in a DNAnexus project folder, once",
        "Poll a DNAnexus project folder for closed BAMs and count each once: by launching the "
        "bamcount applet (--applet) or on this machine (--local). Credentials come from dxpy's own "
        "configuration (DX_SECURITY_CONTEXT, DX_APISERVER_*, or `dx login`).",
    )
    watch.add_argument("--project", required=True, help="project ID (project-…) to watch")
    watch.add_argument("--folder", required=True, help="folder to watch, e.g. /incoming")
    watch.add_argument("--recurse", action="store_true", help="also watch the folder's subfolders")
    watch.add_argument("--results-folder", required=True, help="where results (or the jobs' outputs) go")
    mode = watch.add_mutually_exclusive_group(required=True)
    mode.add_argument("--applet", help="applet ID (applet-…) of dnanexus/bamcount to launch per BAM")
    mode.add_argument("--local", action="store_true", help="download and count on this machine instead")
    watch.add_argument("--state", type=Path, required=True, help="folder for the local ledger (SQLite)")
    watch.add_argument("--poll", type=float, default=60.0, metavar="SECONDS", help="seconds between polls (60)")
    watch.add_argument(
        "--max-attempts", type=_positive_int, default=3, help="launches per BAM before it is marked failed (3)"
    )
    watch.add_argument(
        "--api-retries", type=int, default=4, metavar="N", help="dxpy's retries per API call before a poll fails (4)"
    )
    watch.add_argument(
        "--retry-delay",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="--local: first retry of a failed count after SECONDS, doubled each time (30)",
    )
    watch.add_argument("--page-size", type=_positive_int, default=100, help="first result page size (100)")
    watch.add_argument("--once", action="store_true", help="poll once and exit (for cron and tests)")
    watch.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT")
    add_options(watch, OPTIONS)
    watch.set_defaults(handler=_run_dx_watch, quiet_log_level="info", extra="dnanexus")


def _run_dx_watch(args: argparse.Namespace) -> int:
    from bamcountd.dnanexus.watch import WatchConfig, run

    config = WatchConfig(
        project=args.project,
        folder=args.folder,
        recurse=args.recurse,
        results_folder=args.results_folder,
        state=args.state,
        applet=args.applet,
        count=count_options(args),
        poll=args.poll,
        max_attempts=args.max_attempts,
        api_retries=args.api_retries,
        page_size=args.page_size,
        retry_delay=args.retry_delay,
    )
    run(config, once=args.once, metrics_port=args.metrics_port)
    return EXIT_OK
